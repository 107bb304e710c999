"""`variant-autoscaler place`: runs end to end on a small cluster; bad files give one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from optimizer.placement.cluster import load_cluster
from optimizer.problem import InputError, Problem

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "examples" / "clusters" / "helix_small10.yaml"


def place(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "variant_autoscaler", "place", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=240)


def test_place_with_ablation_plot_and_output_on_small_cluster(tmp_path):
    out, plot = tmp_path / "place.json", tmp_path / "graph.png"
    r = place(str(SMALL), "--time-limit", "3", "--group-time-limit", "1", "--ablation", "--seeds", "3",
              "--plot", str(plot), "--output", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for words in ("P/D groups", "layer placement", "bottleneck", "upper bound", "spectral+KL", "random", "greedy",
                  "bandwidth sweep"):
        assert words in r.stdout, words
    report = json.loads(out.read_text())
    layers = report["layer_placement"]
    covered = sorted(layer for rg in layers["placement"]["ranges"]
                     for layer in range(rg["start"], rg["start"] + rg["layers"]))
    assert set(covered) == set(range(60))
    assert layers["max_flow"] > 0 and layers["max_flow"] <= layers["bound"]["upper_bound"] + 1e-6
    assert {row["method"].split()[0] for row in report["ablation"]} == {"spectral+KL", "random", "greedy"}
    assert [p["bandwidth_gbps"] for p in report["bandwidth_sweep"]] == sorted(
        (p["bandwidth_gbps"] for p in report["bandwidth_sweep"]), reverse=True)
    Problem.model_validate({**report["plan_fragment"], "workloads": [], "slos": []})
    assert plot.stat().st_size > 10_000
    assert (tmp_path / "graph_bandwidth.png").stat().st_size > 10_000


def test_bad_cluster_file_is_one_line_naming_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMALL.read_text().replace("type: T4, count: 6", "type: H200, count: 6"))
    r = place(str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith(f"error: {bad}: nodes[1].type: unknown machine type 'H200'")


def test_unknown_model_and_missing_profiles_are_input_errors(tmp_path):
    r = place(str(SMALL), "--model", "gpt-5", cwd=tmp_path)
    assert r.returncode == 2 and "--model" in r.stderr and "llama-30b" in r.stderr
    r = place(str(SMALL), "--profiles", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert r.returncode == 2 and "--profiles" in r.stderr


def test_bandwidth_needs_exactly_one_unit(tmp_path):
    bad = tmp_path / "units.yaml"
    bad.write_text(SMALL.read_text().replace("default: {gb_s: 1, latency_ms: 1}",
                                             "default: {gb_s: 1, gbps: 8, latency_ms: 1}"))
    with pytest.raises(InputError) as err:
        load_cluster(bad)
    assert err.value.field == "network.default" and "exactly one" in err.value.reason


def test_placement_figure_has_axis_labels_units_and_a_colour_legend():
    """Both panels say what the axes are, the units, and which colour is which machine type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from variant_autoscaler.commands.place import placement_figure

    from optimizer.placement.grouping import grouping_model, spectral_kl_grouping
    from optimizer.placement.layers import place_layers
    from optimizer.placement.throughput import NodeThroughputModel, layer_time_sources

    cluster = load_cluster(str(SMALL))
    model = cluster.model(None)
    times = layer_time_sources(cluster, model, None)
    grouping = spectral_kl_grouping(grouping_model(cluster, model, times), time_limit_s=1)
    layers = place_layers(cluster, model, NodeThroughputModel(cluster, model, times), time_limit_s=2)
    fig = placement_figure(plt, cluster, grouping, layers)
    try:
        layer_ax, group_ax = fig.axes
        machine_types = {n.machine.name for n in cluster.nodes}
        for ax in (layer_ax, group_ax):
            assert ax.get_xlabel() and ax.get_ylabel()
            legend = ax.get_legend()
            assert legend is not None and "colour = machine type" in legend.get_title().get_text()
            labels = [t.get_text() for t in legend.get_texts()]
            assert {f"{m} nodes" for m in machine_types} <= set(labels)
        assert "tokens/s" in layer_ax.get_title() and "tokens/s" in layer_ax.get_ylabel()
        assert "requests/s" in group_ax.get_title()
        assert any("requests/s" in t.get_text() for t in group_ax.get_legend().get_texts())
    finally:
        plt.close(fig)
