"""The single-replica simulator follows the documented vLLM-style iteration semantics."""

import math

import numpy as np
import pytest

from optimizer.fleet import Role
from optimizer.profile import ParametricProfile, ProfilePoint, TabulatedProfile
from optimizer.simulation.replica import EventKind, Replica, SimRequest, simulate_replica

PROFILE = ParametricProfile(
    decode_base_s=0.02, decode_per_seq_s=0.0005, decode_per_kv_token_s=1e-8,
    prefill_base_s=0.01, prefill_per_token_s=0.0002,
)


def test_single_request_ttft_is_prefill_and_itl_is_decode_step():
    rec = simulate_replica(PROFILE, [1.0], [100], [11], max_batch=8, kv_capacity_tokens=10_000)
    assert rec.ttft_s[0] == pytest.approx(PROFILE.prefill_s(100))
    mean_ctx = np.mean(np.arange(101, 111))
    assert rec.itl_s[0] == pytest.approx(PROFILE.decode_step_s(1, mean_ctx))
    assert rec.e2e_s[0] == pytest.approx(rec.ttft_s[0] + 10 * rec.itl_s[0])


def test_without_chunking_prefill_is_prioritised_and_stalls_running_decodes():
    # vLLM V0 (no token budget): the second arrival's prefill runs at the first decode boundary
    # after it arrives, so the first request's inter-token gap grows by one prefill.
    alone = simulate_replica(PROFILE, [0.0], [100], [50], max_batch=8, kv_capacity_tokens=10_000,
                             max_num_batched_tokens=None)
    pair = simulate_replica(PROFILE, [0.0, 0.1], [100, 1000], [50, 50], max_batch=8, kv_capacity_tokens=10_000,
                            max_num_batched_tokens=None)
    stretch = (pair.completion_s[0] - pair.first_token_s[0]) - (alone.completion_s[0] - alone.first_token_s[0])
    assert stretch >= PROFILE.prefill_s(1000) - 1e-9


def test_max_batch_bounds_the_decode_batch_and_queues_the_rest():
    n = 20
    rec = simulate_replica(PROFILE, np.zeros(n), np.full(n, 50), np.full(n, 30), max_batch=4,
                           kv_capacity_tokens=1e6)
    assert rec.mean_decode_batch <= 4 + 1e-9
    # With 4 slots, the last request starts only after four waves have finished.
    assert np.sort(rec.ttft_s)[-1] > 4 * 29 * PROFILE.decode_step_s(1, 0)


def test_kv_capacity_limits_the_batch_and_rejects_what_can_never_fit():
    rec = simulate_replica(PROFILE, [0, 0, 0, 0], [100, 100, 100, 5000], [100, 100, 100, 10], max_batch=64,
                           kv_capacity_tokens=450)
    assert rec.rejected.tolist() == [False, False, False, True]
    # Only two requests of 200 tokens fit in 450: the third waits for the first to finish.
    assert rec.first_token_s[2] >= rec.completion_s[0] - 1e-12


def test_prefill_role_hands_off_and_decode_role_decodes_only():
    p = Replica("p0", PROFILE, max_batch=8, kv_capacity_tokens=10_000, role=Role.PREFILL)
    d = Replica("d0", PROFILE, max_batch=8, kv_capacity_tokens=10_000, role=Role.DECODE)
    req = SimRequest(0, 0.0, 200, 5)
    p.admit(req, 0.0)
    events = p.advance(p.next_event_time())
    assert [e.kind for e in events] == [EventKind.HANDOFF]
    assert req.prefill_done_s == pytest.approx(PROFILE.prefill_s(200))
    assert math.isnan(req.completion_s) and p.is_idle
    landed = req.prefill_done_s + 0.05
    d.advance(landed)
    d.admit(req, landed)
    kinds = []
    for _ in range(10):
        t = d.next_event_time()
        if t is None:
            break
        kinds += [e.kind for e in d.advance(t)]
    assert kinds == [EventKind.FINISHED]
    assert req.first_token_s == pytest.approx(landed)
    assert d.decode_iterations == 4 and d.prefill_iterations == 0
    assert req.prefill_replica == "p0" and req.decode_replica == "d0"


def test_tabulated_profile_and_host_loop_agree_with_simulate_replica():
    prof = TabulatedProfile(
        decode_points=[ProfilePoint(x=1, time_s=0.02), ProfilePoint(x=16, time_s=0.025),
                       ProfilePoint(x=64, time_s=0.04)],
        prefill_points=[ProfilePoint(x=1, time_s=0.01), ProfilePoint(x=4096, time_s=0.5)],
    )
    rng = np.random.default_rng(3)
    n = 300
    arr = np.cumsum(rng.exponential(0.2, n))
    ins, outs = rng.integers(50, 500, n), rng.integers(2, 100, n)
    rec = simulate_replica(prof, arr, ins, outs, max_batch=16, kv_capacity_tokens=20_000)

    rep = Replica("r", prof, max_batch=16, kv_capacity_tokens=20_000)
    reqs = [SimRequest(i, a, int(x), int(y)) for i, (a, x, y) in enumerate(zip(arr, ins, outs, strict=True))]
    finished = 0
    i = 0
    for _ in range(100_000):  # event-by-event, as a cluster host would drive it
        nxt = rep.next_event_time()
        t_arr = reqs[i].arrival_s if i < n else math.inf
        if nxt is None and i >= n:
            break
        if nxt is not None and nxt <= t_arr:
            finished += sum(e.kind is EventKind.FINISHED for e in rep.advance(nxt))
        else:
            rep.advance(t_arr)
            rep.admit(reqs[i], t_arr)
            i += 1
    assert finished == n
    np.testing.assert_allclose([r.completion_s for r in reqs], rec.completion_s, rtol=1e-12)
    assert rep.busy_time_s() == pytest.approx(rec.busy_s)


QUADRATIC = ParametricProfile(  # the example fleet's Llama-3.1-8B on one H100
    decode_base_s=0.00599, decode_per_seq_s=0.0001069, decode_per_kv_token_s=5.231e-08,
    prefill_base_s=0.00599, prefill_per_token_s=2.15e-05, prefill_per_token_sq_s=3.754e-10,
)


def test_a_batch_of_prompts_pays_attention_per_prompt_not_on_the_batch_total():
    # 97 prompts of ~2k tokens arrive at once (a code-completion burst): the first starts alone,
    # the other 96 are prefilled together as one batch.
    rng = np.random.default_rng(5)
    ins = rng.integers(1500, 2500, 97)
    rec = simulate_replica(QUADRATIC, np.zeros(97), ins, np.full(97, 2), max_batch=256, kv_capacity_tokens=1e6,
                           max_num_batched_tokens=None)
    assert rec.prefill_iterations == 2
    rest = ins[1:].astype(float)
    per_prompt = (QUADRATIC.prefill_base_s + QUADRATIC.prefill_per_token_s * rest.sum()
                  + QUADRATIC.prefill_per_token_sq_s * np.sum(rest**2))
    first = QUADRATIC.prefill_s(ins[0])
    assert rec.first_token_s[0] == pytest.approx(first)
    np.testing.assert_allclose(rec.first_token_s[1:], first + per_prompt, rtol=1e-9)
    assert QUADRATIC.prefill_batch_s(rest) == pytest.approx(per_prompt, rel=1e-12)
    assert QUADRATIC.prefill_s(rest.sum()) > 3 * per_prompt  # what the batch used to be charged


def test_tabulated_batch_is_the_per_prompt_sum_minus_the_shared_base():
    prof = TabulatedProfile(
        decode_points=[ProfilePoint(x=1, time_s=0.02), ProfilePoint(x=64, time_s=0.04)],
        prefill_points=[ProfilePoint(x=16, time_s=0.012), ProfilePoint(x=128, time_s=0.040),
                        ProfilePoint(x=2048, time_s=0.56), ProfilePoint(x=8192, time_s=2.4)],
    )
    base = prof.prefill_base_time_s()
    assert base == pytest.approx(0.012 - 16 * (0.040 - 0.012) / (128 - 16))  # the curve at 0 tokens
    prompts = [100, 2000, 5000]
    assert prof.prefill_batch_s(prompts) == pytest.approx(sum(prof.prefill_s(t) for t in prompts) - 2 * base)
    assert prof.prefill_batch_s([5000]) == pytest.approx(prof.prefill_s(5000))
    # Chunks of one prompt add up to its prefill plus one base per extra forward pass.
    chunks = sum(prof.prefill_batch_s([e], [s]) for s, e in [(0, 2048), (2048, 4096), (4096, 5000)])
    assert chunks == pytest.approx(prof.prefill_s(5000) + 2 * base)
    rec = simulate_replica(prof, np.zeros(4), [10] + prompts, [2] * 4, max_batch=8, kv_capacity_tokens=1e5,
                           max_num_batched_tokens=None)
    np.testing.assert_allclose(rec.first_token_s[1:], prof.prefill_s(10) + prof.prefill_batch_s(prompts))


# ----- chunked prefill (vLLM V1): a token budget per iteration, decodes first -----

def _iterations(rep: Replica, limit: int = 10_000) -> list[tuple[float, float, int]]:
    """Run the replica dry: (start, end, running sequences at the start) of every iteration."""
    out = []
    for _ in range(limit):
        end = rep.next_event_time()
        if end is None:
            break
        start, running = rep.now, len(rep._running)
        rep.advance(end)
        out.append((start, end, running))
    return out


def test_the_profile_default_is_vllm_v1_chunked_prefill_with_a_2048_token_budget():
    assert QUADRATIC.max_num_batched_tokens == 2048
    assert Replica("r", QUADRATIC, max_batch=8, kv_capacity_tokens=1e5).max_num_batched_tokens == 2048
    assert Replica("r", QUADRATIC, max_batch=8, kv_capacity_tokens=1e5,
                   max_num_batched_tokens=None).max_num_batched_tokens is None
    v0 = QUADRATIC.model_copy(update={"max_num_batched_tokens": None})
    assert Replica("r", v0, max_batch=8, kv_capacity_tokens=1e5).max_num_batched_tokens is None
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Replica("r", QUADRATIC, max_batch=8, kv_capacity_tokens=1e5, max_num_batched_tokens=0)


def test_a_long_prompt_is_chunked_and_the_batch_keeps_decoding():
    budget = 2048
    rep = Replica("r", QUADRATIC, max_batch=8, kv_capacity_tokens=1e6, max_num_batched_tokens=budget)
    decoding = SimRequest(0, 0.0, 100, 400)
    rep.admit(decoding, 0.0)
    rep.advance(0.1)
    long = SimRequest(1, 0.1, 10_000, 5)
    rep.admit(long, 0.1)
    steps = _iterations(rep)
    # The first iteration was in flight when the prompt came; then ceil(10000 / (2048 - 1 decode)) = 5
    # iterations prefill it, each also a decode step of the running request.
    during = [(a, b) for a, b, _ in steps[1:] if b <= long.first_token_s + 1e-12]
    assert len(during) == 5
    one_chunk = QUADRATIC.prefill_batch_s([2047])
    assert max(b - a for a, b in during) < one_chunk + 2 * QUADRATIC.decode_step_s(1, 600)
    assert max(b - a for a, b in during) < 0.25 * QUADRATIC.prefill_s(10_000)  # what unchunked stalled
    # The chunks add up to the prompt's own prefill (attention per chunk: e^2 - s^2) plus the decode steps.
    ttft_work = long.first_token_s - steps[0][1]
    decode = sum(QUADRATIC.decode_step_s(1, 0) for _ in during)
    assert ttft_work == pytest.approx(QUADRATIC.prefill_s(10_000) - QUADRATIC.prefill_base_s + decode, rel=0.02)
    assert decoding.completion_s > long.first_token_s  # it decoded all along


def test_decodes_take_the_budget_first_and_prompts_fill_the_rest():
    budget = 64
    rep = Replica("r", PROFILE, max_batch=64, kv_capacity_tokens=1e6, max_num_batched_tokens=budget)
    for i in range(40):  # 40 one-token prompts: prefilled together, then they decode
        rep.admit(SimRequest(i, 0.0, 1, 200), 0.0)
    first = _iterations_until(rep, lambda: len(rep._running) == 40)
    assert first >= 1
    prompt = SimRequest(99, rep.now, 100, 3)
    rep.admit(prompt, rep.now)
    steps = [(a, b, n) for a, b, n in _iterations(rep)[1:] if b <= prompt.first_token_s + 1e-12]
    # After the iteration in flight, 40 decode tokens leave 24 for the prompt: ceil(100 / 24) = 5
    # iterations, all with the 40 decodes.
    assert len(steps) == 5 and all(n == 40 for _, _, n in steps)
    assert prompt.first_token_s - steps[0][0] == pytest.approx(
        sum(PROFILE.decode_step_s(40, 0) for _ in steps) + PROFILE.prefill_s(100) - PROFILE.prefill_base_s, rel=0.01)


def _iterations_until(rep: Replica, done, limit: int = 1000) -> int:
    for i in range(limit):
        if done():
            return i
        rep.advance(rep.next_event_time())
    raise AssertionError("condition never reached")


def test_chunking_stays_within_max_batch_and_kv_and_every_request_finishes():
    rng = np.random.default_rng(9)
    n = 400
    arr = np.cumsum(rng.exponential(0.05, n))
    ins, outs = rng.integers(10, 6000, n), rng.integers(1, 300, n)
    for budget in (16, 512, 2048):
        rec = simulate_replica(QUADRATIC, arr, ins, outs, max_batch=16, kv_capacity_tokens=60_000,
                               max_num_batched_tokens=budget)
        assert not rec.rejected.any()
        assert np.all(np.isfinite(rec.completion_s)) and np.all(rec.first_token_s >= rec.arrival_s)
        assert rec.mean_decode_batch <= 16
