"""Flow-controlled routers (issue 15 item 4): llm-d's utilization detector and ours.

Hand-built pools check the formulas and the dispatch rules; a small simulated cluster checks that
requests are held at the pool (FIFO) and that no replica ever runs more than its SLO concurrency.
"""

from dataclasses import dataclass

import numpy as np
import pytest

from optimizer.capacity import replica_capacity
from optimizer.fleet import Accelerator, ModelSpec, Variant
from optimizer.problem import AllocationOptions, Problem
from optimizer.profile import ParametricProfile
from optimizer.simulation.cluster import ClusterOptions, simulate
from optimizer.simulation.generators import GeneratedTrace, LogNormalLengths, PoissonArrivals
from optimizer.simulation.policy import Decision, RouteGuidance
from optimizer.simulation.routers import ROUTERS, OursFlowRouter, UtilizationFlowRouter, make_router
from optimizer.workload import SLO, LengthBucket, Workload

MODEL = "m"
KEY = f"{MODEL}/entry"
PROFILE = ParametricProfile(decode_base_s=0.02, decode_per_seq_s=1e-3, decode_per_kv_token_s=1e-8,
                            prefill_base_s=0.02, prefill_per_token_s=2e-4)


@dataclass
class Endpoint:
    """A hand-built replica as a router sees it (the RoutableReplica protocol plus metrics)."""

    id: str
    variant: str
    outstanding: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    draining: bool = False
    stale: bool = False
    created_s: float = 0.0
    index: int = 0


def test_utilization_detector_is_llm_d_formula():
    pool = [Endpoint("a", "v", waiting=2, kv_usage=0.2),    # max(0.4, 0.25) = 0.4
            Endpoint("b", "v", waiting=0, kv_usage=0.6),    # max(0, 0.75) = 0.75
            Endpoint("c", "v", waiting=9, kv_usage=0.9, stale=True),  # stale: 1.0
            Endpoint("d", "v", waiting=50, kv_usage=1.0, draining=True)]  # not an endpoint
    router = UtilizationFlowRouter()
    assert router.saturation(pool) == pytest.approx((0.4 + 0.75 + 1.0) / 3)
    assert router.pick(KEY, pool).id in {"a", "b", "c"}
    # At exactly 1.0 the pool holds: mean of 1.0 (queue 5 / 5) and 1.0 (KV 0.8 / 0.8).
    full = [Endpoint("a", "v", waiting=5), Endpoint("b", "v", kv_usage=0.8)]
    assert router.saturation(full) == pytest.approx(1.0)
    assert router.pick(KEY, full) is None
    assert router.saturation([Endpoint("x", "v", draining=True)]) == 1.0  # no endpoint: fail closed


def test_ours_saturation_holds_at_slo_concurrency_and_never_overfills_a_replica():
    router = OursFlowRouter()
    router.set_concurrency({"A": 4, "B": 2})
    pool = [Endpoint("a1", "A", outstanding=4), Endpoint("a2", "A", outstanding=1), Endpoint("b1", "B", outstanding=1)]
    assert router.saturation(pool) == pytest.approx(6 / 10)
    router.set_guidance([RouteGuidance(model=MODEL, weights={"A": 1.0})])
    # a1 is at its concurrency: the weights' pick among A is a2 until it is full too.
    picks = []
    for _ in range(4):
        rep = router.pick(KEY, pool)
        picks.append(rep.id)
        rep.outstanding += 1
    assert picks[:3] == ["a2", "a2", "a2"]
    assert picks[3] == "b1", "A is full: the replica with room takes it, the weights notwithstanding"
    assert router.saturation(pool) == pytest.approx(1.0)
    assert router.pick(KEY, pool) is None
    assert all(r.outstanding <= router.concurrency(r) for r in pool)


def test_ours_follows_weights_over_many_dispatches():
    router = OursFlowRouter()
    router.set_concurrency({"A": 10_000, "B": 10_000})
    pool = [Endpoint("a1", "A"), Endpoint("a2", "A"), Endpoint("b1", "B")]
    router.set_guidance([RouteGuidance(model=MODEL, weights={"A": 0.7, "B": 0.3})], {"A": 2, "B": 1})
    variants = []
    for k in range(1000):
        rep = router.pick(KEY, pool)
        variants.append(rep.variant)
        rep.outstanding += 1
        if k % 3 == 0:  # completions keep loads comparable, so the spill bound stays out of the way
            for r in pool:
                r.outstanding = max(0, r.outstanding - 1)
    assert variants.count("A") / len(variants) == pytest.approx(0.7, abs=0.03)


def flow_fleet() -> Problem:
    slo = SLO(model=MODEL, ttft_s=1.0, itl_s=0.1)
    return Problem(
        accelerators=[Accelerator(name="gpu", memory_gb=80, cost_per_hour=2.0, available=8)],
        models=[ModelSpec(name=MODEL, weight_gb=16.0, kv_bytes_per_token=131072.0)],
        variants=[Variant(name="v", model=MODEL, accelerator="gpu", max_batch=64, profile=PROFILE)],
        slos=[slo],
        workloads=[Workload(model=MODEL, arrival_rate_rps=5.0, buckets=[
            LengthBucket(input_tokens=400, output_tokens=80, share=0.7),
            LengthBucket(input_tokens=2000, output_tokens=200, share=0.3)])],
        options=AllocationOptions(),
    )


def test_bind_takes_concurrency_from_the_capacity_model_by_littles_law():
    problem = flow_fleet()
    router = OursFlowRouter()
    router.bind(problem)
    v = problem.variants[0]
    ests = [(b.share, replica_capacity(v, problem.models[0], problem.accelerators[0], b, problem.slos[0]))
            for b in problem.workloads[0].buckets]
    assert all(e.max_rate_rps > 0 for _, e in ests)
    rate = 1.0 / sum(f / e.max_rate_rps for f, e in ests)
    held = rate * sum(f * e.e2e_s for f, e in ests)
    assert router.concurrency(Endpoint("x", "v")) == max(1, int(held))
    assert 1 <= router.concurrency(Endpoint("x", "v")) <= v.max_batch


class Fixed:
    """A policy holding a fixed fleet; it records each tick's busiest replica (an input, not a mock)."""

    def __init__(self, replicas: int):
        self.name = "fixed"
        self.interval_s = 0.5
        self.replicas = replicas
        self.busiest: list[int] = []

    def decide(self, observation):
        self.busiest.append(max((r.queue_len + r.running for r in observation.replicas), default=0))
        return Decision(desired_replicas={"v": self.replicas},
                        routing=[RouteGuidance(model=MODEL, weights={"v": 1.0})])


def overload(seconds: float = 120.0):
    return GeneratedTrace(
        arrivals=PoissonArrivals(rate_rps=25.0), duration_s=seconds, seed=5, model=MODEL,
        input_lengths=LogNormalLengths(log_mean=6.0, log_std=0.6, max_tokens=3000),
        output_lengths=LogNormalLengths(log_mean=4.5, log_std=0.5, max_tokens=400),
    ).build()


def run(router_name: str, timeout_s: float = 600.0, router=None):
    policy = Fixed(2)
    router = router or make_router(router_name)
    result = simulate(flow_fleet(), overload(), policy, router,
                      ClusterOptions(record_assignments=True, pending_timeout_s=timeout_s))
    return result, policy, router


def test_flow_ours_holds_in_fifo_order_and_keeps_replicas_within_concurrency():
    result, policy, router = run("flow-ours")
    limit = router.concurrency(Endpoint("x", "v"))
    assert not result.dropped.any()
    ids = [rid for rid, _, _ in result.assignments]
    assert ids == sorted(ids) and len(ids) == len(result.arrival_s), "held requests leave in arrival order"
    when = np.array([t for _, _, t in result.assignments])
    held = when - result.arrival_s[ids] > 1e-9
    assert held.sum() > 0.1 * len(ids), "an overloaded pool holds requests"
    assert max(policy.busiest) <= limit
    # Without flow control the same overload piles up beyond the SLO concurrency (the check can fail).
    _, lo_policy, _ = run("least-outstanding")
    assert max(lo_policy.busiest) > limit


def test_flow_utilization_holds_in_fifo_order_and_conserves_requests():
    result, _, _ = run("flow-utilization")
    ids = [rid for rid, _, _ in result.assignments]
    assert ids == sorted(ids) and len(ids) == len(result.arrival_s)
    when = np.array([t for _, _, t in result.assignments])
    assert (when - result.arrival_s[ids] > 1e-9).any(), "llm-d's detector reaches 1.0 under this overload"
    assert not result.dropped.any() and np.isfinite(result.completion_s).all()


def test_held_requests_are_dropped_after_the_pending_timeout():
    result, _, _ = run("flow-ours", timeout_s=5.0)
    assert result.dropped.any()
    done = np.isfinite(result.completion_s)
    assert np.all(done ^ result.dropped)


def test_the_pool_queue_is_bounded():
    bounded, _, _ = run("flow-ours", router=OursFlowRouter(max_held_requests=20))
    unbounded, _, _ = run("flow-ours")
    assert not unbounded.dropped.any()
    assert bounded.dropped.sum() > 0.1 * len(bounded.dropped), "beyond 20 held, arrivals are dropped"
    assert np.all(np.isfinite(bounded.completion_s) ^ bounded.dropped)
    with pytest.raises(ValueError, match="at least 1"):
        OursFlowRouter(max_held_requests=0)


def test_flow_routers_are_registered_and_no_default_router_changed():
    from optimizer.simulation.scenario import OursSpec, SaturationSpec

    assert {"flow-ours", "flow-utilization"} <= set(ROUTERS)
    assert OursSpec().router == "weighted" and SaturationSpec().router == "least-outstanding"
