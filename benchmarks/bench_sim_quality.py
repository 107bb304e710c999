"""Does ours beat what users run today? Every quality scenario, every policy, losses reported as plainly as wins.

    .venv/bin/python benchmarks/bench_sim_quality.py                # every scenario (~10-20 min on 2 cores)
    .venv/bin/python benchmarks/bench_sim_quality.py default code8b # some of them
    .venv/bin/python -m pytest -q benchmarks/bench_sim_quality.py -s

Scenarios (the example fleet, examples/fleet.yaml: 8 H100, 32 A100-80G, 32 L4, 32 T4, AWS prices;
SLOs at p99 so that 99 % attainment is what every planner aims at; 5 minutes of warm-up not scored):

* `default`     -- the demo: three models sharing the fleet (examples/scenarios/default.yaml).
* `azure70b`    -- Llama-3.1-70B on the real Azure LLM inference trace (conversation, 2023), one hour
                   (../shared/data; skipped when absent). Ours' defaults were never tuned on it.
* `bursty70b`   -- 70B on a Markov-modulated hour: 3 <-> 7 req/s, bursts of ~2 min.
* `azure8b4x`   -- Llama-3.1-8B on the Azure hour replayed at 4x (15 min, 10 scored).
* `bursty8b4x`  -- 8B on the bursty hour at 4x.
* `code8b`      -- 8B on code-completion-shaped traffic: prompts ~2k tokens, answers ~28, 5 s bursts at
                   8x the level about 40 times an hour (the issue's public code trace: bursts to 33 req/s
                   between quiet minutes).
* `longctx70b`  -- 70B on long-context conversations: prompts ~8k tokens median, p99 ~70k.

Baselines are tuned as fairly as ours: the HPA runs every PD variant at target fractions 0.4-1.0 and
the cheapest run at 99 % is its best (with several models: each model tuned alone, then run together,
plus the best fit of those picks to the inventory). For `code8b` and `longctx70b` a small search over
fixed fleets (every PD variant at 1..N replicas, and P/D pairs) finds the cheapest fixed fleet at 99 %,
the bar of issue 16. The verdict lines come from optimizer/simulation/verdict.py: costs are compared
only between runs that both reach 99 %.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from optimizer.fleet import Role
from optimizer.simulation.cluster import ClusterSimulator
from optimizer.simulation.evaluation import ATTAINMENT_TARGET, Comparison, compare
from optimizer.simulation.generators import (
    BurstyArrivals,
    FluctuatingArrivals,
    GeneratedTrace,
    LogNormalLengths,
)
from optimizer.simulation.metrics import summarize
from optimizer.simulation.policies.static_peak import StaticPeakPolicy
from optimizer.simulation.report import format_table
from optimizer.simulation.routers import make_router
from optimizer.simulation.scenario import FileTrace, Prepared, Scenario, load_scenario, prepare

ROOT = Path(__file__).resolve().parents[1]
AZURE = ROOT.parent / "shared" / "data" / "traces" / "azure2023_conv.csv"
FLEET = str(ROOT / "examples" / "fleet.yaml")
BIG, SMALL = "Llama-3.1-70B", "Llama-3.1-8B"
SLOS = {BIG: {"model": BIG, "ttft_s": 2.5, "itl_s": 0.1, "percentile": 99},
        SMALL: {"model": SMALL, "ttft_s": 1.5, "itl_s": 0.1, "percentile": 99}}
LONG_SLO = {"model": BIG, "ttft_s": 10.0, "itl_s": 0.1, "percentile": 99}
POLICIES = [{"kind": "static-peak"}, {"kind": "hpa", "target_fractions": [0.4, 0.6, 0.8, 1.0]},
            {"kind": "inferline"}, {"kind": "wva"}, {"kind": "ours", "service_level": 1.0}]
PARETO = {"service_levels": [0.8, 0.9, 1.0], "latency": "e2e"}


def bursty(scale: float = 1.0) -> GeneratedTrace:
    return GeneratedTrace(duration_s=3600, seed=7, arrivals=BurstyArrivals(
        base_rps=3.0 * scale, burst_rps=7.0 * scale, mean_calm_s=300, mean_burst_s=120))


def code_trace() -> GeneratedTrace:
    return GeneratedTrace(
        duration_s=1800, seed=21, name="code-completion bursts",
        arrivals=FluctuatingArrivals(mean_rps=3.0, amplitude=0.3, period_s=1800, bursts_per_hour=40, burst_s=5,
                                     burst_factor=8.0),
        input_lengths=LogNormalLengths(log_mean=7.5, log_std=0.6, min_tokens=64, max_tokens=8000),
        output_lengths=LogNormalLengths(log_mean=3.3, log_std=0.7, min_tokens=2, max_tokens=256))


def long_context_trace() -> GeneratedTrace:
    return GeneratedTrace(
        duration_s=1800, seed=31, name="long-context conversations",
        arrivals=FluctuatingArrivals(mean_rps=0.2, amplitude=0.3, period_s=1800),
        input_lengths=LogNormalLengths(log_mean=9.0, log_std=0.95, min_tokens=500, max_tokens=100_000),
        output_lengths=LogNormalLengths(log_mean=5.3, log_std=0.8, min_tokens=8, max_tokens=2000))


def single(name: str, model: str, trace, slo: dict | None = None) -> Scenario:
    return Scenario(name=name, fleet=FLEET, model=model, slo=slo or SLOS[model], trace=trace,
                    cluster={"warmup_s": 300}, policies=POLICIES, pareto=PARETO)


def scenarios() -> dict[str, tuple[Scenario, Path] | None]:
    azure = AZURE.exists()
    return {
        "default": load_scenario(ROOT / "examples" / "scenarios" / "default.yaml"),
        "azure70b": (single("70B, Azure conv hour", BIG, FileTrace(path=str(AZURE))), ROOT) if azure else None,
        "bursty70b": (single("70B, bursty hour", BIG, bursty()), ROOT),
        "azure8b4x": (single("8B, Azure conv hour at 4x", SMALL, FileTrace(path=str(AZURE), speedup=4.0)), ROOT)
        if azure else None,
        "bursty8b4x": (single("8B, bursty hour at 4x", SMALL, bursty(4.0)), ROOT),
        "code8b": (single("8B, code-completion bursts", SMALL, code_trace()), ROOT),
        "longctx70b": (single("70B, long-context conversations", BIG, long_context_trace(), LONG_SLO), ROOT),
    }


FIXED_FLEET_SEARCH = {"code8b", "longctx70b"}


def _fixed_fleets(prep: Prepared, limit: int = 8) -> list[dict[str, int]]:
    """Every PD variant at 1..limit replicas and P/D pairs up to 3 + 3, within inventory."""
    inventory = {a.name: a.available for a in prep.problem.accelerators}
    variants = prep.problem.variants
    fleets = [{v.name: n} for v in variants if v.role is Role.BOTH for n in range(1, limit + 1)]
    pre = [v for v in variants if v.role is Role.PREFILL]
    dec = [v for v in variants if v.role is Role.DECODE]
    for p, d in itertools.product(pre, dec):
        for a, b in itertools.product(range(1, 4), range(1, 4)):
            fleets.append({p.name: a, d.name: b})

    def fits(fleet):
        used = {}
        for name, n in fleet.items():
            v = next(x for x in variants if x.name == name)
            used[v.accelerator] = used.get(v.accelerator, 0) + n * v.accelerators_per_replica
        return all(inventory.get(acc) is None or n <= inventory[acc] for acc, n in used.items())

    return [f for f in fleets if fits(f)]


_PREP: Prepared | None = None


def _init(prep: Prepared) -> None:
    global _PREP
    _PREP = prep


def _run_fixed(fleet: dict[str, int]):
    prep = _PREP
    result = ClusterSimulator(prep.problem, prep.trace, StaticPeakPolicy(fleet, name="fixed"),
                              make_router("least-outstanding"), prep.scenario.cluster).run()
    return fleet, summarize(result, {s.model: s for s in prep.problem.slos})


def cheapest_fixed_fleet(prep: Prepared):
    """The cheapest fixed fleet at the attainment target, by a small exhaustive search (None if none)."""
    fleets = _fixed_fleets(prep)
    with ProcessPoolExecutor(initializer=_init, initargs=(prep,)) as pool:
        results = list(pool.map(_run_fixed, fleets))
    good = [(m.cost, fleet, m) for fleet, m in results if m.slo_attainment >= ATTAINMENT_TARGET]
    return (min(good, key=lambda x: x[0]), len(fleets)) if good else (None, len(fleets))


def run(key: str) -> Comparison | None:
    entry = scenarios()[key]
    if entry is None:
        print(f"\n== {key}: skipped ({AZURE} is missing)")
        return None
    scenario, base = entry
    t0 = time.perf_counter()
    prep = prepare(scenario, base)
    comparison = compare(prep)
    print(f"\n== {key}: {scenario.name}: {len(prep.trace)} requests ({time.perf_counter() - t0:.0f} s)")
    for m in prep.per_model:
        caps = ", ".join(f"{v.name} {prep.mix_capacity_rps[v.name]:.2f}" for v in prep.variants_of(m.model))
        print(f"   {m.model}: mean {m.mix.arrival_rate_rps:.2f} req/s, peak {m.peak_rps:.2f} over 60 s; "
              f"one replica at SLO for the mix: {caps}")
    print(format_table(comparison))
    print("hypervolume (P90 E2E vs cost):", ", ".join(f"{k} {v:.3f}" for k, v in comparison.hypervolume.items()))
    print("hypervolume, runs at >= 99 % only:",
          ", ".join(f"{k} {v:.3f}" for k, v in comparison.hypervolume_at_target.items()))
    if key in FIXED_FLEET_SEARCH:
        best, tried = cheapest_fixed_fleet(prep)
        ours = next(o.metrics for o in comparison.outcomes if o.plan.label == "ours")
        if best is None:
            print(f"fixed fleets: none of {tried} reaches 99 %")
        else:
            cost, fleet, m = best
            word = "less" if ours.cost < cost else "more"
            print(f"cheapest fixed fleet at >= 99 % ({tried} tried): {fleet} ${cost:.2f} at "
                  f"{100 * m.slo_attainment:.2f} %; ours ${ours.cost:.2f} at {100 * ours.slo_attainment:.2f} % "
                  f"costs {100 * abs(1 - ours.cost / cost):.1f} % {word}"
                  + ("" if ours.slo_attainment >= ATTAINMENT_TARGET else " but misses the target"))
    for o in comparison.outcomes:
        assert o.metrics.completed + o.metrics.dropped == o.metrics.requests
    return comparison


@pytest.mark.parametrize("key", list(scenarios()))
def test_quality(key):
    if scenarios()[key] is None:
        pytest.skip(f"../shared not present: {AZURE} is missing")
    comparison = run(key)
    assert math.isfinite(comparison.outcomes[0].metrics.cost)


if __name__ == "__main__":
    for key in sys.argv[1:] or list(scenarios()):
        if key not in scenarios():
            raise SystemExit(f"unknown scenario {key!r}; known: {', '.join(scenarios())}")
        run(key)
