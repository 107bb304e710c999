"""How long the capacity table takes for a fleet of 1000 variants x 10 length buckets.

The operator rebuilds it every cycle; "cold" is the first cycle (or one where every input changed:
nothing cached), "warm" a cycle with unchanged inputs. Target: cold well under 1 s.

    .venv/bin/python -m pytest -q benchmarks/bench_capacity.py --benchmark-columns=min,median,mean,rounds

It also prints how close the model is to the replica simulator: predicted vs simulated max rate
per (example-fleet variant, length mix, percentile), the table tests/test_capacity.py holds to +/-5 %:

    .venv/bin/python -m pytest -q -s benchmarks/bench_capacity.py -k accuracy
"""

from __future__ import annotations

import numpy as np
import pytest

from optimizer.capacity import capacity_table, clear_capacity_cache
from optimizer.fleet import Accelerator, ModelSpec, Role, Variant
from optimizer.problem import Problem
from optimizer.profile import ParametricProfile, ProfilePoint, TabulatedProfile
from optimizer.workload import SLO, LengthBucket, Workload

BUCKETS = [(128, 64), (256, 128), (512, 256), (1024, 128), (2000, 200), (300, 800), (4000, 300), (64, 32),
           (800, 400), (1500, 1000)]
# name, memory GB, bandwidth GB/s, dense TFLOP/s, $/h
ACCELERATORS = [("H100", 80, 3350, 989, 4.0), ("A100-80G", 80, 2039, 312, 2.0), ("L4", 24, 300, 121, 0.8)]


def fleet(n_models: int = 100, variants_per_model: int = 10, seed: int = 7) -> Problem:
    """Roofline-shaped profiles, every fourth one tabulated (measured points), all four roles mixed."""
    rng = np.random.default_rng(seed)
    accs = [Accelerator(name=n, memory_gb=m, cost_per_hour=c) for n, m, _, _, c in ACCELERATORS]
    models, variants, workloads, slos = [], [], [], []
    for i in range(n_models):
        params_b = float(rng.choice([1, 3, 7, 8]))
        kv_bytes = float(rng.choice([65536, 131072, 262144]))
        model = ModelSpec(name=f"model-{i}", weight_gb=2 * params_b, kv_bytes_per_token=kv_bytes)
        models.append(model)
        for j in range(variants_per_model):
            name, _, bw, tflops, _ = ACCELERATORS[j % len(ACCELERATORS)]
            decode_base = model.weight_gb / (0.8 * bw)
            per_token = 2 * params_b * 1e9 / (0.5 * tflops * 1e12)
            if j % 4 == 3:
                profile = TabulatedProfile(
                    decode_points=[ProfilePoint(x=b, time_s=decode_base * f) for b, f in
                                   [(1, 1.0), (16, 1.1), (64, 1.4), (256, 2.5)]],
                    prefill_points=[ProfilePoint(x=t, time_s=0.003 + per_token * t) for t in (16, 512, 4096, 16384)],
                    decode_per_kv_token_s=kv_bytes / (0.8 * bw * 1e9),
                )
            else:
                profile = ParametricProfile(
                    decode_base_s=decode_base, decode_per_seq_s=decode_base / 200,
                    decode_per_kv_token_s=kv_bytes / (0.8 * bw * 1e9),
                    prefill_base_s=0.003, prefill_per_token_s=per_token,
                )
            variants.append(Variant(
                name=f"model-{i}-v{j}", model=model.name, accelerator=name, max_batch=int(rng.choice([32, 64, 128, 256])),
                role=[Role.BOTH, Role.PREFILL, Role.DECODE, Role.BOTH][j % 4], profile=profile,
            ))
        workloads.append(Workload(model=model.name, arrival_rate_rps=10.0, buckets=[
            LengthBucket(input_tokens=a, output_tokens=b, share=1 / len(BUCKETS)) for a, b in BUCKETS]))
        slos.append(SLO(model=model.name, ttft_s=float(rng.choice([0.5, 1.0, 2.0])), itl_s=float(rng.choice([0.05, 0.1]))))
    return Problem(accelerators=accs, models=models, variants=variants, workloads=workloads, slos=slos)


@pytest.fixture(scope="module")
def problem():
    p = fleet()
    capacity_table(p)  # imports, the fluctuation table: once per process, not per cycle
    return p


def test_capacity_table_cold_1000_variants_x_10_buckets(benchmark, problem):
    table = benchmark.pedantic(capacity_table, args=(problem,), setup=clear_capacity_cache, rounds=5, iterations=1)
    assert len(table) == 10_000
    rates = np.array([e.max_rate_rps for e in table.values()])
    print(f"\n10k estimates: {np.mean(rates > 0):.0%} servable, median max rate {np.median(rates[rates > 0]):.2f} rps")


def test_capacity_table_warm_1000_variants_x_10_buckets(benchmark, problem):
    capacity_table(problem)
    table = benchmark(capacity_table, problem)
    assert len(table) == 10_000


def test_accuracy_table_predicted_vs_simulated_max_rate():
    import pathlib
    import time

    from optimizer.problem import load_problem
    from optimizer.simulation.capacity_accuracy import accuracy_cells, format_table

    fleet = load_problem(pathlib.Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml")
    start = time.perf_counter()
    cells = accuracy_cells(fleet, workers=2)
    print("\n" + format_table(cells))
    print(f"({len(cells)} cells, 3000 requests x 8 bisection steps each, {time.perf_counter() - start:.0f} s on 2 workers)")
    assert len(cells) == 48
