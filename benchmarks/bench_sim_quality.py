"""Does ours beat the baselines? Issue 3's quality goals on the Azure conv hour and a bursty hour.

Goal: ours reaches >= 99 % SLO attainment at >= 30 % lower cost than the best homogeneous HPA-like
baseline, at lower cost than the WVA-style and InferLine-style policies at equal or better
attainment, and with fewer replica changes than HPA-like.

Setup: Llama-3.1-70B on the example fleet (examples/fleet.yaml: H100 x4 and A100 x4 / x8 replicas,
an H100 prefill + A100 decode pair; AWS on-demand prices; 8 H100 and 32 A100 in inventory), SLO
TTFT 2.5 s, ITL 100 ms at p99 (so that 99 % attainment is what the planner aims at). The baselines
are tuned honestly: every PD variant gets HPA runs at several target fractions and the best
homogeneous HPA is the cheapest run reaching 99 %; ours runs at several service levels (its
latency-cost front). Each run is scored after a 5-minute warm-up.

    .venv/bin/python -m pytest -q benchmarks/bench_sim_quality.py -s        # or run this file

Measured (2-core box shared with other jobs; costs are simulated so they do not depend on it):
Azure hour, ours $132.41 / 99.24 % / 7 changes vs best HPA (A100x4 @0.8) $129.45 / 99.46 % / 8;
bursty hour, ours $153.72 / 99.12 % / 12 vs $138.29 / 99.23 % / 9. The goal is NOT met for 70B on
this fleet: ours is 2 % and 11 % dearer. The cheapest way to serve 70B here is H100 prefill + A100
decode, and with 8 H100 at most two prefill replicas exist; past that the A100x4 PD replica the
HPA scales is already the cost-efficient choice, so ours can only match it, and ours plans every
interval for the p99 SLO at its planned rate where the HPA rides out 2-minute bursts on a share
of misses that still leaves it above 99 % for the hour.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from optimizer.simulation.evaluation import Comparison, best_homogeneous_hpa, compare
from optimizer.simulation.generators import BurstyArrivals, GeneratedTrace
from optimizer.simulation.report import format_table
from optimizer.simulation.scenario import FileTrace, Scenario, prepare

ROOT = Path(__file__).resolve().parents[1]
AZURE = ROOT.parent / "shared" / "data" / "traces" / "azure2023_conv.csv"
MODEL = "Llama-3.1-70B"
FLEET = str(ROOT / "examples" / "fleet.yaml")
SLO = {"model": MODEL, "ttft_s": 2.5, "itl_s": 0.1, "percentile": 99}
HPA_FRACTIONS = (0.4, 0.6, 0.8)
SERVICE_LEVELS = [0.8, 0.9, 1.0]
OURS = {"service_level": 1.0, "lead_time_s": 60.0, "rate_windows_s": [120.0]}
"""Ours as tuned on these two traces (like the HPA's target sweep): plan at the full p99 capacity
(the capacity model accounts for the spread of lengths), extrapolate the trend over 60 s rather
than a whole 110 s cold start (bursts end before capacity ordered for their extrapolation arrives)
and take the envelope over 120 s windows. `ours-defaults` is the spec's defaults at level 1.0."""


SMALL_MODEL = "Llama-3.1-8B"
SMALL_SLO = {"model": SMALL_MODEL, "ttft_s": 1.5, "itl_s": 0.1, "percentile": 99}
SMALL_SPEEDUP = 4.0
"""Second scenario: Llama-3.1-8B on the example fleet's H100 / A100 / L4 / T4x2 PD variants and its
A100 prefill + L4 decode pair, where cheap accelerators can serve short prompts; the same two
traces at 4x the rate (an 8B replica serves several times what a 70B one does). Caveat: the Azure
hour replayed at 4x lasts 15 minutes, 10 of them scored. Measured: bursty 4x, ours $33.43 / 98.55 %
vs best HPA (H100 @0.4) $41.71 / 100 % and static A100 peak $32.86 / 100 %; ours@0.8 $41.67 / 99.46 %.
Azure 4x: ours at level 1.0 reaches only 89 % and ours@0.8 98.21 % ($7.95; HPA $8.12 / 99.51 %):
for 8B the capacity model is still optimistic at p99, not yet understood. (Re-measured after the
service level stopped being applied twice; the 70B figures above did not change.)"""


def scenario(name: str, trace, model: str = MODEL, slo: dict = SLO) -> Scenario:
    policies = [{"kind": "static-peak"}]
    policies += [{"kind": "hpa", "target_fraction": f, "name": f"hpa{int(100 * f)}"} for f in HPA_FRACTIONS]
    policies += [{"kind": "inferline"}, {"kind": "wva"}, {"kind": "ours", **OURS},
                 {"kind": "ours", **OURS, "change_penalty": 0, "name": "ours-no-penalty"},
                 {"kind": "ours", "service_level": 1.0, "name": "ours-defaults"}]
    return Scenario(name=name, fleet=FLEET, model=model, slo=slo, trace=trace,
                    cluster={"warmup_s": 300}, policies=policies,
                    pareto={"service_levels": SERVICE_LEVELS, "latency": "e2e"})


def bursty_trace(scale: float = 1.0) -> GeneratedTrace:
    return GeneratedTrace(duration_s=3600, seed=7,
                          arrivals=BurstyArrivals(base_rps=3.0 * scale, burst_rps=7.0 * scale, mean_calm_s=300,
                                                  mean_burst_s=120))


def verdict(c: Comparison) -> list[str]:
    by = {o.plan.label: o.metrics for o in c.outcomes}
    ours = by["ours"]
    lines = [f"ours: ${ours.cost:.2f}, SLO {100 * ours.slo_attainment:.2f} %, {ours.replica_changes} replica changes"]
    best = best_homogeneous_hpa(c)
    if best is not None:
        b = best.metrics
        lines.append(f"best homogeneous HPA: {best.plan.label} ${b.cost:.2f}, SLO {100 * b.slo_attainment:.2f} %, "
                     f"{b.replica_changes} changes -> ours saves {100 * (1 - ours.cost / b.cost):.1f} %")
    for label, m in by.items():
        if label.startswith(("inferline", "wva")):
            lines.append(f"{label}: ${m.cost:.2f}, SLO {100 * m.slo_attainment:.2f} % -> ours "
                         f"{'cheaper' if ours.cost < m.cost else 'dearer'} by {100 * abs(1 - ours.cost / m.cost):.1f} %, "
                         f"attainment {'>=' if ours.slo_attainment >= m.slo_attainment else '<'}")
    ours_at = [o for o in c.outcomes if o.plan.pareto and o.metrics.slo_attainment >= 0.99]
    if ours_at:
        cheapest = min(ours_at, key=lambda o: o.metrics.cost)
        lines.append(f"cheapest ours at >= 99 %: {cheapest.plan.label} (service level {cheapest.plan.service_level:g}) "
                     f"${cheapest.metrics.cost:.2f}")
    lines.append("hypervolume: " + ", ".join(f"{k} {v:.3f}" for k, v in c.hypervolume.items()))
    return lines


def run(name: str, trace, model: str = MODEL, slo: dict = SLO) -> Comparison:
    t0 = time.perf_counter()
    prep = prepare(scenario(name, trace, model, slo), ROOT)
    comparison = compare(prep)
    print(f"\n== {name}: {len(prep.trace)} requests, peak {prep.peak_rps:.2f} req/s over 60 s, "
          f"per-replica capacity {', '.join(f'{k} {v:.2f}' for k, v in prep.mix_capacity_rps.items())} "
          f"({time.perf_counter() - t0:.0f} s)")
    print(format_table(comparison))
    print("\n".join(verdict(comparison)))
    return comparison


def _check(c: Comparison) -> None:
    for o in c.outcomes:
        assert o.metrics.completed + o.metrics.dropped == o.metrics.requests


def test_quality_azure_conv_hour():
    if not AZURE.exists():
        pytest.skip(f"../shared not present: {AZURE} is missing")
    _check(run("Azure conv hour", FileTrace(path=str(AZURE))))


def test_quality_bursty_hour():
    _check(run("bursty synthetic hour", bursty_trace()))


def test_quality_8b_azure_conv_hour_4x():
    if not AZURE.exists():
        pytest.skip(f"../shared not present: {AZURE} is missing")
    _check(run("8B, Azure conv hour at 4x", FileTrace(path=str(AZURE), speedup=SMALL_SPEEDUP), SMALL_MODEL, SMALL_SLO))


def test_quality_8b_bursty_hour_4x():
    _check(run("8B, bursty hour at 4x", bursty_trace(SMALL_SPEEDUP), SMALL_MODEL, SMALL_SLO))


if __name__ == "__main__":
    import sys

    if "--8b-only" not in sys.argv:
        if AZURE.exists():
            run("Azure conv hour", FileTrace(path=str(AZURE)))
        run("bursty synthetic hour", bursty_trace())
    if AZURE.exists():
        run("8B, Azure conv hour at 4x", FileTrace(path=str(AZURE), speedup=SMALL_SPEEDUP), SMALL_MODEL, SMALL_SLO)
    run("8B, bursty hour at 4x", bursty_trace(SMALL_SPEEDUP), SMALL_MODEL, SMALL_SLO)
