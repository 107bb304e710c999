"""How fast the simulator is: the Azure conv hour per policy, a million requests, the traffic envelope.

Targets (issue 3): the Azure conv hour (19,366 requests) on a 20-replica heterogeneous fleet in
<= 10 s per policy; 1 M requests in <= 2 min; the envelope takes 1 M arrivals in <= 1 s. The
scaling runs print how simulation time grows with trace length and with fleet size.

    .venv/bin/python -m pytest -q benchmarks/bench_sim_speed.py -s --benchmark-columns=min,mean,rounds
"""

import time
from pathlib import Path

import numpy as np
import pytest

from optimizer.problem import load_problem
from optimizer.simulation.cluster import ClusterOptions, simulate
from optimizer.simulation.envelope import TrafficEnvelope
from optimizer.simulation.evaluation import plan_runs, run_one
from optimizer.simulation.generators import AZURE_CONV_INPUT, GeneratedTrace, PoissonArrivals
from optimizer.simulation.policies.static_peak import StaticPeakPolicy
from optimizer.simulation.routers import make_router
from optimizer.simulation.scenario import FileTrace, Scenario, prepare
from optimizer.simulation.traces import Trace, load_azure_csv

ROOT = Path(__file__).resolve().parents[1]
AZURE = ROOT.parent / "shared" / "data" / "traces" / "azure2023_conv.csv"
FLEET = ROOT / "examples" / "fleet.yaml"
MODEL = "Llama-3.1-8B"
# 20 replicas, four accelerator types.
TWENTY = {"llama8b-h100": 3, "llama8b-a100": 7, "llama8b-l4": 6, "llama8b-t4x2": 4}


def _fleet():
    problem = load_problem(FLEET)
    variants = [v for v in problem.variants if v.model == MODEL]
    return problem.model_copy(update={"variants": variants, "workloads": [],
                                      "slos": [s for s in problem.slos if s.model == MODEL]})


def _azure() -> Trace:
    if not AZURE.exists():
        pytest.skip(f"../shared not present: {AZURE} is missing")
    return load_azure_csv(AZURE, model=MODEL)


def test_envelope_one_million_arrivals(benchmark):
    times = np.sort(np.random.default_rng(0).uniform(0, 3600, 1_000_000))
    weights = np.random.default_rng(1).integers(1, 4000, 1_000_000).astype(float)

    def run():
        env = TrafficEnvelope(horizon_s=60.0)
        env.extend(times, weights)
        return env

    env = benchmark.pedantic(run, rounds=3, iterations=1)
    assert env.count == 1_000_000


@pytest.mark.parametrize("router", ["least-outstanding", "weighted", "round-robin"])
def test_azure_hour_on_twenty_static_replicas(benchmark, router):
    trace = _azure()
    problem = _fleet()
    result = benchmark.pedantic(
        lambda: simulate(problem, trace, StaticPeakPolicy(TWENTY), make_router(router)), rounds=1, iterations=1)
    assert np.isfinite(result.completion_s).sum() + result.dropped.sum() == len(trace)
    print(f"\nAzure conv hour, 20 static replicas, {router}: {result.wall_s:.2f} s")


@pytest.fixture(scope="module")
def azure_prepared():
    _azure()
    scenario = Scenario(name="azure", fleet=str(FLEET), model=MODEL, trace=FileTrace(path=str(AZURE)),
                        policies=[{"kind": "static-peak"}, {"kind": "hpa"}, {"kind": "inferline"}, {"kind": "wva"},
                                  {"kind": "ours"}], pareto=None, cluster=ClusterOptions(warmup_s=300))
    return prepare(scenario, ROOT)


def test_azure_hour_per_policy(benchmark, azure_prepared):
    """Each policy's run of the Azure conv hour, decisions included (ours: capacity model + MILP each interval)."""
    timings = {}

    def run_all():
        for plan in plan_runs(azure_prepared):
            t0 = time.perf_counter()
            out = run_one(azure_prepared, plan)
            timings[plan.label] = (time.perf_counter() - t0, out.metrics.peak_replicas)
        return timings

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    print()
    for label, (secs, peak) in timings.items():
        print(f"Azure conv hour, {label}: {secs:.2f} s (peak {peak} replicas)")
    assert len(timings) >= 5


def _poisson(n_requests: int, rate: float, seed: int = 0) -> Trace:
    spec = GeneratedTrace(arrivals=PoissonArrivals(rate_rps=rate), duration_s=n_requests / rate, seed=seed,
                          model=MODEL, input_lengths=AZURE_CONV_INPUT)
    return spec.build()


def test_one_million_requests(benchmark):
    trace = _poisson(1_000_000, 40.0)
    fleet = {"llama8b-h100": 4, "llama8b-a100": 8, "llama8b-l4": 4, "llama8b-t4x2": 4}
    result = benchmark.pedantic(
        lambda: simulate(_fleet(), trace, StaticPeakPolicy(fleet), make_router("weighted")), rounds=1, iterations=1)
    done = np.isfinite(result.completion_s).sum()
    print(f"\n{len(trace)} requests ({trace.duration_s / 3600:.1f} simulated hours, 20 replicas): "
          f"{result.wall_s:.1f} s, {done} completed")
    assert done + result.dropped.sum() == len(trace)


def test_scaling_with_trace_length_and_fleet_size(benchmark):
    """Seconds of simulation per simulated request as the trace grows, and as fleet and load grow together."""
    problem = _fleet()
    rows = []

    def run():
        for n in (25_000, 50_000, 100_000, 200_000):
            trace = _poisson(n, 10.0, seed=n)
            res = simulate(problem, trace, StaticPeakPolicy({"llama8b-a100": 3}), make_router("least-outstanding"))
            rows.append(("length", n, 3, res.wall_s))
        for k in (1, 2, 4, 8):
            trace = _poisson(20_000 * k, 4.0 * k, seed=k)
            res = simulate(problem, trace, StaticPeakPolicy({"llama8b-a100": 2 * k, "llama8b-l4": 3 * k}),
                           make_router("least-outstanding"))
            rows.append(("fleet", 20_000 * k, 5 * k, res.wall_s))
        return rows

    benchmark.pedantic(run, rounds=1, iterations=1)
    print("\nkind    requests  replicas  wall s   us/request")
    for kind, n, reps, wall in rows:
        print(f"{kind:7s} {n:9d} {reps:9d} {wall:7.2f} {1e6 * wall / n:11.1f}")
    assert len(rows) == 8
