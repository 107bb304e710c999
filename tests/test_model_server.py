"""The emulated vLLM server: API, vLLM metrics in the text format, timing from the profile,
continuous batching and queueing, the load generator, and the `emulate-server` command."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from variant_autoscaler.cli import main
from variant_autoscaler_testbed.load import LoadSpec, generate_load
from variant_autoscaler_testbed.model_server import EmulatedModelServer, ModelServerConfig
from variant_autoscaler_testbed.prometheus import free_port

from optimizer.profile import ParametricProfile, ProfilePoint, TabulatedProfile

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ParametricProfile(decode_base_s=0.02, decode_per_seq_s=0.002, decode_per_kv_token_s=1e-6,
                            prefill_base_s=0.01, prefill_per_token_s=1e-4, prefill_per_token_sq_s=1e-8)
REQUIRED_FAMILIES = [
    "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
    "vllm:request_prompt_tokens", "vllm:request_generation_tokens", "vllm:request_success",
    "vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
    "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds", "vllm:cache_config_info",
]


def config(**kw) -> ModelServerConfig:
    return ModelServerConfig(**({"model": "m", "profile": PROFILE, "time_scale": 20.0} | kw))


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from exposition text, via prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, tuple(sorted({"model_name": "m", **labels}.items())))]


async def complete(session, server, **body) -> dict:
    async with session.post(f"{server.url}/v1/completions", json={"model": "m"} | body) as r:
        return {"status": r.status, **(await r.json())}


async def metrics_text(session, server) -> tuple[str, str]:
    async with session.get(f"{server.url}/metrics") as r:
        return r.headers["Content-Type"], await r.text()


def test_metrics_are_plain_text_format_with_vllm_names_and_labels():
    async def scenario():
        async with EmulatedModelServer(config()) as server, aiohttp.ClientSession() as s:
            await complete(s, server, prompt_token_count=50, max_tokens=3)
            return await metrics_text(s, server)

    ctype, text = asyncio.run(scenario())
    assert ctype.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in REQUIRED_FAMILIES:
        assert name in families, f"{name} missing from /metrics"
    assert "vllm:num_requests_running{" in text, "colons must reach the wire unmangled"
    assert families["vllm:request_success"].type == "counter"
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"
    assert value(text, "vllm:request_success_total", finished_reason="length") == 1
    assert value(text, "vllm:request_prompt_tokens_sum") == 50
    assert value(text, "vllm:request_generation_tokens_count") == 1
    info = [s for s in families["vllm:cache_config_info"].samples]
    assert info[0].labels["block_size"] == "16" and int(info[0].labels["num_gpu_blocks"]) > 0


def test_single_request_latencies_are_the_profile_times():
    prompt, out = 300, 6

    async def scenario():
        async with EmulatedModelServer(config()) as server, aiohttp.ClientSession() as s:
            reply = await complete(s, server, prompt_token_count=prompt, max_tokens=out)
            return reply, (await metrics_text(s, server))[1]

    reply, text = asyncio.run(scenario())
    assert reply["usage"] == {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}
    assert reply["choices"][0]["finish_reason"] == "length"
    prefill = PROFILE.prefill_s(prompt)
    steps = [PROFILE.decode_step_s(1, prompt + k) for k in range(1, out)]
    assert value(text, "vllm:time_to_first_token_seconds_sum") == pytest.approx(prefill, rel=1e-9)
    assert value(text, "vllm:inter_token_latency_seconds_sum") == pytest.approx(sum(steps), rel=1e-9)
    assert value(text, "vllm:inter_token_latency_seconds_count") == out - 1
    assert value(text, "vllm:e2e_request_latency_seconds_sum") == pytest.approx(prefill + sum(steps), rel=1e-9)
    assert value(text, "vllm:request_queue_time_seconds_sum") == pytest.approx(0.0, abs=1e-12)


def test_tabulated_profile_times_prefill():
    table = TabulatedProfile(decode_points=[ProfilePoint(x=1, time_s=0.01), ProfilePoint(x=64, time_s=0.05)],
                             prefill_points=[ProfilePoint(x=10, time_s=0.005), ProfilePoint(x=4000, time_s=0.4)])

    async def scenario():
        async with EmulatedModelServer(config(profile=table)) as server, aiohttp.ClientSession() as s:
            await complete(s, server, prompt_token_count=1000, max_tokens=2)
            return (await metrics_text(s, server))[1]

    text = asyncio.run(scenario())
    assert value(text, "vllm:time_to_first_token_seconds_sum") == pytest.approx(table.prefill_s(1000), rel=1e-9)


def test_full_batch_queues_requests_and_counts_them_waiting():
    """max_batch 2 and 6 long requests: 2 run, 4 wait; the waiting ones report queue time."""

    async def scenario():
        cfg = config(max_batch=2, time_scale=10.0)
        async with EmulatedModelServer(cfg) as server, aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(complete(s, server, prompt_token_count=100, max_tokens=100))
                     for _ in range(6)]
            seen = []
            for _ in range(2000):
                text = (await metrics_text(s, server))[1]
                running, waiting = value(text, "vllm:num_requests_running"), value(text, "vllm:num_requests_waiting")
                seen.append((running, waiting, value(text, "vllm:kv_cache_usage_perc")))
                if running + waiting == 6:
                    break
                await asyncio.sleep(0.005)
            replies = await asyncio.gather(*tasks)
            return seen, replies, (await metrics_text(s, server))[1]

    seen, replies, text = asyncio.run(scenario())
    assert all(r["status"] == 200 for r in replies)
    assert max(r for r, _, _ in seen) <= 2
    assert (2, 4) in [(r, w) for r, w, _ in seen], f"never saw 2 running + 4 waiting: {seen[-5:]}"
    assert seen[-1][2] > 0, "KV cache in use while sequences run"
    assert value(text, "vllm:request_success_total", finished_reason="length") == 6
    waited_long = value(text, "vllm:request_queue_time_seconds_count") - value(
        text, "vllm:request_queue_time_seconds_bucket", le="2.0")
    assert waited_long >= 4, "four requests waited at least one full batch (~2.4 s emulated)"
    assert value(text, "vllm:num_requests_waiting") == 0 and value(text, "vllm:kv_cache_usage_perc") == 0


def test_kv_cache_capacity_limits_admission():
    """Each request reserves prompt + max_tokens; 1000 tokens of cache hold two 400-token requests."""

    async def scenario():
        cfg = config(max_batch=8, kv_cache_tokens=1000, max_model_len=1000, time_scale=10.0)
        async with EmulatedModelServer(cfg) as server, aiohttp.ClientSession() as s:
            tasks = [asyncio.create_task(complete(s, server, prompt_token_count=300, max_tokens=100))
                     for _ in range(3)]
            states = []
            for _ in range(2000):
                text = (await metrics_text(s, server))[1]
                states.append((value(text, "vllm:num_requests_running"), value(text, "vllm:num_requests_waiting")))
                if states[-1] == (2, 1):
                    break
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)
            return states

    states = asyncio.run(scenario())
    assert states[-1] == (2, 1)
    assert max(r for r, _ in states) == 2


def test_streaming_sends_one_event_per_token_then_usage_and_done():
    async def scenario():
        async with EmulatedModelServer(config()) as server, aiohttp.ClientSession() as s:
            body = {"model": "m", "prompt": "x" * 40, "max_tokens": 5, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with s.post(f"{server.url}/v1/completions", json=body) as r:
                return r.headers["Content-Type"], await r.text()

    ctype, text = asyncio.run(scenario())
    assert ctype.startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [c for c in chunks if c["choices"]]
    assert len(tokens) == 5 and tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@pytest.mark.parametrize("body, status, words", [
    ({"model": "other", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "m"}, 400, "prompt"),
    ({"model": "m", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "m", "prompt_token_count": 8000, "max_tokens": 500}, 400, "maximum context length"),
    ("not json", 400, "not JSON"),
])
def test_bad_requests_get_openai_style_errors(body, status, words):
    async def scenario():
        async with EmulatedModelServer(config()) as server, aiohttp.ClientSession() as s:
            data = body if isinstance(body, str) else json.dumps(body)
            async with s.post(f"{server.url}/v1/completions", data=data) as r:
                return r.status, await r.json()

    got, reply = asyncio.run(scenario())
    assert got == status
    assert words in reply["message"] and reply["object"] == "error"


def test_load_generator_counts_match_what_servers_saw():
    mix = [{"prompt_tokens": 100, "max_tokens": 4}, {"prompt_tokens": 900, "max_tokens": 8}]

    async def scenario():
        async with EmulatedModelServer(config()) as a, EmulatedModelServer(config()) as b:
            spec = LoadSpec(targets=[a.url, b.url], model="m", phases=[{"duration_s": 5, "rate_rps": 100}],
                            mix=mix, arrivals="uniform", max_requests=25, seed=3)
            report = await generate_load(spec)
            return report, [a.metrics_text(), b.metrics_text()]

    report, texts = asyncio.run(scenario())
    assert (report.sent, report.ok, report.failed, report.shed) == (25, 25, 0, 0)
    for target, text in zip(report.targets, texts, strict=True):
        assert value(text, "vllm:request_success_total", finished_reason="length") == target.ok
        assert value(text, "vllm:request_prompt_tokens_sum") == target.prompt_tokens_ok
        assert value(text, "vllm:request_generation_tokens_sum") == target.completion_tokens_ok
    assert {t.sent for t in report.targets} == {12, 13}


def test_load_generator_streaming_reads_tokens_from_the_stream():
    async def scenario():
        async with EmulatedModelServer(config()) as server:
            spec = LoadSpec(targets=[server.url], model="m", phases=[{"duration_s": 5, "rate_rps": 50}],
                            mix=[{"prompt_tokens": 30, "max_tokens": 7}], arrivals="uniform", max_requests=4,
                            stream=True)
            return await generate_load(spec), server.metrics_text()

    report, text = asyncio.run(scenario())
    assert report.ok == 4 and report.targets[0].completion_tokens_ok == 28 == value(
        text, "vllm:request_generation_tokens_sum")


def test_load_generator_stops_at_its_time_bound_and_on_request():
    async def scenario():
        async with EmulatedModelServer(config()) as server:
            base = {"targets": [server.url], "model": "m", "mix": [{"prompt_tokens": 10, "max_tokens": 2}],
                    "arrivals": "uniform"}
            bounded = await generate_load(LoadSpec(**base, phases=[{"duration_s": 3600, "rate_rps": 10}],
                                                   max_duration_s=0.35))
            stop = asyncio.Event()
            task = asyncio.create_task(generate_load(LoadSpec(**base, phases=[{"duration_s": 3600, "rate_rps": 10}]),
                                                     stop))
            await asyncio.sleep(0.25)
            stop.set()
            return bounded, await asyncio.wait_for(task, 30)

    bounded, stopped = asyncio.run(scenario())
    assert bounded.sent == 3 and bounded.ok == 3, "10 rps for 0.35 s sends at 0.1, 0.2, 0.3 s"
    assert 1 <= stopped.sent <= 3 and stopped.failed == 0


def test_load_generator_sheds_arrivals_beyond_max_in_flight():
    async def scenario():
        slow = config(time_scale=1.0, profile=ParametricProfile(decode_base_s=0.05, prefill_per_token_s=1e-4))
        async with EmulatedModelServer(slow) as server:
            spec = LoadSpec(targets=[server.url], model="m", phases=[{"duration_s": 0.5, "rate_rps": 40}],
                            mix=[{"prompt_tokens": 10, "max_tokens": 20}], arrivals="uniform", max_in_flight=3)
            return await generate_load(spec)

    report = asyncio.run(scenario())
    assert report.sent == report.ok == 3, "three in flight for the whole 0.5 s (each takes ~1 s)"
    assert report.shed >= 15, "the other ~16 arrivals of 0.5 s at 40 rps are shed, not queued client-side"


def test_emulate_server_command_serves_until_stopped(tmp_path):
    profile = tmp_path / "profile.yaml"
    profile.write_text("decode_base_s: 0.01\nprefill_per_token_s: 0.0001\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "variant_autoscaler", "emulate-server", "--model", "m",
                             "--profile", str(profile), "--port", str(port), "--max-batch", "4"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "server did not come up in 20 s"
                time.sleep(0.1)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                     data=json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read())["usage"]["prompt_tokens"] == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert 'vllm:request_success_total{model_name="m",finished_reason="length"} 1.0' in r.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("args, words", [
    (["--profile", "{tmp}/bad.yaml"], "decode_base_s: Input should be greater than 0"),
    (["--accelerator", "H100"], "--architecture: no datasheet facts for 'nonesuch'"),
    (["--profile", "{tmp}/missing.yaml"], "cannot read file"),
])
def test_emulate_server_command_rejects_bad_input(tmp_path, capsys, args, words):
    (tmp_path / "bad.yaml").write_text("decode_base_s: -1\nprefill_per_token_s: 0.001\n")
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["emulate-server", "--model", "nonesuch", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err
