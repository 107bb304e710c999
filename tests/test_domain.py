"""Domain model: profiles interpolate and fit correctly; bad input names the field and the reason."""

import copy
import json

import numpy as np
import pytest
from pydantic import ValidationError

from optimizer.fleet import Role, Variant
from optimizer.problem import InputError, Problem, load_problem
from optimizer.profile import (
    DecodeSample,
    ParametricProfile,
    PrefillSample,
    TabulatedProfile,
    fit_profile,
)
from optimizer.workload import SLO, LengthBucket, Workload

PARAM = {"kind": "parametric", "decode_base_s": 0.02, "decode_per_seq_s": 0.0004, "prefill_per_token_s": 1e-4}


def minimal_problem(**over):
    doc = {
        "accelerators": [{"name": "A100", "memory_gb": 80, "cost_per_hour": 3.0, "available": 8}],
        "models": [{"name": "llama", "weight_gb": 16, "kv_bytes_per_token": 131072}],
        "variants": [{"name": "llama-a100", "model": "llama", "accelerator": "A100", "max_batch": 64,
                      "profile": PARAM}],
        "workloads": [{"model": "llama", "arrival_rate_rps": 5,
                       "buckets": [{"input_tokens": 500, "output_tokens": 200, "share": 1.0}]}],
        "slos": [{"model": "llama", "ttft_s": 1.0, "itl_s": 0.05}],
    }
    doc.update(over)
    return copy.deepcopy(doc)


def test_parametric_profile_formula():
    p = ParametricProfile(decode_base_s=0.02, decode_per_seq_s=0.001, decode_per_kv_token_s=1e-7,
                          prefill_base_s=0.005, prefill_per_token_s=1e-4, prefill_per_token_sq_s=1e-9)
    assert p.decode_step_s(10, 1000) == pytest.approx(0.02 + 0.01 + 1e-7 * 10 * 1000)
    assert p.prefill_s(1000) == pytest.approx(0.005 + 0.1 + 1e-3)


def test_tabulated_profile_is_monotone_between_and_beyond_points():
    p = TabulatedProfile(
        decode_points=[{"x": 1, "time_s": 0.020}, {"x": 8, "time_s": 0.022}, {"x": 16, "time_s": 0.021},
                       {"x": 64, "time_s": 0.040}],
        prefill_points=[{"x": 128, "time_s": 0.012}, {"x": 1024, "time_s": 0.09}, {"x": 4096, "time_s": 0.4}],
    )
    batches = np.linspace(0.5, 200, 400)
    times = p.decode_step_s(batches)
    assert np.all(np.diff(times) >= -1e-15), "noisy dip at batch 16 must not make the curve decrease"
    assert p.decode_step_s(64) == pytest.approx(0.040)
    assert p.decode_step_s(128) > p.decode_step_s(64)
    assert p.prefill_s(1024) == pytest.approx(0.09)
    assert 0.012 < p.prefill_s(500) < 0.09
    assert p.prefill_s(8192) > p.prefill_s(4096)


def test_tabulated_profile_rejects_unsorted_points():
    with pytest.raises(ValidationError, match="strictly increasing"):
        TabulatedProfile(decode_points=[{"x": 8, "time_s": 0.1}, {"x": 1, "time_s": 0.1}],
                         prefill_points=[{"x": 1, "time_s": 0.1}, {"x": 2, "time_s": 0.2}])


def test_fit_profile_recovers_coefficients_despite_outliers():
    rng = np.random.default_rng(7)
    truth = ParametricProfile(decode_base_s=0.025, decode_per_seq_s=0.0003, decode_per_kv_token_s=2e-8,
                              prefill_base_s=0.01, prefill_per_token_s=8e-5)
    decode = []
    for _ in range(200):
        b, c = int(rng.integers(1, 128)), float(rng.integers(100, 4000))
        t = truth.decode_step_s(b, c) * (1 + rng.normal(0, 0.02))
        decode.append(DecodeSample(batch=b, context_tokens=c, step_s=t))
    decode += [DecodeSample(batch=4, context_tokens=500, step_s=2.0) for _ in range(10)]  # GC pauses
    prefill = [PrefillSample(tokens=t, time_s=truth.prefill_s(t) * (1 + rng.normal(0, 0.02)))
               for t in rng.integers(50, 8000, 100)]
    prefill += [PrefillSample(tokens=300, time_s=5.0) for _ in range(5)]
    fit = fit_profile(decode, prefill)
    assert fit.decode_base_s == pytest.approx(truth.decode_base_s, rel=0.05)
    assert fit.decode_per_seq_s == pytest.approx(truth.decode_per_seq_s, rel=0.15)
    assert fit.prefill_per_token_s == pytest.approx(truth.prefill_per_token_s, rel=0.05)
    for b in (1, 32, 128):
        assert fit.decode_step_s(b, 2000) == pytest.approx(truth.decode_step_s(b, 2000), rel=0.05)


def test_fit_profile_needs_samples():
    with pytest.raises(ValueError, match="at least 2 decode samples"):
        fit_profile([], [PrefillSample(tokens=1, time_s=1), PrefillSample(tokens=2, time_s=2)])


def test_role_accepts_crd_spellings():
    assert Role("prefill") is Role.PREFILL and Role("decode") is Role.DECODE and Role("both") is Role.BOTH
    assert Role("PD").does_prefill and Role("PD").does_decode and not Role("P").does_decode


def test_variant_min_above_max_is_rejected():
    with pytest.raises(ValidationError, match=r"min_replicas \(3\) must not exceed max_replicas \(2\)"):
        Variant(name="v", model="m", accelerator="a", max_batch=8, min_replicas=3, max_replicas=2, profile=PARAM)


def test_workload_shares_must_sum_to_one():
    with pytest.raises(ValidationError, match="sum to 0.8"):
        Workload(model="m", arrival_rate_rps=1, buckets=[
            LengthBucket(input_tokens=10, output_tokens=10, share=0.5),
            LengthBucket(input_tokens=100, output_tokens=10, share=0.3)])
    w = Workload(model="m", arrival_rate_rps=10, buckets=[
        LengthBucket(input_tokens=10, output_tokens=10, share=0.5),
        LengthBucket(input_tokens=100, output_tokens=10, share=0.5)])
    assert w.bucket_rates_rps() == {"10x10": 5.0, "100x10": 5.0}


def test_slo_percentile_bounds():
    with pytest.raises(ValidationError):
        SLO(model="m", ttft_s=1, itl_s=0.1, percentile=100)


def test_problem_checks_references_and_fit():
    Problem.model_validate(minimal_problem())
    bad = minimal_problem()
    bad["variants"][0]["accelerator"] = "H200"
    with pytest.raises(ValidationError, match=r"variants\[0\]\.accelerator: unknown accelerator 'H200'"):
        Problem.model_validate(bad)
    big = minimal_problem(models=[{"name": "llama", "weight_gb": 140, "kv_bytes_per_token": 1}])
    with pytest.raises(ValidationError, match=r"do not fit in 1 x A100 \(80 GB\)"):
        Problem.model_validate(big)
    noslo = minimal_problem(slos=[])
    with pytest.raises(ValidationError, match="has demand but no entry in slos"):
        Problem.model_validate(noslo)


@pytest.mark.parametrize(
    "mutate, field, reason",
    [
        (lambda d: d["variants"][0].update(max_batch=0), "variants[0].max_batch", "greater than 0"),
        (lambda d: d["accelerators"][0].update(cost_per_hour="cheap"), "accelerators[0].cost_per_hour",
         "valid number"),
        (lambda d: d["variants"][0]["profile"].update(kind="magic"), "variants[0].profile", "magic"),
        (lambda d: d["workloads"][0].update(arrival_rate_rps=-1), "workloads[0].arrival_rate_rps",
         "greater than or equal to 0"),
        (lambda d: d["slos"][0].update(ttft_ms=5), "slos[0].ttft_ms", "Extra inputs are not permitted"),
    ],
)
def test_load_problem_names_file_field_and_reason(tmp_path, mutate, field, reason):
    doc = minimal_problem()
    mutate(doc)
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError) as exc:
        load_problem(path)
    assert exc.value.source == str(path)
    assert exc.value.field == field
    assert reason in exc.value.reason


def test_load_problem_reports_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(InputError, match="cannot read file"):
        load_problem(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("accelerators: [\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_problem(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_problem(scalar)
