"""AllocationOptions.shared_tail: the SLO's tail shared across a model's length buckets (optimizer.capacity)."""

from __future__ import annotations

import pytest

from optimizer.allocation import allocate
from optimizer.capacity import bucket_percentiles, capacity_table
from optimizer.fleet import Accelerator, ModelSpec, Role, Variant
from optimizer.problem import AllocationOptions, Problem
from optimizer.profile import ParametricProfile
from optimizer.workload import SLO, LengthBucket, Workload

H100 = Accelerator(name="H100", memory_gb=80, cost_per_hour=4.0)
A100 = Accelerator(name="A100-80G", memory_gb=80, cost_per_hour=2.0)
MODEL = ModelSpec(name="llama-8b", weight_gb=16, kv_bytes_per_token=131072)
FAST = ParametricProfile(decode_base_s=0.006, decode_per_seq_s=6e-5, decode_per_kv_token_s=4.9e-8,
                         prefill_base_s=0.002, prefill_per_token_s=3.2e-5)
SLOW = ParametricProfile(decode_base_s=0.010, decode_per_seq_s=1e-4, decode_per_kv_token_s=8e-8,
                         prefill_base_s=0.004, prefill_per_token_s=6.4e-5)
SLO_P99 = SLO(model=MODEL.name, ttft_s=1.5, itl_s=0.05, percentile=99)


def _problem(shared: bool, long_share: float = 0.75) -> Problem:
    """Short prompts and a dominant bucket of long, widely spread prompts whose p99 prefill nearly
    fills the TTFT target (the long-context benchmark's shape, at 8B scale)."""
    variants = [
        Variant(name="h100", model=MODEL.name, accelerator=H100.name, max_batch=128, profile=FAST),
        Variant(name="a100", model=MODEL.name, accelerator=A100.name, max_batch=128, profile=SLOW),
        Variant(name="a100-prefill", model=MODEL.name, accelerator=A100.name, max_batch=128, profile=SLOW,
                role=Role.PREFILL),
        Variant(name="a100-decode", model=MODEL.name, accelerator=A100.name, max_batch=128, profile=SLOW,
                role=Role.DECODE),
    ]
    buckets = [
        LengthBucket(name="short", input_tokens=600, output_tokens=200, share=(1 - long_share) / 2,
                     input_tokens_cv=0.3, output_tokens_cv=0.8),
        LengthBucket(name="mid", input_tokens=2500, output_tokens=250, share=(1 - long_share) / 2,
                     input_tokens_cv=0.2, output_tokens_cv=0.8),
        LengthBucket(name="long", input_tokens=7000, output_tokens=250, share=long_share,
                     input_tokens_cv=0.9, output_tokens_cv=0.8),
    ]
    return Problem(accelerators=[H100, A100], models=[MODEL], variants=variants,
                   workloads=[Workload(model=MODEL.name, arrival_rate_rps=3.0, buckets=buckets)], slos=[SLO_P99],
                   options=AllocationOptions(shared_tail=shared))


def _miss_share(problem: Problem, levels: dict) -> float:
    return sum(b.share * (100 - levels[(MODEL.name, b.label)]) for b in problem.workloads[0].buckets) / 100


def test_the_costly_bucket_takes_the_tail_the_others_leave_within_the_model_budget():
    problem = _problem(True)
    levels = bucket_percentiles(problem)
    assert levels[(MODEL.name, "long")] < 99.0 < levels[(MODEL.name, "short")]
    assert _miss_share(problem, levels) <= 0.01 + 1e-9, "99 % of all requests, as the SLO says"
    shared, plain = capacity_table(problem), capacity_table(_problem(False))
    for v in problem.variants:
        if v.role is not Role.DECODE:
            assert shared[(v.name, "long")].max_rate_rps >= plain[(v.name, "long")].max_rate_rps
    assert shared[("h100", "long")].max_rate_rps > 1.05 * plain[("h100", "long")].max_rate_rps
    cost = {on: allocate(p, {k: e.max_rate_rps for k, e in capacity_table(p).items()}).cost_per_hour
            for on, p in ((True, problem), (False, _problem(False)))}
    assert cost[True] <= cost[False]


def test_off_by_default_and_the_table_is_the_per_bucket_one():
    assert AllocationOptions().shared_tail is False
    off = capacity_table(_problem(False))
    for key, est in off.items():
        assert est.max_rate_rps == pytest.approx(capacity_table(_problem(False))[key].max_rate_rps)


@pytest.mark.parametrize("long_share", [0.5, 0.9, 0.98])
def test_the_budget_holds_whatever_the_mix(long_share):
    problem = _problem(True, long_share)
    levels = bucket_percentiles(problem)
    assert set(levels) == {(MODEL.name, b.label) for b in problem.workloads[0].buckets}
    assert _miss_share(problem, levels) <= 0.01 + 1e-9
    assert all(50.0 <= pct < 100.0 for pct in levels.values())
