"""Ours on several models at once: a transition of one model is guarded with that model's own capacity."""

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

FAST = ParametricProfile(decode_base_s=0.008, decode_per_seq_s=1e-4, decode_per_kv_token_s=5e-9,
                         prefill_base_s=0.008, prefill_per_token_s=2e-5)
SLOW = ParametricProfile(decode_base_s=0.03, decode_per_seq_s=4e-4, decode_per_kv_token_s=3e-8,
                         prefill_base_s=0.03, prefill_per_token_s=2e-4)


def fleet() -> Problem:
    """Model "b" sits on the one "gpu" as the slow b-old and wants the faster b-new there (a rolling
    swap: b-old must step down to make room); b-spare is its dear variant with accelerators free.
    Model "a" has one fast replica on its own accelerator, far more than its trickle of traffic."""
    return Problem(
        accelerators=[Accelerator(name="gpu", memory_gb=80, cost_per_hour=4.0, available=1),
                      Accelerator(name="spare", memory_gb=80, cost_per_hour=40.0, available=10),
                      Accelerator(name="agpu", memory_gb=80, cost_per_hour=1.0, available=4)],
        models=[ModelSpec(name="a", weight_gb=16.0, kv_bytes_per_token=131072.0),
                ModelSpec(name="b", weight_gb=16.0, kv_bytes_per_token=131072.0)],
        variants=[Variant(name="a", model="a", accelerator="agpu", max_batch=128, profile=FAST, min_replicas=1),
                  Variant(name="b-old", model="b", accelerator="gpu", max_batch=16, profile=SLOW),
                  Variant(name="b-new", model="b", accelerator="gpu", max_batch=128, profile=FAST),
                  Variant(name="b-spare", model="b", accelerator="spare", max_batch=128, profile=FAST)],
        slos=[SLO(model="a", ttft_s=1.5, itl_s=0.08, percentile=95),
              SLO(model="b", ttft_s=1.5, itl_s=0.08, percentile=95)],
    )


def sample(model, rate, t, rng):
    n = int(rate * 30)
    times = np.sort(rng.uniform(t - 30.0, t, n)).tolist()
    return (ArrivalSample(model=model, times_s=times, input_tokens=[300] * n),
            CompletionSample(model=model, input_tokens=[300] * n, output_tokens=[150] * n))


def decided_once():
    """Ours after one decision: "a" on its own replica, "b" on b-old, b's traffic well above a trickle."""
    rng = np.random.default_rng(7)
    policy = EnginePolicy(fleet(), service_level=1.0, change_penalty=0.0, lead_time_s=0.0, scale_down_delay_s=0.0,
                          rate_windows_s=(30.0,), input_edges=(1000,), capacity_correction=False)
    a, a_done = sample("a", 0.2, 30.0, rng)
    b, b_done = sample("b", 3.0, 30.0, rng)
    replicas = [ReplicaObservation(name="a-0", variant="a", state=ReplicaState.READY),
                ReplicaObservation(name="b-old-0", variant="b-old", state=ReplicaState.READY)]
    decision = policy.decide(Observation(time_s=30.0, interval_s=30.0, replicas=replicas,
                                         arrivals=[a, b], completions=[a_done, b_done]))
    return policy, decision


def test_one_models_spare_capacity_does_not_hide_anothers_gap_in_a_rolling_swap():
    policy, decision = decided_once()
    allocation = policy.last_allocation.replicas
    # The end state is the swap: b-new on the one gpu, b-old gone, nothing on the dear spare.
    assert allocation.get("b-new", 0) == 1 and allocation.get("b-old", 0) == 0 and allocation.get("b-spare", 0) == 0
    # On the way, b's only ready replica is not stepped down before b has a replacement coming:
    # it is held and bridged, although "a" alone could serve all of b's rate many times over.
    assert decision.desired_replicas["b-old"] == 1
    assert decision.desired_replicas["b-spare"] >= 1
    assert decision.desired_replicas["a"] == 1


def test_a_plan_the_steps_cannot_reach_is_bridged_with_free_accelerators():
    """The allocation wants b-new, whose accelerator b-old still holds (make-before-break waits), and
    nothing shrinks: the fleet the steps lead to is bridged up to the plan, not left short of it."""
    from optimizer.transition import VariantState

    policy, _ = decided_once()
    problem = policy.last_problem
    from optimizer.capacity import capacity_table
    capacity = {k: e.max_rate_rps for k, e in capacity_table(problem).items()}
    per_replica = policy._per_replica_rate(problem, capacity)
    planned = {"a": 1, "b-new": 1}
    inventory = {x.name: x.available for x in problem.accelerators}
    states = [VariantState(name=v.name, group=v.model, accelerator=v.accelerator,
                           accelerators_per_replica=v.accelerators_per_replica,
                           current_replicas=int(v.name in ("a", "b-old")), ready_replicas=int(v.name in ("a", "b-old")),
                           pods=int(v.name in ("a", "b-old")), desired_replicas=0)
              for v in problem.variants]
    blocked = {"a": 1, "b-old": 1, "b-new": 0, "b-spare": 0}
    policy._bridge_blocked(problem, states, blocked, planned, per_replica, inventory)
    assert blocked["b-spare"] >= 1 and blocked["b-new"] == 0 and blocked["a"] == 1
    reached = {"a": 1, "b-old": 0, "b-new": 1, "b-spare": 0}
    policy._bridge_blocked(problem, states, reached, planned, per_replica, inventory)
    assert reached == {"a": 1, "b-old": 0, "b-new": 1, "b-spare": 0}
