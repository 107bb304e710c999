"""The analytical capacity model against the single-replica simulator, and its sizing rules.

Validation: for three replica types (an H100 with an 8B model, an A100 with a 13B model that runs
out of KV cache, an L4 with a 7B model given as measured points) and three request mixes (short
chat, long prompt, long generation), the model's max rate must be within 10 % of the rate at which
the simulated replica starts to miss the SLO (found by bisection over Poisson arrival rates).
Request lengths vary +/-25 % around the bucket means, as real traffic does.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
from pydantic import ValidationError

from optimizer.batch_fluctuation import _integrals, fluctuation_factors
from optimizer.capacity import CapacityEstimate, capacity_table, replica_capacity
from optimizer.fleet import Accelerator, ModelSpec, Role, Variant
from optimizer.kv_memory import kv_capacity_tokens
from optimizer.problem import AllocationOptions, Problem
from optimizer.profile import ParametricProfile, ProfilePoint, TabulatedProfile
from optimizer.simulation.replica import simulate_replica
from optimizer.workload import SLO, LengthBucket, Workload

H100 = Accelerator(name="H100", memory_gb=80, cost_per_hour=4.0)
A100 = Accelerator(name="A100-80G", memory_gb=80, cost_per_hour=2.0)
L4 = Accelerator(name="L4", memory_gb=24, cost_per_hour=0.8)
LLAMA8B = ModelSpec(name="llama-8b", weight_gb=16, kv_bytes_per_token=131072)
LLAMA13B = ModelSpec(name="llama-13b", weight_gb=26, kv_bytes_per_token=819200)
MISTRAL7B = ModelSpec(name="mistral-7b", weight_gb=14.5, kv_bytes_per_token=131072)

# Roofline-like numbers: decode reads the weights (+ KV per token), prefill is compute-bound.
H100_8B = ParametricProfile(decode_base_s=0.006, decode_per_seq_s=6e-5, decode_per_kv_token_s=4.9e-8,
                            prefill_base_s=0.002, prefill_per_token_s=3.2e-5)
A100_13B = ParametricProfile(decode_base_s=0.016, decode_per_seq_s=1e-4, decode_per_kv_token_s=5e-7,
                             prefill_base_s=0.004, prefill_per_token_s=1.67e-4)
L4_7B = TabulatedProfile(
    decode_points=[ProfilePoint(x=b, time_s=t) for b, t in [(1, .060), (8, .0625), (32, .070), (64, .082),
                                                             (128, .105)]],
    prefill_points=[ProfilePoint(x=x, time_s=t) for x, t in [(16, .012), (128, .040), (512, .140),
                                                              (2048, .56), (8192, 2.4)]],
    decode_per_kv_token_s=5.5e-7,
)

REPLICAS = {
    "h100-8b": (H100, LLAMA8B, H100_8B, 128, SLO(model="llama-8b", ttft_s=0.5, itl_s=0.04)),
    "a100-13b": (A100, LLAMA13B, A100_13B, 64, SLO(model="llama-13b", ttft_s=1.5, itl_s=0.06)),
    "l4-7b": (L4, MISTRAL7B, L4_7B, 64, SLO(model="mistral-7b", ttft_s=2.0, itl_s=0.12)),
}
MIXES = {"chat": (256, 128), "long-prompt": (2000, 200), "long-generation": (300, 800)}

SIM_REQUESTS = 3000
SPREAD = 0.25


def _replica(name: str, role: Role | str = Role.BOTH, **variant_over):
    acc, model, profile, max_batch, slo = REPLICAS[name]
    fields = dict(name=f"{name}-{Role(role).value}", model=model.name, accelerator=acc.name, max_batch=max_batch,
                  role=role, profile=profile)
    fields.update(variant_over)
    return Variant(**fields), model, acc, slo


def _bucket(inp: float, out: float) -> LengthBucket:
    return LengthBucket(input_tokens=inp, output_tokens=out, share=1.0)


def _simulated_break_rate(variant, model, acc, slo, inp, out, guess, *, kv_transfer_s=0.0, steps=8):
    """Bisect the Poisson rate in [0.6, 1.4] x guess where the simulated percentile first misses the SLO."""
    rng = np.random.default_rng(20240601)
    unit_gaps = rng.exponential(1.0, SIM_REQUESTS)
    ins = np.maximum(1, np.round(inp * (1 + SPREAD * rng.uniform(-1, 1, SIM_REQUESTS))))
    outs = np.maximum(1, np.round(out * (1 + SPREAD * rng.uniform(-1, 1, SIM_REQUESTS))))
    kv = kv_capacity_tokens(model, acc, variant.accelerators_per_replica)
    warm = slice(SIM_REQUESTS // 10, None)

    def misses(rate):
        rec = simulate_replica(variant.profile, np.cumsum(unit_gaps / rate), ins, outs, max_batch=variant.max_batch,
                               kv_capacity_tokens=kv, role=variant.role, kv_transfer_s=kv_transfer_s)
        bad = False
        if variant.role.does_prefill:
            bad |= np.percentile(rec.ttft_s[warm], slo.percentile) > slo.ttft_s
        if variant.role.does_decode:
            bad |= np.nanpercentile(rec.itl_s[warm], slo.percentile) > slo.itl_s
        return bad

    lo, hi = 0.6 * guess, 1.4 * guess
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if misses(mid) else (mid, hi)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("replica", REPLICAS)
def test_model_max_rate_within_10_percent_of_simulated_slo_break(replica, mix):
    variant, model, acc, slo = _replica(replica)
    inp, out = MIXES[mix]
    est = replica_capacity(variant, model, acc, _bucket(inp, out), slo)
    assert est.max_rate_rps > 0
    simulated = _simulated_break_rate(variant, model, acc, slo, inp, out, est.max_rate_rps)
    assert est.max_rate_rps == pytest.approx(simulated, rel=0.10), (est, simulated)


@pytest.mark.parametrize("role", [Role.PREFILL, Role.DECODE])
@pytest.mark.parametrize("replica", REPLICAS)
def test_disaggregated_roles_within_10_percent_of_simulation(replica, role):
    """Told the spread the simulated lengths have (uniform +/-25 %: cv 0.144): around a 2000-token mean,
    a 2048-token budget splits half the prompts into two chunks, which a spread-blind bucket cannot know."""
    variant, model, acc, slo = _replica(replica, role)
    inp, out = MIXES["long-prompt"]
    transfer = inp * model.kv_bytes_per_token / 25e9
    cv = SPREAD / math.sqrt(3.0)
    bucket = _bucket(inp, out).model_copy(update={"input_tokens_cv": cv, "output_tokens_cv": cv})
    est = replica_capacity(variant, model, acc, bucket, slo, kv_transfer_s=transfer)
    simulated = _simulated_break_rate(variant, model, acc, slo, inp, out, est.max_rate_rps, kv_transfer_s=transfer)
    assert est.max_rate_rps == pytest.approx(simulated, rel=0.10), (est, simulated)


# ----- sizing rules -----

def test_prefill_role_ignores_itl_and_pd_does_not():
    bucket = _bucket(512, 256)
    impossible_itl = {"itl_s": 1e-6}
    p_variant, model, acc, slo = _replica("h100-8b", Role.PREFILL)
    pd_variant, *_ = _replica("h100-8b", Role.BOTH)
    tight = slo.model_copy(update=impossible_itl)
    assert replica_capacity(p_variant, model, acc, bucket, tight).max_rate_rps == \
        replica_capacity(p_variant, model, acc, bucket, slo).max_rate_rps > 0
    pd = replica_capacity(pd_variant, model, acc, bucket, tight)
    assert pd.max_rate_rps == 0 and pd.limiting == "itl" and "decodes" in pd.reason


def test_decode_role_ignores_prefill_ttft_and_pd_does_not():
    bucket = _bucket(2000, 200)
    d_variant, model, acc, slo = _replica("a100-13b", Role.DECODE)
    pd_variant, *_ = _replica("a100-13b", Role.BOTH)
    tight = slo.model_copy(update={"ttft_s": 0.01})  # far below one 2000-token prefill
    d_tight = replica_capacity(d_variant, model, acc, bucket, tight)
    assert d_tight.max_rate_rps == replica_capacity(d_variant, model, acc, bucket, slo).max_rate_rps > 0
    assert d_tight.ttft_s is None
    pd = replica_capacity(pd_variant, model, acc, bucket, tight)
    assert pd.max_rate_rps == 0 and pd.limiting == "ttft" and "prefill" in pd.reason


def test_kv_transfer_lowers_prefill_capacity_and_shows_in_ttft():
    variant, model, acc, slo = _replica("l4-7b", Role.PREFILL)
    bucket = _bucket(2000, 200)
    without = replica_capacity(variant, model, acc, bucket, slo)
    with_transfer = replica_capacity(variant, model, acc, bucket, slo, kv_transfer_s=0.4)
    assert 0 < with_transfer.max_rate_rps < without.max_rate_rps
    assert with_transfer.ttft_s <= slo.ttft_s + 1e-6
    too_slow = replica_capacity(variant, model, acc, bucket, slo, kv_transfer_s=slo.ttft_s)
    assert too_slow.max_rate_rps == 0 and "KV transfer" in too_slow.reason


@pytest.mark.parametrize("role", [Role.BOTH, Role.PREFILL, Role.DECODE])
@pytest.mark.parametrize("replica", REPLICAS)
def test_looser_slo_never_lowers_capacity(replica, role):
    variant, model, acc, slo = _replica(replica, role)
    bucket = _bucket(*MIXES["chat"])
    previous = -1.0
    for scale in [0.8, 1.0, 1.5, 2.0, 4.0]:
        looser = slo.model_copy(update={"ttft_s": slo.ttft_s * scale, "itl_s": slo.itl_s * scale})
        rate = replica_capacity(variant, model, acc, bucket, looser).max_rate_rps
        assert rate >= previous * (1 - 1e-9)
        previous = rate
    previous = -1.0
    for pct in [99.0, 95.0, 90.0, 50.0]:
        rate = replica_capacity(variant, model, acc, bucket, slo.model_copy(update={"percentile": pct})).max_rate_rps
        assert rate >= previous * (1 - 1e-9)
        previous = rate
    assert previous > 0


@pytest.mark.parametrize("role", [Role.BOTH, Role.DECODE])
@pytest.mark.parametrize("replica", REPLICAS)
def test_longer_outputs_never_raise_capacity(replica, role):
    variant, model, acc, slo = _replica(replica, role)
    rates = [replica_capacity(variant, model, acc, _bucket(300, out), slo).max_rate_rps
             for out in [16, 64, 128, 256, 512, 1024]]
    assert rates[0] > 0
    assert all(b <= a * (1 + 1e-9) for a, b in zip(rates, rates[1:], strict=False)), rates


def test_infeasible_at_zero_load_gives_zero_with_reason():
    variant, model, acc, slo = _replica("l4-7b")
    prefill_too_slow = replica_capacity(variant, model, acc, _bucket(8000, 100), slo)
    assert prefill_too_slow.max_rate_rps == 0
    assert prefill_too_slow.limiting == "ttft" and "prefill of 8000 tokens" in prefill_too_slow.reason
    decode_too_slow = replica_capacity(variant, model, acc, _bucket(100, 100), slo.model_copy(update={"itl_s": 0.05}))
    assert decode_too_slow.max_rate_rps == 0 and decode_too_slow.limiting == "itl"
    e2e_too_tight = replica_capacity(variant, model, acc, _bucket(100, 100), slo.model_copy(update={"e2e_s": 3.0}))
    assert e2e_too_tight.max_rate_rps == 0 and e2e_too_tight.limiting == "e2e"
    kv = kv_capacity_tokens(model, acc)
    too_long = replica_capacity(variant, model, acc, _bucket(kv, 10), slo.model_copy(update={"ttft_s": 1e4}))
    assert too_long.max_rate_rps == 0 and too_long.limiting == "kv_memory" and "KV-cache" in too_long.reason


def test_kv_memory_limits_the_batch():
    variant, model, acc, slo = _replica("a100-13b")
    bucket = _bucket(2000, 1000)
    kv = kv_capacity_tokens(model, acc)
    est = replica_capacity(variant, model, acc, bucket, slo.model_copy(update={"itl_s": 0.2}))
    assert est.max_concurrency == math.floor(kv / 3000) < variant.max_batch
    assert est.limiting == "kv_memory"
    assert est.batch_at_max <= est.max_concurrency
    roomier = replica_capacity(variant, model, acc.model_copy(update={"memory_gb": 160}), bucket,
                               slo.model_copy(update={"itl_s": 0.2}))
    assert roomier.max_concurrency > est.max_concurrency
    assert roomier.max_rate_rps > est.max_rate_rps


def test_max_batch_limits_when_memory_is_plentiful():
    variant, model, acc, slo = _replica("h100-8b")
    est = replica_capacity(variant, model, acc, _bucket(*MIXES["chat"]), slo)
    assert est.max_concurrency == variant.max_batch and est.limiting == "max_batch"
    bigger = replica_capacity(variant.model_copy(update={"max_batch": 256}), model, acc, _bucket(*MIXES["chat"]), slo)
    assert bigger.max_rate_rps > est.max_rate_rps


def test_service_level_scales_the_rate_and_predictions_follow_it():
    variant, model, acc, slo = _replica("h100-8b")
    bucket = _bucket(*MIXES["long-prompt"])
    full = replica_capacity(variant, model, acc, bucket, slo)
    headroom = replica_capacity(variant, model, acc, bucket, slo, service_level=0.7)
    assert headroom.max_rate_rps == pytest.approx(0.7 * full.max_rate_rps, rel=1e-9)
    assert headroom.itl_s < full.itl_s
    with pytest.raises(ValueError, match="service_level"):
        replica_capacity(variant, model, acc, bucket, slo, service_level=0.0)


def test_predictions_at_max_rate_respect_the_slo():
    for name in REPLICAS:
        for role in Role:
            variant, model, acc, slo = _replica(name, role)
            for inp, out in MIXES.values():
                est = replica_capacity(variant, model, acc, _bucket(inp, out), slo)
                if est.max_rate_rps == 0:
                    continue
                if est.ttft_s is not None:
                    assert est.ttft_s <= slo.ttft_s * (1 + 1e-6)
                if est.itl_s is not None:
                    assert est.itl_s <= slo.itl_s * (1 + 1e-6)


def _problem(service_level=1.0):
    variants = []
    for name in REPLICAS:
        for role in Role:
            variants.append(_replica(name, role)[0])
    buckets = [LengthBucket(input_tokens=i, output_tokens=o, share=1 / 3) for i, o in MIXES.values()]
    models = [LLAMA8B, LLAMA13B, MISTRAL7B]
    return Problem(
        accelerators=[H100, A100, L4], models=models, variants=variants,
        workloads=[Workload(model=m.name, arrival_rate_rps=5.0, buckets=buckets) for m in models[:2]],
        slos=[REPLICAS[n][4] for n in REPLICAS],
        options=AllocationOptions(kv_transfer_gb_s=10.0, service_level=service_level),
    )


def test_capacity_table_covers_variants_with_demand_and_matches_single_calls():
    problem = _problem()
    table = capacity_table(problem)
    with_demand = [v for v in problem.variants if problem.workload(v.model) is not None]
    assert set(table) == {(v.name, b.label) for v in with_demand for b in problem.workload(v.model).buckets}
    for (vname, label), est in table.items():
        v = next(x for x in problem.variants if x.name == vname)
        b = next(x for x in problem.workload(v.model).buckets if x.label == label)
        model = problem.model(v.model)
        transfer = 0.0 if v.role is Role.BOTH else b.input_tokens * model.kv_bytes_per_token / 10e9
        single = replica_capacity(v, model, problem.accelerator(v.accelerator), b, problem.slo(v.model),
                                  kv_transfer_s=transfer)
        assert est == single
        CapacityEstimate.model_validate(est.model_dump())  # what model_construct built is valid


def _long_context_problem(ttft_s: float = 10.0) -> Problem:
    """The example fleet's 70B with a 10 s p99 TTFT, 80 % of its requests long-context prompts
    (mean 17.1k tokens, cv 0.9: longctx70b's 4096+ bucket at its longest) whose p99 prefill alone
    nearly fills the TTFT."""
    from optimizer.problem import load_problem

    fleet = load_problem(pathlib.Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml")
    big = "Llama-3.1-70B"
    slos = [s.model_copy(update={"ttft_s": ttft_s, "itl_s": 0.1, "percentile": 99.0}) if s.model == big else s
            for s in fleet.slos]
    buckets = [LengthBucket(name="long", input_tokens=17100, output_tokens=270, share=0.8, input_tokens_cv=0.9,
                            output_tokens_cv=0.8),
               LengthBucket(name="short", input_tokens=1500, output_tokens=270, share=0.2, input_tokens_cv=0.5,
                            output_tokens_cv=0.8)]
    return fleet.model_copy(update={"slos": slos, "workloads": [Workload(model=big, arrival_rate_rps=0.1,
                                                                         buckets=buckets)]})


def _direct(problem: Problem, variant: Variant, bucket: LengthBucket, percentile: float) -> CapacityEstimate:
    model, acc = problem.model(variant.model), problem.accelerator(variant.accelerator)
    slo = problem.slo(variant.model).model_copy(update={"percentile": percentile})
    transfer = 0.0 if variant.role is Role.BOTH else \
        bucket.input_tokens * model.kv_bytes_per_token / (problem.options.kv_transfer_gb_s * 1e9)
    return replica_capacity(variant, model, acc, bucket, slo, kv_transfer_s=transfer)


def test_a_bucket_no_variant_serves_at_its_percentile_is_planned_at_the_highest_one_serves():
    """At p99 no 70B variant prefills the long bucket (rate 0 on every PD and P variant), so the allocation planned
    nothing for 80 % of the requests. It is planned at the highest percentile of the grid some variant
    serves it at (p98.7: the H100 prefill server), and the estimates say so; the short bucket is untouched."""
    from optimizer.allocation import allocate

    problem = _long_context_problem()
    variants = [v for v in problem.variants if v.model == "Llama-3.1-70B"]
    long, short = problem.workloads[0].buckets
    assert all(_direct(problem, v, long, 99.0).max_rate_rps == 0 for v in variants if v.role is not Role.DECODE)
    table = capacity_table(problem)
    level = table[("llama70b-prefill-h100x4", "long")].percentile
    assert level == pytest.approx(100.0 - 2 ** (1 / 3))
    assert table[("llama70b-prefill-h100x4", "long")].max_rate_rps > 0
    assert "planned at p98.7" in table[("llama70b-prefill-h100x4", "long")].reason
    for v in variants:
        assert table[(v.name, "long")].percentile == level
        assert table[(v.name, "long")].max_rate_rps == pytest.approx(_direct(problem, v, long, level).max_rate_rps)
        assert table[(v.name, "short")].percentile is None
        assert table[(v.name, "short")].max_rate_rps == pytest.approx(_direct(problem, v, short, 99.0).max_rate_rps)
    plan = allocate(problem, {k: e.max_rate_rps for k, e in table.items()})
    assert plan.unmet_demand_rps.get("Llama-3.1-70B", 0.0) == pytest.approx(0.0, abs=1e-6)
    assert plan.replicas.get("llama70b-prefill-h100x4", 0) >= 1


def test_a_bucket_no_percentile_rescues_stays_unserved_with_its_reason():
    """A TTFT below the long prompts' own prefill fails at every percentile: still rate 0, the reason
    why, and no lowered percentile claimed."""
    problem = _long_context_problem(ttft_s=0.5)
    table = capacity_table(problem)
    for v in (v for v in problem.variants if v.model == "Llama-3.1-70B" and v.role is not Role.DECODE):
        est = table[(v.name, "long")]
        assert est.max_rate_rps == 0 and est.percentile is None and est.reason


def test_service_level_is_applied_once_by_the_allocation_not_by_the_table():
    from optimizer.allocation import allocate

    full = capacity_table(_problem())
    half = capacity_table(_problem(service_level=0.5))
    assert {k: e.max_rate_rps for k, e in half.items()} == {k: e.max_rate_rps for k, e in full.items()}
    plans = {}
    for level in (1.0, 0.5):
        problem = _problem(service_level=level)
        rates = {k: e.max_rate_rps for k, e in capacity_table(problem).items()}
        plans[level] = allocate(problem, rates)
        assert all(load <= level + 1e-6 for load in plans[level].normalized_load.values())
    assert plans[0.5].cost_per_hour >= plans[1.0].cost_per_hour


def test_capacity_estimate_rejects_bad_values():
    with pytest.raises(ValidationError):
        CapacityEstimate(variant="v", bucket="b", max_rate_rps=-1, ttft_s=None, itl_s=None, e2e_s=None,
                         batch_at_max=0, max_concurrency=0, kv_capacity_tokens=0, limiting="none")
    with pytest.raises(ValidationError):
        CapacityEstimate(variant="v", bucket="b", max_rate_rps=1, ttft_s=None, itl_s=None, e2e_s=None,
                         batch_at_max=0, max_concurrency=0, kv_capacity_tokens=0, limiting="gpu")


def test_fluctuation_table_matches_direct_quadrature_and_poisson_limit():
    g = np.array([0.05, 0.25, 0.6, 0.3, 0.0, 0.45])
    rho = np.array([0.8, 0.5, 0.1, 0.3, 0.3, 0.45])
    table = np.array(fluctuation_factors(g, rho))
    direct = np.array(_integrals(g, rho))
    np.testing.assert_allclose(table, direct, rtol=0.02)
    j, c, jn = fluctuation_factors(np.array([1e-9]), np.array([0.0]))
    assert j[0] == pytest.approx(0.0, abs=1e-6) and c[0] == pytest.approx(0.0, abs=1e-6)
    assert jn[0] == pytest.approx(1.0, abs=1e-6)  # no feedback: the batch is Poisson


@pytest.mark.parametrize("role", [Role.BOTH, Role.DECODE])
def test_e2e_target_binds_between_unloaded_and_loaded_latency(role):
    variant, model, acc, slo = _replica("a100-13b", role)
    bucket = _bucket(*MIXES["long-generation"])
    free = replica_capacity(variant, model, acc, bucket, slo)
    assert free.e2e_s is not None
    unloaded = REPLICAS["a100-13b"][2].prefill_s(300) + 799 * REPLICAS["a100-13b"][2].decode_step_s(1, 300 + 400)
    target = 0.5 * (unloaded + free.e2e_s)
    assert target < free.e2e_s
    bound = replica_capacity(variant, model, acc, bucket, slo.model_copy(update={"e2e_s": target}))
    assert 0 < bound.max_rate_rps < free.max_rate_rps
    assert bound.limiting == "e2e" and bound.e2e_s <= target * (1 + 1e-6)


def test_odd_profiles_and_shapes_give_consistent_answers():
    """Random fleets, including measured tables that start at large batches and one-token answers:
    every estimate is finite, 0 exactly when a reason is given, and its predictions meet the SLO."""
    rng = np.random.default_rng(11)
    acc = Accelerator(name="X", memory_gb=80, cost_per_hour=1.0)
    models, variants, workloads, slos = [], [], [], []
    for i in range(40):
        model = ModelSpec(name=f"m{i}", weight_gb=float(rng.uniform(1, 60)),
                          kv_bytes_per_token=float(rng.choice([2e4, 1.3e5, 8e5, 3e6])))
        if i % 2:
            xs = np.sort(rng.choice(np.arange(1, 512), 4, replace=False))
            px = np.sort(rng.choice(np.arange(1, 20000), 3, replace=False))
            profile = TabulatedProfile(
                decode_points=[ProfilePoint(x=float(x), time_s=float(t)) for x, t in
                               zip(xs, np.sort(rng.uniform(0.005, 0.3, 4)), strict=True)],
                prefill_points=[ProfilePoint(x=float(x), time_s=float(t)) for x, t in
                                zip(px, np.sort(rng.uniform(0.001, 3, 3)), strict=True)],
                decode_per_kv_token_s=float(rng.uniform(0, 1e-7)))
        else:
            profile = ParametricProfile(
                decode_base_s=float(rng.uniform(1e-3, 0.1)), decode_per_seq_s=float(rng.uniform(0, 1e-3)),
                decode_per_kv_token_s=float(rng.uniform(0, 1e-6)), prefill_base_s=float(rng.uniform(0, 0.05)),
                prefill_per_token_s=float(rng.uniform(1e-6, 1e-3)))
        models.append(model)
        for role in Role:
            variants.append(Variant(name=f"v{i}-{role.value}", model=model.name, accelerator="X", role=role,
                                    max_batch=int(rng.choice([1, 8, 64, 512])), profile=profile,
                                    accelerators_per_replica=int(rng.choice([1, 2, 8]))))
        workloads.append(Workload(model=model.name, arrival_rate_rps=1.0, buckets=[
            LengthBucket(input_tokens=float(a), output_tokens=float(b), share=0.25)
            for a, b in [(1, 1), (10, 1000), (500, 50), (30000, 4000)]]))
        slos.append(SLO(model=model.name, ttft_s=float(rng.choice([0.05, 0.5, 5])), itl_s=float(rng.choice([0.01, 0.05, 0.5])),
                        e2e_s=[None, 10.0, 300.0][i % 3], percentile=float(rng.choice([50, 90, 99, 99.9]))))
    problem = Problem(accelerators=[acc], models=models, variants=variants, workloads=workloads, slos=slos,
                      options=AllocationOptions(service_level=0.8))
    table = capacity_table(problem)
    assert len(table) == len(variants) * 4
    servable = 0
    for (vname, _), est in table.items():
        slo = problem.slo(next(v.model for v in variants if v.name == vname))
        assert math.isfinite(est.max_rate_rps) and est.max_rate_rps >= 0
        assert (est.max_rate_rps == 0) == (est.reason is not None), est
        if est.max_rate_rps > 0:
            servable += 1
            for value, target in ((est.ttft_s, slo.ttft_s), (est.itl_s, slo.itl_s), (est.e2e_s, slo.e2e_s)):
                if value is not None and target is not None:
                    assert value <= target * (1 + 1e-6), (est, slo)
    assert servable > len(table) // 4


# ----- p99 with lengths spread within a bucket (real traffic: short answers, long prompts) -----

SPREAD_REQUESTS = 3000
SPREAD_CV_IN, SPREAD_CV_OUT = 0.5, 0.8


def _lognormal(rng, mean: float, cv: float, n: int) -> np.ndarray:
    sigma = math.sqrt(math.log1p(cv * cv))
    return mean * np.exp(sigma * rng.standard_normal(n) - sigma * sigma / 2)


def _p99_break_rate(variant, model, acc, slo, ins, outs, guess, steps=7):
    """Bisect the Poisson rate in [0.5, 1.5] x guess where the simulated p99 TTFT or ITL first misses."""
    gaps = np.random.default_rng(20240601).exponential(1.0, len(ins))
    kv = kv_capacity_tokens(model, acc, variant.accelerators_per_replica)
    warm = slice(len(ins) // 10, None)

    def misses(rate):
        rec = simulate_replica(variant.profile, np.cumsum(gaps / rate), ins, outs, max_batch=variant.max_batch,
                               kv_capacity_tokens=kv, role=variant.role)
        return (np.percentile(rec.ttft_s[warm], slo.percentile) > slo.ttft_s
                or np.nanpercentile(rec.itl_s[warm], slo.percentile) > slo.itl_s)

    lo, hi = 0.5 * guess, 1.5 * guess
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if misses(mid) else (mid, hi)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("replica", REPLICAS)
def test_p99_with_spread_lengths_is_closer_to_simulation_than_the_spread_blind_model(replica):
    """Long prompts (lognormal, cv 0.5) with spread answers (cv 0.8) at p99: the spread-blind model
    (bucket means only) overestimates capacity by 8-45 % on these replicas, because at p99 the short
    answers (few decode steps to average stalls over) and the long prompts (long stalls, long own
    prefill) break the SLO, not the mean request. Told the spread, the model must be within 16 %
    of the simulated break and strictly closer than without it."""
    variant, model, acc, slo = _replica(replica)
    slo = slo.model_copy(update={"percentile": 99.0})
    rng = np.random.default_rng(7)
    inp, out = MIXES["long-prompt"]
    ins = np.maximum(1, np.round(_lognormal(rng, inp, SPREAD_CV_IN, SPREAD_REQUESTS)))
    outs = np.maximum(2, np.round(_lognormal(rng, out, SPREAD_CV_OUT, SPREAD_REQUESTS)))
    spread = LengthBucket(input_tokens=float(ins.mean()), output_tokens=float(outs.mean()), share=1.0,
                          input_tokens_cv=float(ins.std() / ins.mean()), output_tokens_cv=float(outs.std() / outs.mean()))
    blind = spread.model_copy(update={"input_tokens_cv": 0.0, "output_tokens_cv": 0.0})
    told = replica_capacity(variant, model, acc, spread, slo).max_rate_rps
    naive = replica_capacity(variant, model, acc, blind, slo).max_rate_rps
    simulated = _p99_break_rate(variant, model, acc, slo, ins, outs, told)
    assert told == pytest.approx(simulated, rel=0.16), (told, naive, simulated)
    assert abs(told - simulated) < abs(naive - simulated), (told, naive, simulated)


def _example_prefill_server(name: str = "llama70b-prefill-h100x4"):
    from optimizer.problem import load_problem

    fleet = load_problem(pathlib.Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml")
    variant = next(v for v in fleet.variants if v.name == name)
    model, acc = fleet.model(variant.model), fleet.accelerator(variant.accelerator)
    return fleet, variant, model, acc


def _long_context_cell(mean_in: float, cv_in: float, ttft_s: float, *, queue: bool, requests: int = 3000):
    """(model's max rate, simulated break) for the 70B prefill server on lognormal prompts at p99 TTFT."""
    from optimizer.simulation.capacity_accuracy import bucket_of, simulated_max_rate

    fleet, variant, model, acc = _example_prefill_server()
    rng = np.random.default_rng(11)
    ins = np.maximum(500, np.round(_lognormal(rng, mean_in, cv_in, requests))).astype(np.int64)
    outs = np.maximum(8, np.round(_lognormal(rng, 250, 0.8, requests))).astype(np.int64)
    bucket = bucket_of(ins, outs)
    slo = fleet.slo(variant.model).model_copy(update={"ttft_s": ttft_s, "percentile": 99.0})
    transfer = bucket.input_tokens * model.kv_bytes_per_token / (fleet.options.kv_transfer_gb_s * 1e9)
    est = replica_capacity(variant, model, acc, bucket, slo, kv_transfer_s=transfer, prefill_queue=queue)
    assert est.max_rate_rps > 0, est
    simulated = simulated_max_rate(variant, model, acc, slo, ins, outs, est.max_rate_rps, span=(0.3, 3.0), steps=9,
                                   kv_transfer_s=transfer)
    return est.max_rate_rps, simulated


def test_prefill_server_queues_long_prompts_first_come_first_served():
    """A prefill server under a token budget (chunked prefill) works through its prompts first come first
    served: a prompt waits for every prompt ahead of it (an M/G/1 queue), and its first token waits for
    the chunks of the next prompts that fill its last iteration (``AllocationOptions.prefill_queue``).
    Modelled as one batch of the waiting prompts, as a server without a budget runs (the default), the
    70B H100 prefill server on 8k-token prompts (lognormal, cv 0.5) at a 5 s p99 TTFT is rated 10 % above
    the simulated break (0.856 vs 0.778 req/s); queued, within 5 %."""
    predicted, simulated = _long_context_cell(8000, 0.5, 5.0, queue=True)
    assert predicted == pytest.approx(simulated, rel=0.05), (predicted, simulated)
    batch, _ = _long_context_cell(8000, 0.5, 5.0, queue=False)
    assert batch > predicted


def test_prefill_queue_option_reaches_the_capacity_table():
    """The option travels with the problem (the engine and the operator build tables from it) and keys the
    cache: the same bucket gives the two answers, never one cached for the other."""
    fleet, variant, model, acc = _example_prefill_server()
    bucket = LengthBucket(input_tokens=8000, output_tokens=250, share=1.0, input_tokens_cv=0.5, output_tokens_cv=0.8)
    workload = Workload(model=variant.model, arrival_rate_rps=1.0, buckets=[bucket])
    key = (variant.name, bucket.label)
    tables = [capacity_table(fleet.model_copy(update={
        "workloads": [workload], "options": fleet.options.model_copy(update={"prefill_queue": on})}))[key]
        for on in (False, True, False)]
    assert tables[0].max_rate_rps == tables[2].max_rate_rps != tables[1].max_rate_rps > 0


def test_length_spread_never_raises_capacity():
    for name in REPLICAS:
        variant, model, acc, slo = _replica(name)
        base = _bucket(*MIXES["chat"])
        plain = replica_capacity(variant, model, acc, base, slo).max_rate_rps
        for cv_in, cv_out in [(0.5, 0.0), (0.0, 0.8), (0.5, 0.8), (1.0, 1.5)]:
            spread = base.model_copy(update={"input_tokens_cv": cv_in, "output_tokens_cv": cv_out})
            assert replica_capacity(variant, model, acc, spread, slo).max_rate_rps <= plain * (1 + 1e-9)


# ----- the accuracy bar (issue 9 item 2): example fleet x four mixes x p90/p99, within +/-5 % -----

ACCURACY_BAR = 0.05
# Cells measured outside the bar (model / simulator - 1, `benchmarks/bench_capacity.py` prints them
# all). Each is named here with its figure, never silently passed: the bar holds on every other cell.
#   - long prompts on PD replicas, ITL-bound: a short answer decoding through a few ~0.8 s prefills
#     has a self-exciting stall count (busy-period skew, gamma tail); still light for 32B and A100.
#   - 8B on H100, short chat: slot-bound at 254 sequences, the Erlang C wait is a little high.
#   - 8B on L4, KV-bound at p99: 13 slots, the heavy-traffic wait tail is too light.
#   - 70B p99 with spread prompts (chat, Azure-like): the busy-period skew overshoots (pessimistic).
KNOWN_GAPS = {
    ("llama8b-h100", "chat", 90.0): -0.057,
    ("llama8b-h100", "chat", 99.0): -0.071,
    ("llama8b-l4", "kv-bound", 99.0): +0.115,
    ("qwen32b-h100x2", "long-prompt", 99.0): +0.106,
    ("llama70b-h100x4", "azure-conv", 99.0): -0.050,
    ("llama70b-h100x4", "long-prompt", 99.0): +0.056,
    ("llama70b-a100x4", "chat", 99.0): -0.054,
    ("llama70b-a100x4", "azure-conv", 99.0): -0.074,
    ("llama70b-a100x4", "long-prompt", 90.0): +0.092,
}
# Cells the model refuses (rate 0): 8B on L4 cannot prefill a 10k prompt within 3 s, and its Azure-like
# p99 prompt (~4k tokens) leaves too little TTFT room; the simulator agrees at any useful rate.
UNSERVABLE = {("llama8b-l4", "long-prompt", 90.0), ("llama8b-l4", "long-prompt", 99.0),
              ("llama8b-l4", "azure-conv", 99.0)}


@pytest.fixture(scope="module")
def accuracy_grid():
    from optimizer.problem import load_problem
    from optimizer.simulation.capacity_accuracy import accuracy_cells

    fleet = load_problem(pathlib.Path(__file__).resolve().parents[1] / "examples" / "fleet.yaml")
    return fleet, accuracy_cells(fleet, workers=2)


def test_predicted_max_rate_is_within_5_percent_of_the_simulated_one_on_the_example_fleet(accuracy_grid):
    from optimizer.simulation.capacity_accuracy import ACCURACY_VARIANTS, MIXES, PERCENTILES, format_table

    _, cells = accuracy_grid
    print("\n" + format_table(cells, ACCURACY_BAR))
    assert len(ACCURACY_VARIANTS) >= 5 and len(MIXES) >= 4 and set(PERCENTILES) == {90.0, 99.0}
    assert len(cells) == len(ACCURACY_VARIANTS) * len(MIXES) * len(PERCENTILES)
    assert {k for k, c in cells.items() if c is None} == UNSERVABLE
    outside = {k: round(c.error, 3) for k, c in cells.items()
               if c is not None and k not in KNOWN_GAPS and abs(c.error) > ACCURACY_BAR}
    assert not outside, outside
    within = [k for k, c in cells.items() if c is not None and abs(c.error) <= ACCURACY_BAR]
    assert len(within) >= 36, len(within)  # of 45 servable
    # Every profile meets the bar on at least two mixes at both percentiles, every mix on >= 5 profiles.
    for v in ACCURACY_VARIANTS:
        assert sum(1 for k in within if k[0] == v) >= 4, v
    for m in MIXES:
        assert len({k[0] for k in within if k[1] == m}) >= 5, m


def test_known_accuracy_gaps_stay_where_they_were_measured(accuracy_grid):
    """Not the bar: a guard that the named gaps do not grow (each within 3 points of its figure)."""
    _, cells = accuracy_grid
    for key, measured in KNOWN_GAPS.items():
        cell = cells[key]
        assert cell is not None, key
        assert abs(cell.error - measured) <= 0.03, (key, cell.error, measured)


def test_the_simulator_agrees_the_refused_cells_cannot_be_served(accuracy_grid):
    from optimizer.simulation.capacity_accuracy import cell_slo, misses_slo, mix_lengths

    fleet, _ = accuracy_grid
    for variant_name, mix, pct in sorted(UNSERVABLE):
        variant = next(v for v in fleet.variants if v.name == variant_name)
        ins, outs = mix_lengths(mix, 1500)
        kv = kv_capacity_tokens(fleet.model(variant.model), fleet.accelerator(variant.accelerator))
        gaps = np.random.default_rng(1).exponential(1.0, len(ins))
        slo = cell_slo(fleet, variant, mix, pct)
        assert misses_slo(variant, kv, slo, gaps, ins, outs, rate=0.05), (variant_name, mix, pct)
