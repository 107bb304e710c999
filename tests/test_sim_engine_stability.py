"""Ours' defences against churn and against transitions that lose capacity, seen through decide()."""

import numpy as np

from optimizer.fleet import Accelerator, ModelSpec, Variant
from optimizer.problem import Problem
from optimizer.profile import ParametricProfile
from optimizer.simulation.policies.engine import EnginePolicy
from optimizer.simulation.policy import (
    ArrivalSample,
    CompletionSample,
    Observation,
    ReplicaObservation,
    ReplicaState,
)
from optimizer.workload import SLO

MODEL = "m"
PROFILE = ParametricProfile(decode_base_s=0.01, decode_per_seq_s=1e-4, decode_per_kv_token_s=5e-9,
                            prefill_base_s=0.01, prefill_per_token_s=3e-5)


def fleet() -> Problem:
    return Problem(
        accelerators=[Accelerator(name="gpu", memory_gb=80, cost_per_hour=2.0, available=40)],
        models=[ModelSpec(name=MODEL, weight_gb=16.0, kv_bytes_per_token=131072.0)],
        variants=[Variant(name="pd", model=MODEL, accelerator="gpu", max_batch=64, profile=PROFILE)],
        slos=[SLO(model=MODEL, ttft_s=1.0, itl_s=0.05, percentile=99)],
    )


def observation(t, rate, ready, rng, *, spread=False):
    n = int(rate * 30)
    times = np.sort(rng.uniform(t - 30.0, t, n)).tolist()
    ins = (rng.lognormal(6.0, 0.6, n) if spread else np.full(n, 400.0)).astype(int).clip(1, 1000).tolist()
    outs = (rng.lognormal(5.0, 0.8, n) if spread else np.full(n, 150.0)).astype(int).clip(2, None).tolist()
    replicas = [ReplicaObservation(name=f"pd-{i}", variant="pd", state=ReplicaState.READY) for i in range(ready)]
    return Observation(time_s=t, interval_s=30.0, replicas=replicas,
                       arrivals=[ArrivalSample(model=MODEL, times_s=times, input_tokens=ins)],
                       completions=[CompletionSample(model=MODEL, input_tokens=ins, output_tokens=outs)])


def _after_a_drop(window_s: float) -> tuple[int, int]:
    rng = np.random.default_rng(3)
    policy = EnginePolicy(fleet(), service_level=1.0, change_penalty=0.0, scale_down_delay_s=0.0,
                          scale_down_window_s=window_s, lead_time_s=0.0, rate_windows_s=(30.0,), input_edges=(1000,))
    busy = policy.decide(observation(30.0, 40.0, 0, rng)).desired_replicas["pd"]
    quiet = policy.decide(observation(150.0, 1.0, busy, rng)).desired_replicas["pd"]  # past the demand horizon
    return busy, quiet


def test_scale_down_waits_for_the_window_and_not_without_it():
    busy, held = _after_a_drop(300.0)
    _, dropped = _after_a_drop(0.0)
    assert busy > 1
    assert held == busy
    assert dropped < busy


def test_length_spread_reaches_the_capacity_model_and_costs_replicas():
    """The same rate with spread lengths is planned as spread (cv > 0) and needs at least as many replicas."""
    def plan(spread: bool):
        policy = EnginePolicy(fleet(), service_level=1.0, change_penalty=0.0, lead_time_s=0.0,
                              rate_windows_s=(30.0,), input_edges=(1000,))
        rng = np.random.default_rng(5)
        desired = 0
        for k in range(1, 4):
            desired = policy.decide(observation(30.0 * k, 20.0, desired, rng, spread=spread)).desired_replicas["pd"]
        return policy.last_problem.workloads[0].buckets, desired

    flat, n_flat = plan(False)
    spread, n_spread = plan(True)
    assert all(b.input_tokens_cv == 0 and b.output_tokens_cv == 0 for b in flat)
    assert any(b.output_tokens_cv >= 0.5 for b in spread)
    assert n_spread >= n_flat >= 1


def _two_shapes() -> Problem:
    """One model on two variants: a big replica and a small one."""
    base = fleet()
    variants = [Variant(name=n, model=MODEL, accelerator="gpu", max_batch=64, profile=PROFILE) for n in ("big", "small")]
    accelerators = [Accelerator(name="gpu", memory_gb=80, cost_per_hour=1.0, available=40)]
    return base.model_copy(update={"accelerators": accelerators, "variants": variants})


def _planned(problem: Problem, rate: float) -> Problem:
    from optimizer.workload import LengthBucket, Workload

    bucket = LengthBucket(name="b", input_tokens=400, output_tokens=150, share=1.0)
    return problem.model_copy(update={"workloads": [Workload(model=MODEL, arrival_rate_rps=rate, buckets=[bucket])]})


def test_fleet_stabilization_holds_one_recommended_fleet_not_the_union_of_two():
    """The plan fell from 10 to 9 req/s and the allocation moved from {big} to {3 small} within the window.
    Per variant the window keeps big at its recommendation and adds the smalls: the union of both fleets.
    Per fleet it keeps the recommendation for the window's highest plan, {big}, and adds nothing until
    that plan has left the window; then the smalls come."""
    problem = _two_shapes()
    for mode, held in (("variant", {"big": 1, "small": 3}), ("fleet", {"big": 1, "small": 0})):
        policy = EnginePolicy(problem, scale_down_window_s=120.0, scale_down_stabilization=mode)
        assert policy._stabilized({"big": 1, "small": 0}, {"big": 1, "small": 0}, 0.0, _planned(problem, 10.0)) == \
            {"big": 1, "small": 0}
        assert policy._stabilized({"big": 0, "small": 3}, {"big": 1, "small": 0}, 60.0, _planned(problem, 9.0)) == held
        later = policy._stabilized({"big": 0, "small": 3}, {"big": 1, "small": 0}, 200.0, _planned(problem, 9.0))
        assert later == {"big": 0, "small": 3}


def test_fleet_stabilization_follows_a_rising_plan_and_holds_a_plain_scale_down():
    """A swap for a higher plan is the allocation's answer to more demand: followed at once (the transition
    keeps the old fleet until the new one is ready). A fall on one variant is held in both modes."""
    problem = _two_shapes()
    policy = EnginePolicy(problem, scale_down_window_s=120.0, scale_down_stabilization="fleet")
    policy._stabilized({"big": 0, "small": 3}, {"big": 0, "small": 3}, 0.0, _planned(problem, 9.0))
    assert policy._stabilized({"big": 1, "small": 1}, {"big": 0, "small": 3}, 30.0, _planned(problem, 12.0)) == \
        {"big": 1, "small": 1}
    for mode in ("variant", "fleet"):
        policy = EnginePolicy(problem, scale_down_window_s=120.0, scale_down_stabilization=mode)
        policy._stabilized({"big": 0, "small": 4}, {"big": 0, "small": 4}, 0.0, _planned(problem, 12.0))
        assert policy._stabilized({"big": 0, "small": 2}, {"big": 0, "small": 4}, 60.0, _planned(problem, 6.0)) == \
            {"big": 0, "small": 4}


def test_unknown_stabilization_is_refused():
    import pytest

    with pytest.raises(ValueError, match="scale_down_stabilization"):
        EnginePolicy(fleet(), scale_down_stabilization="model")
