"""Held-out traffic: the same decision code on multi-model traffic it was never tuned on.

`benchmarks/bench_sim_quality.py` holds the scenarios the policy was developed against. A saving
that holds only there is worth nothing, so this file keeps scenarios nobody tunes on: other
random draws of the default demo (new seeds, peaks in another order), and mixes with shapes the
default does not have (the real Azure conversation hour at 2x for the small model (the quality benchmark replays it at 4x, alone),
Markov bursts for the mid-size one, code-style 5 s bursts for the large one). They are frozen
here; when a policy change moves these figures, report them, do not retune to them.

Each run is the full comparison of `variant-autoscaler simulate` (static peak, per-model HPAs tuned
alone then run together and fitted to inventory, InferLine, WVA-style saturation, ours), with the
verdict lines of optimizer/simulation/verdict.py: costs compared only between runs at >= 99 %.

    .venv/bin/python benchmarks/bench_sim_heldout.py                 # every held-out scenario (~2-3 min on 2 cores)
    .venv/bin/python benchmarks/bench_sim_heldout.py seeds-a         # one of them
    .venv/bin/python benchmarks/bench_sim_heldout.py draws           # six draws of the default, 13-18 (~15 min at load 3-5)
    .venv/bin/python benchmarks/bench_sim_heldout.py draws 19 24     # other draws (the next ones nobody has seen)
    .venv/bin/python -m pytest -q benchmarks/bench_sim_heldout.py -o python_files='bench_*.py' -s
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import pytest
import yaml

from optimizer.simulation.evaluation import compare
from optimizer.simulation.report import format_table
from optimizer.simulation.scenario import Scenario, prepare
from optimizer.simulation.verdict import verdict

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "examples" / "scenarios" / "default.yaml"
AZURE = ROOT.parent / "shared" / "data" / "traces" / "azure2023_conv.csv"


def _default_with(seeds: dict[str, int], phases: dict[str, float] | None = None, name: str = "") -> dict:
    """The default demo's document with other trace seeds (and optionally other peak phases)."""
    doc = yaml.safe_load(DEFAULT.read_text())
    doc["name"] = name
    for entry in doc["models"]:
        entry["trace"]["seed"] = seeds[entry["model"]]
        if phases:
            entry["trace"]["arrivals"]["phase"] = phases[entry["model"]]
    return doc


def _mixed_shapes() -> dict | None:
    """Three models, three traffic shapes the default never shows; None without ../shared."""
    if not AZURE.exists():
        return None
    doc = yaml.safe_load(DEFAULT.read_text())
    doc["name"] = "held-out: Azure hour at 2x (8B), Markov bursts (32B), code-style bursts (70B), 30 min"
    traces = {
        "Llama-3.1-8B": {"source": "file", "path": str(AZURE), "speedup": 2.0},
        "Qwen2.5-32B": {"source": "generated", "duration_s": 1800, "seed": 303,
                        "arrivals": {"kind": "bursty", "base_rps": 2.5, "burst_rps": 6.0,
                                     "mean_calm_s": 240, "mean_burst_s": 90}},
        "Llama-3.1-70B": {"source": "generated", "duration_s": 1800, "seed": 304,
                          "arrivals": {"kind": "fluctuating", "mean_rps": 2.5, "amplitude": 0.3,
                                       "period_s": 1800, "phase": 0.1, "bursts_per_hour": 20,
                                       "burst_s": 5, "burst_factor": 4.0}},
    }
    for entry in doc["models"]:
        entry["trace"] = traces[entry["model"]]
    return doc


def scenarios() -> dict[str, dict | None]:
    return {
        "seeds-a": _default_with({"Llama-3.1-8B": 101, "Qwen2.5-32B": 102, "Llama-3.1-70B": 103},
                                 name="held-out: default demo, seeds 101-103"),
        "seeds-b": _default_with({"Llama-3.1-8B": 201, "Qwen2.5-32B": 202, "Llama-3.1-70B": 203},
                                 {"Llama-3.1-8B": 0.25, "Qwen2.5-32B": -0.25, "Llama-3.1-70B": 0.0},
                                 name="held-out: default demo, seeds 201-203, peaks in another order"),
        "mixed-shapes": _mixed_shapes(),
    }


FRESH_DRAWS = range(13, 19)
"""Draw k shifts every seed of the default demo by 1000 k. Draws 1-6 chose the forecast's settings
(its upper band, the scale-down window) and 7-12 its error headroom (forecast_error_z), so they are
not held out any more; 13-18 were first run at 0f6d031 (README); the next honest check is 19 on."""


def draw(k: int) -> dict:
    doc = yaml.safe_load(DEFAULT.read_text())
    seeds = {entry["model"]: entry["trace"]["seed"] + 1000 * k for entry in doc["models"]}
    return _default_with(seeds, name=f"held-out: default demo, draw {k} (seeds + {1000 * k})")


def draw_row(k: int, comparison) -> dict:
    """One draw's verdict in numbers: the saving only where both sides reach the target."""
    v = verdict(comparison)
    ours = next(o.metrics for o in comparison.outcomes if o.plan.label == "ours")
    return {"draw": k, "ours_cost": ours.cost, "lowest_model_pct": 100 * min(m.slo_attainment for m in ours.per_model),
            "baseline": v.baseline, "saving": v.saving, "line": v.lines[0] if v.lines else ""}


def summarize_draws(rows: list[dict]) -> str:
    """Median and range of the saving over the draws where it compares, and how many ours lost or missed."""
    savings = sorted(r["saving"] for r in rows if r["saving"] is not None)
    if not savings:
        return f"no draw of {len(rows)} compares (someone misses the target on each)"
    mid = statistics.median(savings)
    losses = sum(s < 0 for s in savings)
    missed = sum(r["lowest_model_pct"] < 99.0 for r in rows)
    return (f"{len(savings)} of {len(rows)} draws compare: median saving {100 * mid:.1f} %, range "
            f"{100 * savings[0]:.1f} % to {100 * savings[-1]:.1f} %; ours costs more on {losses}; "
            f"ours has a model under 99 % on {missed}")


def run_draws(ks=FRESH_DRAWS) -> list[dict]:
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        comparison = compare(prepare(Scenario.model_validate(draw(k)), DEFAULT.parent))
        rows.append(draw_row(k, comparison))
        r = rows[-1]
        print(f"draw {k:2d} ({time.perf_counter() - t0:3.0f} s): ours ${r['ours_cost']:.2f}, lowest model "
              f"{r['lowest_model_pct']:.2f} %: {r['line']}", flush=True)
    print(summarize_draws(rows))
    return rows


def run(key: str):
    doc = scenarios()[key]
    if doc is None:
        print(f"\n== {key}: skipped ({AZURE} is missing)")
        return None
    t0 = time.perf_counter()
    prep = prepare(Scenario.model_validate(doc), DEFAULT.parent)
    comparison = compare(prep)
    print(f"\n== {key}: {doc['name']}: {len(prep.trace)} requests ({time.perf_counter() - t0:.0f} s)")
    print(format_table(comparison))  # ends with the verdict lines
    return comparison


@pytest.mark.parametrize("key", list(scenarios()))
def test_heldout(key):
    if scenarios()[key] is None:
        pytest.skip(f"../shared not present: {AZURE} is missing")
    comparison = run(key)
    ours = next(o.metrics for o in comparison.outcomes if o.plan.label == "ours")
    assert math.isfinite(ours.cost) and 0.0 <= ours.slo_attainment <= 1.0
    for o in comparison.outcomes:  # every request of every run is accounted for: served or dropped
        assert o.metrics.completed + o.metrics.dropped == o.metrics.requests, o.plan.label


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["draws"]:  # draws [FIRST LAST]: FRESH_DRAWS, or draws FIRST..LAST
        run_draws(range(int(args[1]), int(args[2]) + 1) if len(args) == 3 else FRESH_DRAWS)
    else:
        for key in args or list(scenarios()):
            run(key)
