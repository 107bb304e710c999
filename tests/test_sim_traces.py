"""Trace loaders (Azure, Mooncake, Vidur), replay at k x rate, and the synthetic generators."""

import json
from pathlib import Path

import numpy as np
import pytest

from optimizer.problem import InputError
from optimizer.simulation.generators import (
    AZURE_CONV_INPUT,
    BurstyArrivals,
    DiurnalArrivals,
    GeneratedTrace,
    LogNormalLengths,
    PoissonArrivals,
    StepArrivals,
    arrival_times,
)
from optimizer.simulation.traces import (
    Trace,
    load_azure_csv,
    load_mooncake_jsonl,
    load_trace,
    load_vidur_csv,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AZURE = SHARED / "data" / "traces" / "azure2023_conv.csv"


def test_azure_csv_loads_and_rebases_time(tmp_path):
    f = tmp_path / "azure.csv"
    f.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:46.9805900,10,1\n"
    )
    tr = load_azure_csv(f)
    assert len(tr) == 3
    assert tr.arrival_s.tolist() == pytest.approx([0.0, 0.3, 4.314579], abs=1e-6)
    assert tr.input_tokens.tolist() == [374, 10, 396]
    assert tr.output_tokens.tolist() == [44, 1, 109]
    assert load_trace(f).input_tokens.tolist() == [374, 10, 396]


def test_mooncake_jsonl_loads_milliseconds(tmp_path):
    f = tmp_path / "mooncake.jsonl"
    rows = [{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [1, 2]},
            {"timestamp": 30535, "input_length": 6472, "output_length": 26, "hash_ids": [3]}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tr = load_mooncake_jsonl(f)
    assert tr.arrival_s.tolist() == pytest.approx([0.0, 3.053])
    assert tr.input_tokens.tolist() == [6955, 6472]
    assert load_trace(f).output_tokens.tolist() == [52, 26]


def test_vidur_csv_loads_with_extra_columns(tmp_path):
    f = tmp_path / "vidur.csv"
    f.write_text("arrived_at,num_prefill_tokens,num_decode_tokens,num_total_tokens\n"
                 "0.5,100,20,120\n1.25,2048,512,2560\n")
    tr = load_vidur_csv(f)
    assert tr.arrival_s.tolist() == pytest.approx([0.0, 0.75])
    assert tr.output_tokens.tolist() == [20, 512]
    assert load_trace(f).input_tokens.tolist() == [100, 2048]


@pytest.mark.parametrize(
    ("name", "text", "field"),
    [
        ("a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,3\n", "header"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,3,4\n", "line 2: TIMESTAMP"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,3,0\n", "line 2: GeneratedTokens"),
        ("v.csv", "arrived_at,num_prefill_tokens,num_decode_tokens\n1,2,3\nx,2,3\n", "line 3: arrived_at"),
        ("m.jsonl", '{"timestamp": 1, "input_length": 5}\n', "line 1: output_length"),
        ("m.jsonl", '{"timestamp": 1, "input_length": 5, "output_length": 2}\nnot json\n', "line 2"),
    ],
)
def test_malformed_files_name_line_and_column(tmp_path, name, text, field):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(InputError) as err:
        load_trace(f)
    assert err.value.field == field
    assert err.value.source == str(f)


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_trace(tmp_path / "absent.csv")


def test_replay_at_k_times_rate_and_window():
    tr = Trace(np.array([0.0, 1.0, 2.0, 4.0]), np.array([10, 20, 30, 40]), np.array([1, 2, 3, 4]))
    fast = tr.replay(2.0)
    assert fast.arrival_s.tolist() == [0.0, 0.5, 1.0, 2.0]
    assert fast.input_tokens.tolist() == tr.input_tokens.tolist()
    part = tr.window(1.0, 4.0)
    assert part.arrival_s.tolist() == [0.0, 1.0]
    assert part.output_tokens.tolist() == [2, 3]
    with pytest.raises(ValueError):
        tr.replay(0)


def test_merge_keeps_models_apart():
    a = Trace(np.array([0.0, 2.0]), np.array([1, 1]), np.array([1, 1]), models=("a",))
    b = Trace(np.array([1.0]), np.array([5]), np.array([5]), models=("b",))
    m = Trace.merge([a, b])
    assert m.models == ("a", "b")
    assert m.model_of().tolist() == [0, 1, 0]
    assert m.input_tokens.tolist() == [1, 5, 1]


@pytest.mark.skipif(not AZURE.exists(), reason="../shared not present: the real Azure conv trace is not available")
def test_real_azure_conv_trace_loads():
    tr = load_azure_csv(AZURE)
    assert len(tr) == 19366
    assert 3400 < tr.duration_s < 3600
    assert np.all(np.diff(tr.arrival_s) >= 0)
    assert 1100 < tr.input_tokens.mean() < 1210
    assert 200 < tr.output_tokens.mean() < 220
    assert tr.output_tokens.max() == 1000
    # The generator's fitted lengths describe this trace.
    assert np.log(tr.input_tokens).mean() == pytest.approx(AZURE_CONV_INPUT.log_mean, abs=0.01)
    doubled = tr.replay(2.0)
    assert doubled.duration_s == pytest.approx(tr.duration_s / 2)


def test_generators_reach_their_mean_rates():
    rng = np.random.default_rng(1)
    dur = 4000.0
    assert len(arrival_times(PoissonArrivals(rate_rps=5.0), dur, rng)) / dur == pytest.approx(5.0, rel=0.05)
    diurnal = DiurnalArrivals(mean_rps=4.0, amplitude=0.8, period_s=1000.0)
    times = arrival_times(diurnal, dur, rng)
    assert len(times) / dur == pytest.approx(4.0, rel=0.05)
    first_quarter = np.sum(times % 1000 < 250)
    third_quarter = np.sum((times % 1000 >= 500) & (times % 1000 < 750))
    assert third_quarter > 2 * first_quarter  # starts at the trough, peaks half a period later
    step = StepArrivals(times_s=[0, 1000], rates_rps=[1.0, 9.0])
    times = arrival_times(step, 2000.0, rng)
    assert np.sum(times >= 1000) / np.sum(times < 1000) == pytest.approx(9.0, rel=0.15)


def test_bursty_traffic_has_bursts():
    rng = np.random.default_rng(2)
    proc = BurstyArrivals(base_rps=2.0, burst_rps=20.0, mean_calm_s=200.0, mean_burst_s=50.0)
    times = arrival_times(proc, 5000.0, rng)
    per_10s = np.bincount((times // 10).astype(int), minlength=500)
    assert per_10s.max() > 120  # a burst second runs near 20 req/s
    assert np.median(per_10s) < 60  # most of the time it is calm
    # Burst share 50/(200+50) = 20 %: mean rate about 0.8*2 + 0.2*20 = 5.6 req/s.
    assert 3.0 < len(times) / 5000.0 < 9.0


def test_generated_trace_is_reproducible_and_lengths_are_clipped():
    spec = GeneratedTrace(arrivals=PoissonArrivals(rate_rps=3.0), duration_s=600.0, seed=7,
                          output_lengths=LogNormalLengths(log_mean=5.0, log_std=1.0, min_tokens=4, max_tokens=300))
    a, b = spec.build(), spec.build()
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.input_tokens, b.input_tokens)
    assert a.output_tokens.min() >= 4 and a.output_tokens.max() == 300
    other = spec.model_copy(update={"seed": 8}).build()
    assert not np.array_equal(a.arrival_s[:10], other.arrival_s[:10])
