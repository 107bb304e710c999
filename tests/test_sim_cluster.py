"""Cluster simulator: conservation, draining, routers, P/D hand-off, cold start, cost accounting."""

import math
from dataclasses import dataclass

import numpy as np
import pytest

from optimizer.fleet import Accelerator, ModelSpec, Variant
from optimizer.problem import AllocationOptions, Problem
from optimizer.profile import ParametricProfile
from optimizer.simulation.cluster import ClusterOptions, ClusterSimulator, ColdStart, simulate
from optimizer.simulation.generators import GeneratedTrace, LogNormalLengths, PoissonArrivals
from optimizer.simulation.metrics import summarize
from optimizer.simulation.policy import Decision, RouteGuidance
from optimizer.simulation.routers import (
    LeastOutstandingRouter,
    RoundRobinRouter,
    WeightedRouter,
    make_router,
    slo_concurrency,
)
from optimizer.simulation.traces import Trace
from optimizer.workload import SLO

MODEL = "m"
BIG = ParametricProfile(decode_base_s=0.01, decode_per_seq_s=2e-4, decode_per_kv_token_s=1e-8,
                        prefill_base_s=0.01, prefill_per_token_s=5e-5)
SMALL = ParametricProfile(decode_base_s=0.05, decode_per_seq_s=5e-4, decode_per_kv_token_s=5e-8,
                          prefill_base_s=0.05, prefill_per_token_s=3e-4)


def fleet(kv_gb_s: float = 10.0) -> Problem:
    return Problem(
        accelerators=[Accelerator(name="big", memory_gb=80, cost_per_hour=4.0, available=8),
                      Accelerator(name="small", memory_gb=24, cost_per_hour=1.0)],
        models=[ModelSpec(name=MODEL, weight_gb=16.0, kv_bytes_per_token=131072.0)],
        variants=[
            Variant(name="big", model=MODEL, accelerator="big", max_batch=64, profile=BIG),
            Variant(name="small", model=MODEL, accelerator="small", max_batch=16, profile=SMALL),
            Variant(name="p-big", model=MODEL, accelerator="big", max_batch=64, role="P", profile=BIG),
            Variant(name="d-small", model=MODEL, accelerator="small", max_batch=16, role="D", profile=SMALL),
        ],
        slos=[SLO(model=MODEL, ttft_s=1.0, itl_s=0.1)],
        options=AllocationOptions(kv_transfer_gb_s=kv_gb_s),
    )


class Scripted:
    """A policy that follows a schedule: from each time on, the given replicas (an input, not a mock)."""

    def __init__(self, schedule, interval_s=10.0, routing=()):
        self.name = "scripted"
        self.interval_s = interval_s
        self.schedule = sorted(schedule)
        self.routing = list(routing)

    def decide(self, observation):
        desired = {}
        for t, d in self.schedule:
            if observation.time_s >= t:
                desired = d
        return Decision(desired_replicas=desired, routing=self.routing)


def poisson_trace(rate, duration, seed=0, max_in=4000, max_out=600):
    return GeneratedTrace(
        arrivals=PoissonArrivals(rate_rps=rate), duration_s=duration, seed=seed, model=MODEL,
        input_lengths=LogNormalLengths(log_mean=6.0, log_std=0.9, max_tokens=max_in),
        output_lengths=LogNormalLengths(log_mean=4.5, log_std=0.8, max_tokens=max_out),
    ).build()


def check_conservation(result):
    done = np.isfinite(result.completion_s)
    assert np.all(done ^ result.dropped), "every request completes or is dropped, exactly one of the two"
    ok = ~result.dropped
    assert np.all(result.first_token_s[ok] >= result.arrival_s[ok] - 1e-9)
    assert np.all(result.completion_s[ok] >= result.first_token_s[ok] - 1e-9)


@pytest.mark.parametrize("router", ["round-robin", "least-outstanding", "weighted"])
def test_requests_are_conserved_under_churn_and_pd(router):
    tr = poisson_trace(6.0, 400.0, seed=3)
    # Giant requests no replica's KV cache can hold must be dropped, not lost.
    ins = tr.input_tokens.copy()
    ins[::97] = 2_000_000
    tr = Trace(tr.arrival_s, ins, tr.output_tokens, models=tr.models)
    schedule = [(0, {"big": 1, "small": 2}), (60, {"big": 3, "small": 0, "p-big": 1, "d-small": 2}),
                (130, {"big": 0, "small": 1, "p-big": 1, "d-small": 1}), (200, {"small": 0}),
                (260, {"small": 4, "big": 1}), (330, {"big": 0, "small": 1, "p-big": 0, "d-small": 0})]
    opts = ClusterOptions(record_assignments=True, pending_timeout_s=30.0,
                          cold_start=ColdStart(base_s=20.0, load_gb_per_s=4.0))
    res = simulate(fleet(), tr, Scripted(schedule), make_router(router), opts)
    check_conservation(res)
    assert res.dropped.sum() >= len(ins[::97])  # the giants, plus anything stuck with no replica
    assert np.isfinite(res.completion_s).sum() > 0.8 * len(tr)
    # Scale-downs happened while replicas were busy, and no routing ever hit a marked replica.
    assert res.draining_marks
    for _, replica, t in res.assignments:
        assert t < res.draining_marks.get(replica, math.inf), f"{replica} got work after it was marked"


def test_pending_requests_wait_for_cold_start_or_drop():
    tr = Trace(np.array([0.0, 1.0, 50.0]), np.array([100, 100, 100]), np.array([5, 5, 5]), models=(MODEL,))
    cold = ColdStart(base_s=30.0, load_gb_per_s=16.0)  # 31 s to ready
    res = simulate(fleet(), tr, Scripted([(0, {}), (5, {"big": 1})], interval_s=5.0), make_router("least-outstanding"),
                   ClusterOptions(cold_start=cold, pending_timeout_s=33.0))
    check_conservation(res)
    # Request 0 waited from 0 to 36 s (> 33 s timeout): dropped. Request 1 waited 35 s: dropped too.
    # Request 2 arrived with the replica ready.
    assert res.dropped.tolist() == [True, True, False]
    res = simulate(fleet(), tr, Scripted([(0, {}), (5, {"big": 1})], interval_s=5.0), make_router("least-outstanding"),
                   ClusterOptions(cold_start=cold, pending_timeout_s=40.0))
    assert res.dropped.tolist() == [False, False, False]
    ttft = res.first_token_s - res.arrival_s
    assert ttft[0] == pytest.approx(36.0 + BIG.prefill_s(100), rel=1e-6)
    # Both were dispatched when the replica became ready; the second waits for the first's prefill,
    # then (chunked prefill, the profile's default) its own prompt rides the first's decode step.
    own = BIG.decode_step_s(1, 101) + BIG.prefill_s(100) - BIG.prefill_base_s
    assert ttft[1] == pytest.approx(35.0 + BIG.prefill_s(100) + own, rel=1e-6)


def test_pd_handoff_pays_the_kv_transfer():
    tr = Trace(np.array([0.0]), np.array([2000]), np.array([50]), models=(MODEL,))
    prob = fleet(kv_gb_s=1.0)
    res = simulate(prob, tr, Scripted([(0, {"p-big": 1, "d-small": 1})]), make_router("least-outstanding"))
    transfer = 2000 * 131072.0 / 1e9
    assert res.first_token_s[0] == pytest.approx(BIG.prefill_s(2000) + transfer)
    # The decode replica then runs 49 decode steps of a single sequence.
    assert res.completion_s[0] - res.first_token_s[0] == pytest.approx(49 * SMALL.decode_step_s(1, 2025), rel=0.01)


def test_cost_accounting_by_hand_with_cold_start_and_draining():
    tr = Trace(np.array([1.0, 2.0, 1000.0]), np.array([100, 100, 100]), np.array([10, 10, 10]), models=(MODEL,))
    cold = ColdStart(base_s=10.0, load_gb_per_s=16.0)  # 11 s
    schedule = [(0, {"big": 1}), (100, {"big": 1, "small": 2}), (500, {"small": 0})]
    res = simulate(fleet(), tr, Scripted(schedule, interval_s=100.0), make_router("least-outstanding"),
                   ClusterOptions(cold_start=cold))
    # big: warm from 0 to the end (1000 s) at $4/h; small: 2 replicas from 100 s (cold start billed)
    # to 500 s, idle when marked so they leave at once, at $1/h.
    expected = 1000 * 4.0 / 3600 + 2 * 400 * 1.0 / 3600
    m = summarize(res, {MODEL: fleet().slos[0]})
    assert m.cost == pytest.approx(expected)
    assert m.cold_start_cost == pytest.approx(2 * 11 * 1.0 / 3600)
    assert m.accelerator_hours == pytest.approx({"big": 1000 / 3600, "small": 800 / 3600})
    assert m.replica_changes == 4  # +2 small, -2 small after the warm start


def test_draining_replica_finishes_its_work_then_leaves():
    # One long request on "small"; the policy removes it while the request runs.
    tr = Trace(np.array([0.0, 100.0]), np.array([200, 10]), np.array([400, 2]), models=(MODEL,))
    res = simulate(fleet(), tr, Scripted([(0, {"small": 1}), (5, {"small": 0, "big": 1})], interval_s=5.0),
                   make_router("least-outstanding"))
    check_conservation(res)
    life = next(life for life in res.ledger.lives.values() if life.variant == "small")
    assert res.draining_marks[life.replica_id] == pytest.approx(5.0)
    assert life.removed_s == pytest.approx(res.completion_s[0])
    assert res.completion_s[0] > 5.0


@dataclass
class FakeReplica:
    """A stand-in endpoint for router unit tests (routers only read these attributes)."""

    id: str
    variant: str
    outstanding: int
    draining: bool = False
    created_s: float = 0.0


def test_round_robin_cycles_and_skips_marked_replicas():
    pool = [FakeReplica("a", "v", 0), FakeReplica("b", "v", 9, draining=True), FakeReplica("c", "v", 3)]
    rr = RoundRobinRouter()
    picks = [rr.pick("k", pool).id for _ in range(6)]
    assert picks == ["a", "c", "a", "c", "a", "c"]
    assert rr.pick("k", [FakeReplica("x", "v", 0, draining=True)]) is None


def test_least_outstanding_picks_and_marks():
    pool = [FakeReplica("a", "v", 4), FakeReplica("b", "v", 1, draining=True), FakeReplica("c", "v", 2),
            FakeReplica("d", "v", 3, created_s=5.0)]
    lor = LeastOutstandingRouter()
    assert lor.pick("k", pool).id == "c"  # b has fewer but is marked for removal
    # No idle replica: mark the one with the fewest outstanding requests (never one already marked).
    assert [r.id for r in lor.victims(pool, 1)] == ["c"]
    assert [r.id for r in lor.victims(pool, 2)] == ["c", "d"]
    pool.append(FakeReplica("e", "v", 0))
    assert [r.id for r in lor.victims(pool, 2)] == ["e", "c"]  # idle first
    # Ties share the work instead of piling on the first replica.
    twins = [FakeReplica("x", "v", 0), FakeReplica("y", "v", 0)]
    assert {lor.pick("t", twins).id for _ in range(2)} == {"x", "y"}


def test_weighted_router_follows_bucket_guidance():
    pool = [FakeReplica("a1", "A", 0), FakeReplica("a2", "A", 0), FakeReplica("b1", "B", 0)]
    w = WeightedRouter()
    w.set_guidance([RouteGuidance(model=MODEL, max_input_tokens=1000, weights={"A": 3.0, "B": 1.0}),
                    RouteGuidance(model=MODEL, min_input_tokens=1000, weights={"B": 1.0})])
    short = [w.pick(f"{MODEL}/entry", pool, 200).variant for _ in range(400)]
    assert short.count("A") == 300 and short.count("B") == 100
    assert {w.pick(f"{MODEL}/entry", pool, 5000).variant for _ in range(20)} == {"B"}
    # With B's only replica marked for removal, long prompts fall back to the live replicas.
    pool[2].draining = True
    assert {w.pick(f"{MODEL}/entry", pool, 5000).variant for _ in range(5)} == {"A"}


def test_weighted_router_spills_from_an_overloaded_replica():
    """The plan's shares hold while loads stay comparable; a replica far above the least loaded one
    allowed for the bucket gets nothing more until it catches up."""
    pool = [FakeReplica("h1", "H", 10), FakeReplica("a1", "A", 8), FakeReplica("a2", "A", 6)]
    w = WeightedRouter()
    w.set_guidance([RouteGuidance(model=MODEL, weights={"H": 0.9, "A": 0.1})])
    picks = [w.pick(f"{MODEL}/entry", pool, 200).id for _ in range(10)]
    assert picks.count("h1") == 9, "comparable loads: the plan's shares"
    pool[0].outstanding = 120  # > 2 x 6 + 16
    picks = [w.pick(f"{MODEL}/entry", pool, 200).id for _ in range(10)]
    assert "h1" not in picks and picks.count("a2") >= 9
    pool[0].outstanding = 27  # < 2 x 6 + 16 again
    assert "h1" in {w.pick(f"{MODEL}/entry", pool, 200).id for _ in range(10)}


def test_weighted_router_spills_by_raw_count_between_equal_shares():
    pool = [FakeReplica("b1", "B", 40), FakeReplica("b2", "B", 5)]
    w = WeightedRouter()
    w.set_guidance([RouteGuidance(model=MODEL, weights={"B": 1.0})])
    assert {w.pick(f"{MODEL}/entry", pool, 200).id for _ in range(5)} == {"b2"}


def test_heterogeneous_fleet_serves_a_trace_within_slo_when_oversized():
    tr = poisson_trace(3.0, 300.0, seed=5)
    res = simulate(fleet(), tr, Scripted([(0, {"big": 2, "small": 2})]), make_router("least-outstanding"))
    m = summarize(res, {MODEL: fleet().slos[0]})
    check_conservation(res)
    assert m.dropped == 0 and m.completed == len(tr)
    assert m.slo_attainment > 0.9
    assert m.cost == pytest.approx(tr.duration_s * (2 * 4.0 + 2 * 1.0) / 3600)


def test_weighted_router_does_not_queue_behind_a_full_replica():
    """A pick that would wait for a batch slot goes to an allowed replica that starts it now."""
    pool = [FakeReplica("h1", "H", 30), FakeReplica("a1", "A", 25)]
    pool[0].waiting = 4
    pool[1].waiting = 0
    w = WeightedRouter()
    w.set_guidance([RouteGuidance(model=MODEL, weights={"H": 0.99, "A": 0.01})])
    assert {w.pick(f"{MODEL}/entry", pool, 200).id for _ in range(5)} == {"a1"}
    pool[1].waiting = 2  # everyone queues: the plan decides again
    assert "h1" in {w.pick(f"{MODEL}/entry", pool, 200).id for _ in range(5)}


def test_weighted_router_spills_only_onto_replicas_below_their_slo_concurrency():
    """An L4-like replica that holds its SLO concurrency already gets no spill however far the big
    replica runs ahead (spilled onto, it missed 45-75 % of the requests); with room it takes them."""
    pool = [FakeReplica("h1", "H", 120), FakeReplica("s1", "S", 8)]
    w = WeightedRouter()
    w.set_guidance([RouteGuidance(model=MODEL, weights={"H": 0.98, "S": 0.02})])
    w.set_concurrency({"H": 64, "S": 8})
    assert {w.pick(f"{MODEL}/entry", pool, 200).id for _ in range(20)} == {"h1"}
    pool[1].outstanding = 3  # room again: 120 > 2 x 3 + 16
    assert {w.pick(f"{MODEL}/entry", pool, 200).id for _ in range(5)} == {"s1"}
    pool[0].waiting, pool[1].outstanding = 4, 8  # queued on H, S full: stays on H
    assert {w.pick(f"{MODEL}/entry", pool, 200).id for _ in range(5)} == {"h1"}


def test_the_cluster_binds_the_weighted_router_to_slo_concurrency():
    problem = fleet()
    limits = slo_concurrency(problem)
    assert set(limits) == {v.name for v in problem.variants}
    assert all(n >= 1 for n in limits.values())
    router = make_router("weighted")
    ClusterSimulator(problem, poisson_trace(1.0, 30.0, seed=1), Scripted([(0, {"big": 1})]), router)
    assert router._concurrency == limits
