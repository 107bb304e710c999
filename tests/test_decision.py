"""The operator's `decide()` when the warm start it is handed cannot help.

The controller keeps the last decision's warm start and hands it to the next cycle's `decide()`. That
warm start may be stale (the fleet was replaced, the inventory was cut) or, through a caller's mistake,
not a warm start at all. Either way the cycle must still get a feasible plan within the inventory, and
`Decision.warm_started` (what /metrics reports as `optimizer_warm_start`) must say truthfully whether
the previous cycle's answer was used.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import pytest
from variant_autoscaler.decision import decide

from optimizer.fleet import Accelerator, ModelSpec, Variant
from optimizer.problem import AllocationOptions, Problem
from optimizer.profile import ParametricProfile
from optimizer.workload import SLO, LengthBucket, Workload

PROFILE = ParametricProfile(decode_base_s=0.02, prefill_per_token_s=1e-4)
# (name, $/h, accelerators available): the two cheap types are scarce, the dear one is not
STOCK = [("big", 3.0, 40), ("mid", 1.5, 14), ("small", 0.6, 8)]


def fleet(n_models: int = 24, prefix: str = "m", stock=STOCK, demand_scale: float = 1.0) -> Problem:
    """`n_models` models with one variant per accelerator type (3 x 24 = 72 integer columns: more than one
    MILP takes whole, so `decide()` decomposes and keeps a warm start) and tight stock. The demand is
    drawn from a fixed seed, so two fleets differing only in `prefix` are the same problem renamed."""
    rng = np.random.default_rng(7)
    models, variants, workloads, slos = [], [], [], []
    for m in range(n_models):
        model = f"{prefix}{m}"
        models.append(ModelSpec(name=model, weight_gb=10, kv_bytes_per_token=1e5))
        short, long = (float(rng.uniform(1.0, 8.0)) * demand_scale, float(rng.uniform(0.2, 2.0)) * demand_scale)
        workloads.append(Workload(model=model, arrival_rate_rps=short + long, buckets=[
            LengthBucket(input_tokens=200, output_tokens=100, share=short / (short + long), name="short"),
            LengthBucket(input_tokens=2000, output_tokens=200, share=long / (short + long), name="long")]))
        slos.append(SLO(model=model, ttft_s=1.0, itl_s=0.05))
        for acc, k in (("big", 1), ("mid", 2), ("small", 1)):
            variants.append(Variant(name=f"{model}-{acc}", model=model, accelerator=acc, accelerators_per_replica=k,
                                    max_batch=64, profile=PROFILE, min_replicas=int(m == 0 and acc == "big")))
    accelerators = [Accelerator(name=n, memory_gb=80, cost_per_hour=c, available=a) for n, c, a in stock]
    return Problem(accelerators=accelerators, models=models, variants=variants, workloads=workloads, slos=slos,
                   options=AllocationOptions(time_limit_s=30.0))


def used(problem: Problem, replicas: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in problem.variants:
        out[v.accelerator] += replicas[v.name] * v.accelerators_per_replica
    return out


def assert_feasible(problem: Problem, decision) -> None:
    """Every variant listed and within its bounds, every accelerator type within its stock, demand served."""
    assert set(decision.replicas) == {v.name for v in problem.variants}
    for v in problem.variants:
        n = decision.replicas[v.name]
        assert n >= v.min_replicas and (v.max_replicas is None or n <= v.max_replicas)
    for a in problem.accelerators:
        assert used(problem, decision.replicas)[a.name] <= a.available, a.name
    assert decision.status in ("optimal", "within_gap") and decision.gap <= problem.options.relative_gap + 1e-12
    assert sum(decision.unmet_demand_rps.values()) <= 1e-6


@pytest.fixture(scope="module")
def before():
    """The previous cycle: a cold decision whose warm start the controller would keep."""
    problem = fleet()
    decision, _ = decide(problem)
    assert not decision.warm_started and decision.warm_start is not None
    assert_feasible(problem, decision)
    # the stock binds: the cheap types are used up to what the cuts below take away
    assert used(problem, decision.replicas)["small"] > 4
    return problem, decision


def test_a_warm_start_from_a_replaced_fleet_is_not_used_and_the_plan_is_the_cold_one(before):
    """Every model and variant renamed (the fleet was replaced): nothing of the previous cycle applies, so the
    decision is a cold start's, says so, and is as good as one."""
    _, previous = before
    renamed = fleet(prefix="n")
    cold, _ = decide(renamed)
    stale, _ = decide(renamed, previous.warm_start)
    assert not stale.warm_started
    assert_feasible(renamed, stale)
    assert stale.replicas == cold.replicas and stale.cost_per_hour == pytest.approx(cold.cost_per_hour)


def test_a_warm_start_that_breaks_the_solve_falls_back_to_a_cold_one(before, caplog):
    """A caller hands the previous `Decision` itself instead of its `warm_start` (no prices, no columns): the
    warm-started solve fails, `decide()` logs it and solves cold, and the cycle still gets the cold plan."""
    problem, previous = before
    with caplog.at_level(logging.WARNING, logger="variant_autoscaler.decision"):
        fallback, _ = decide(problem, previous)
    assert any("solving cold" in r.getMessage() for r in caplog.records)
    assert not fallback.warm_started and fallback.warm_start is not None
    assert_feasible(problem, fallback)
    assert fallback.replicas == previous.replicas and fallback.cost_per_hour == pytest.approx(previous.cost_per_hour)


def test_a_warm_start_after_an_inventory_cut_never_overdraws_the_new_stock(before):
    """The two cheap types cut to half of what the previous plan runs on them, and every model's demand up
    10 %: the previous plan no longer fits, the previous prices are dropped (most models changed) and the
    previous replicas, repaired to the new stock, only seed the master. The plan fits the new stock and
    is no dearer than a cold start's beyond the gap."""
    problem, previous = before
    was = used(problem, previous.replicas)
    cut_stock = [(n, c, was[n] // 2 if n in ("mid", "small") else a) for n, c, a in STOCK]
    cut = fleet(stock=cut_stock, demand_scale=1.1)
    assert any(was[a.name] > a.available for a in cut.accelerators), "the previous plan must not fit"
    warm, _ = decide(cut, previous.warm_start)
    assert warm.warm_started  # the repaired previous replicas were offered
    assert_feasible(cut, warm)
    cold, _ = decide(cut)
    assert not cold.warm_started
    assert warm.cost_per_hour <= cold.cost_per_hour * (1 + 2 * cut.options.relative_gap)
