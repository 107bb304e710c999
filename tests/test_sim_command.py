"""`variant-autoscaler simulate`: a small scenario end to end, the report it writes, and bad input."""

import json
from pathlib import Path

import pytest
from variant_autoscaler.cli import main

from optimizer.simulation.evaluation import plan_runs
from optimizer.simulation.scenario import load_scenario, prepare

ROOT = Path(__file__).resolve().parents[1]

SMALL = """
name: small
fleet: {fleet}
model: Llama-3.1-8B
slo: {{model: Llama-3.1-8B, ttft_s: 1.5, itl_s: 0.1, percentile: 95}}
trace:
  source: generated
  duration_s: 420
  seed: 1
  arrivals: {{kind: step, times_s: [0, 200], rates_rps: [2.0, 6.0]}}
cluster: {{warmup_s: 60}}
policies:
  - kind: static-peak
  - kind: hpa
    variant: llama8b-a100
  - kind: inferline
  - kind: wva
  - kind: ours
pareto: {{service_levels: [0.8, 1.0], latency: e2e}}
"""


def test_simulate_writes_the_report(tmp_path, capsys):
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL.format(fleet=ROOT / "examples" / "fleet.yaml"))
    out = tmp_path / "report"
    assert main(["simulate", str(scenario), "-o", str(out), "-j", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report written to" in printed and "hpa[llama8b-a100]" in printed
    for name in ("summary.json", "table.txt", "arrival_rate.png", "replicas.png", "latency.png", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    labels = [r["label"] for r in summary["runs"]]
    assert labels[:4] == ["static-peak[llama8b-a100]", "hpa[llama8b-a100]", "inferline[llama8b-a100]",
                          "wva-saturation"]
    assert {"ours", "ours@0.8", "ours@1"} <= set(labels)
    for run in summary["runs"]:
        assert run["completed"] + run["dropped"] == run["requests"] > 0
        assert 0.0 <= run["slo_attainment"] <= 1.0
        assert run["cost"] > 0
    assert 0.0 <= summary["pareto"]["hypervolume"]["ours (front)"] <= 1.0
    at_target = summary["pareto"]["hypervolume_at_target"]
    for run in summary["runs"]:
        if run["label"] in at_target:
            assert at_target[run["label"]] <= summary["pareto"]["hypervolume"][run["label"]] + 1e-12
            if run["slo_attainment"] < 0.99:
                assert at_target[run["label"]] == 0.0, "a run that misses the SLO scores nothing at target"
    assert summary["pareto"]["front"]


def test_bad_scenario_is_one_line_with_file_and_field(tmp_path, capsys):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(SMALL.format(fleet=ROOT / "examples" / "fleet.yaml").replace("kind: wva", "kind: magic"))
    assert main(["simulate", str(scenario), "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {scenario}: policies[3]") and len(err.splitlines()) == 1
    scenario.write_text(SMALL.format(fleet=ROOT / "examples" / "fleet.yaml").replace("model: Llama-3.1-8B\n", "model: nope\n", 1))
    assert main(["simulate", str(scenario), "-o", str(tmp_path / "r")]) == 2
    assert "model: 'nope' is not a model of the fleet" in capsys.readouterr().err


def test_bundled_default_scenario_is_valid():
    scenario, base = load_scenario(ROOT / "examples" / "scenarios" / "default.yaml")
    prep = prepare(scenario, base)
    plans = plan_runs(prep)
    assert len(prep.trace) > 1000
    assert scenario.multi_model and len(prep.models) == 3
    assert any(p.label == "ours" for p in plans)
    assert {p.model for p in plans if p.role == "tuning"} == set(prep.models)
    for m in prep.per_model:
        assert m.peak_rps > m.mix.arrival_rate_rps
    inventory = {a.name: a.available for a in prep.problem.accelerators}
    assert inventory["H100"] == 8


def test_single_model_example_scenario_is_valid():
    scenario, base = load_scenario(ROOT / "examples" / "scenarios" / "llama70b-chat-wave.yaml")
    prep = prepare(scenario, base)
    assert not scenario.multi_model
    assert prep.peak_rps > prep.mix.arrival_rate_rps
    assert any(p.label.startswith("hpa[") and p.role == "run" for p in plan_runs(prep))


@pytest.mark.parametrize("args", [["--jobs", "0"]])
def test_bad_arguments(tmp_path, capsys, args):
    assert main(["simulate", *args, "-o", str(tmp_path / "r")]) == 2
    assert "--jobs" in capsys.readouterr().err


@pytest.mark.parametrize(("old", "new", "field"), [
    ("- kind: wva", "- kind: wva\n    interval_s: 1.0e-300", "policies[3].interval_s"),
    ("duration_s: 420", "duration_s: .inf", "trace.generated.duration_s"),
    ("seed: 1", "seed: -1", "trace.generated.seed"),
    ("warmup_s: 60", "warmup_s: .nan", "cluster.warmup_s"),
])
def test_scenario_numbers_are_finite_and_bounded(tmp_path, capsys, old, new, field):
    scenario = tmp_path / "bad.yaml"
    text = SMALL.format(fleet=ROOT / "examples" / "fleet.yaml")
    assert old in text
    scenario.write_text(text.replace(old, new))
    assert main(["simulate", str(scenario), "-o", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {scenario}: {field.split('.')[0]}"), err


def test_report_plots_read_at_a_glance(tmp_path):
    """Latency on a log axis (one policy's minutes-long TTFT must not flatten the rest), the Pareto
    title says which way hypervolume is better (issue 13 item 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from optimizer.simulation.evaluation import compare
    from optimizer.simulation.report import report_figures

    scenario = tmp_path / "small.yaml"
    text = SMALL.format(fleet=ROOT / "examples" / "fleet.yaml").replace("duration_s: 420", "duration_s: 240")
    scenario.write_text(text.replace("  - kind: hpa\n    variant: llama8b-a100\n  - kind: inferline\n  - kind: wva\n",
                                     ""))
    spec, base = load_scenario(scenario)
    figures = report_figures(compare(prepare(spec, base, source=str(scenario)), jobs=1), plt)
    try:
        ttft, itl, e2e = figures["latency.png"].axes
        assert ttft.get_title().startswith("TTFT")
        assert [ax.get_xscale() for ax in (ttft, itl, e2e)] == ["log", "log", "log"]
        assert "log scale" in ttft.get_xlabel()
        # plain 1-2-5 labels: matplotlib's default minor labels on a log axis overlap (2x10^-2, 3x10^-2, ...)
        assert all(isinstance(ax.xaxis.get_minor_formatter(), matplotlib.ticker.NullFormatter) for ax in (ttft, itl, e2e))
        assert ttft.xaxis.get_major_formatter()(0.5, 0) == "0.5"
        (pareto,) = [ax for ax in figures["pareto.png"].axes if ax.get_title()]
        assert "higher is better" in pareto.get_title()
        assert pareto.get_xlabel().startswith("cost ($") and "(s, log scale)" in pareto.get_ylabel()
    finally:
        for fig in figures.values():
            plt.close(fig)
