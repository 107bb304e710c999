"""Ours' swap gate (EnginePolicy swap_break_even): a swap made only to save money starts once the saving
forgone while waiting has paid for the new replicas' cold start; growth, and swaps that free what another
model needs, go at once."""

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
from optimizer.workload import SLO, LengthBucket, Workload

FAST = ParametricProfile(decode_base_s=0.008, decode_per_seq_s=1e-4, decode_per_kv_token_s=5e-9,
                         prefill_base_s=0.008, prefill_per_token_s=2e-5)
SLOW = ParametricProfile(decode_base_s=0.03, decode_per_seq_s=4e-4, decode_per_kv_token_s=3e-8,
                         prefill_base_s=0.03, prefill_per_token_s=2e-4)
LEAD_S = 60.0
INTERVAL_S = 15.0


def fleet(big_available: int = 6) -> Problem:
    """Model m on a $6/h "big" replica (31 req/s at SLO) or $1/h "small" ones (1.9 req/s); model n on big only."""
    return Problem(
        accelerators=[Accelerator(name="big", memory_gb=80, cost_per_hour=6.0, available=big_available),
                      Accelerator(name="small", memory_gb=24, cost_per_hour=1.0, available=20)],
        models=[ModelSpec(name=m, weight_gb=16.0, kv_bytes_per_token=131072.0) for m in ("m", "n")],
        variants=[Variant(name="big", model="m", accelerator="big", max_batch=128, profile=FAST),
                  Variant(name="small", model="m", accelerator="small", max_batch=16, profile=SLOW),
                  Variant(name="n-big", model="n", accelerator="big", max_batch=128, profile=FAST)],
        slos=[SLO(model=m, ttft_s=1.5, itl_s=0.08, percentile=95) for m in ("m", "n")],
    )


def policy(gate: bool, lead_s: float = LEAD_S) -> EnginePolicy:
    return EnginePolicy(fleet(), change_penalty=0.0, interval_s=INTERVAL_S, lead_time_s=lead_s,
                        rate_windows_s=(INTERVAL_S,), input_edges=(1000,), forecast=False, burst_headroom=False,
                        capacity_correction=False, swap_break_even=gate)


def observation(t: float, rate: float, live: dict[str, int], rng) -> Observation:
    n = int(rate * INTERVAL_S)
    times = np.sort(rng.uniform(t - INTERVAL_S, t, n)).tolist()
    replicas = [ReplicaObservation(name=f"{v}-{i}", variant=v, state=ReplicaState.READY)
                for v, k in live.items() for i in range(k)]
    return Observation(time_s=t, interval_s=INTERVAL_S, replicas=replicas,
                       arrivals=[ArrivalSample(model="m", times_s=times, input_tokens=[300] * n)],
                       completions=[CompletionSample(model="m", input_tokens=[300] * n, output_tokens=[150] * n)])


def run(pol: EnginePolicy, rate: float, live: dict[str, int], steps: int) -> list[dict[str, int]]:
    """Decisions when each one is carried out at once (the replicas asked for are ready next interval)."""
    rng = np.random.default_rng(1)
    out = []
    for k in range(1, steps + 1):
        desired = pol.decide(observation(INTERVAL_S * k, rate, live, rng)).desired_replicas
        live = {v: desired.get(v, 0) for v in ("big", "small")}
        out.append(live)
    return out


def test_a_cost_swap_starts_once_its_forgone_saving_has_paid_its_cold_start():
    """1 big ($6/h) serves 2 req/s; the allocation prefers 2 smalls ($2/h). Their cold start costs
    2 x $1/h x 60 s = $0.033; waiting forgoes $4/h x 15 s = $0.017 per interval: two intervals held."""
    ungated = run(policy(False), 2.0, {"big": 1}, 1)
    assert ungated[0]["small"] > 0  # the allocation does want the swap at once
    gated = run(policy(True), 2.0, {"big": 1}, 4)
    assert [d["small"] for d in gated[:2]] == [0, 0]
    assert all(d["big"] == 1 for d in gated[:2])  # the running fleet is kept whole meanwhile
    assert gated[2]["small"] == ungated[0]["small"]
    assert run(policy(True, lead_s=0.0), 2.0, {"big": 1}, 1)[0]["small"] > 0  # a free start waits for nothing


def _problem(rates: dict[str, float], current: dict[str, int], big_available: int = 6) -> Problem:
    base = fleet(big_available)
    bucket = LengthBucket(name="b", input_tokens=300, output_tokens=150, share=1.0)
    workloads = [Workload(model=m, arrival_rate_rps=r, buckets=[bucket]) for m, r in rates.items()]
    variants = [v.model_copy(update={"current_replicas": current.get(v.name, 0)}) for v in base.variants]
    return base.model_copy(update={"workloads": workloads, "variants": variants})


CAPACITY = {("big", "b"): 30.0, ("small", "b"): 2.0, ("n-big", "b"): 30.0}


def test_a_swap_the_running_fleet_cannot_serve_goes_at_once():
    """2 smalls serve 4 req/s: a plan of 10 req/s moved to 1 big is growth."""
    pol = policy(True)
    planned = {"big": 1, "small": 0, "n-big": 0}
    short = _problem({"m": 10.0}, {"small": 2})
    assert pol._gate_swaps(short, planned, CAPACITY, INTERVAL_S) == planned
    enough = _problem({"m": 3.0}, {"small": 2})
    assert pol._gate_swaps(enough, {"big": 0, "small": 2, "n-big": 0}, CAPACITY, INTERVAL_S) == \
        {"big": 0, "small": 2, "n-big": 0}  # no swap: nothing to hold


def test_a_swap_that_frees_what_another_model_is_planned_goes_at_once():
    """m swaps its big replica for smalls so that n gets the only big accelerator: held, n would wait."""
    planned = {"big": 0, "small": 2, "n-big": 1}
    shared = _problem({"m": 2.0, "n": 5.0}, {"big": 1}, big_available=1)
    assert policy(True)._gate_swaps(shared, planned, CAPACITY, INTERVAL_S) == planned
    roomy = _problem({"m": 2.0, "n": 5.0}, {"big": 1}, big_available=2)
    assert policy(True)._gate_swaps(roomy, planned, CAPACITY, INTERVAL_S) == {"big": 1, "small": 0, "n-big": 1}


def test_a_prefill_half_alone_serves_nothing_and_a_pair_serves_what_both_halves_carry():
    from optimizer.fleet import Role

    base = _problem({"m": 3.0}, {})
    halves = [Variant(name="pre", model="m", accelerator="big", max_batch=128, profile=FAST, role=Role.PREFILL),
              Variant(name="dec", model="m", accelerator="small", max_batch=16, profile=SLOW, role=Role.DECODE)]
    problem = base.model_copy(update={"variants": base.variants + halves})
    capacity = {**CAPACITY, ("pre", "b"): 10.0, ("dec", "b"): 2.0}
    serves = EnginePolicy._fleet_serves
    assert not serves(problem, "m", {"pre": 1}, capacity)
    assert not serves(problem, "m", {"pre": 1, "dec": 1}, capacity)  # decode carries 2 of 3 req/s
    assert serves(problem, "m", {"pre": 1, "dec": 2}, capacity)
    assert serves(problem, "m", {"pre": 1, "dec": 1, "small": 1}, capacity)  # a PD replica takes the rest
