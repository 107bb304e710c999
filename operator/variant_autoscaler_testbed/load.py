"""An open-loop load generator for emulated (or real) OpenAI-style completion servers.

Open loop on purpose: arrivals follow the rate schedule whether or not the servers keep up, as
real users do, so an overloaded server builds a queue that the metrics and the autoscaler can
see. Every run is bounded in requests, in time and in requests in flight (arrivals beyond that
are shed and counted, never queued client-side, which would hide the overload from the server).

Rates are per real second. An emulated server with `time_scale` k sees them as rate/k per
emulated second.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthClass(_Strict):
    """One kind of request in the mix."""

    prompt_tokens: int = Field(gt=0)
    max_tokens: int = Field(gt=0, description="Output tokens (the emulator always generates exactly this many).")
    weight: float = Field(default=1.0, gt=0, description="Relative frequency in the mix.")


class RatePhase(_Strict):
    """Constant arrival rate for a while; a schedule is a list of these, run in order."""

    duration_s: float = Field(gt=0)
    rate_rps: float = Field(ge=0)


class LoadSpec(_Strict):
    targets: list[str] = Field(min_length=1, description="Base URLs, e.g. http://127.0.0.1:8001; round robin.")
    model: str = Field(min_length=1)
    phases: list[RatePhase] = Field(min_length=1)
    mix: list[LengthClass] = Field(min_length=1)
    arrivals: Literal["poisson", "uniform"] = Field(
        default="poisson", description="Exponential gaps, or fixed gaps 1/rate (exact counts per window)."
    )
    mix_order: Literal["random", "cycle"] = Field(
        default="random", description="Draw each request's class at random by weight, or cycle through the mix."
    )
    seed: int = 0
    max_requests: int = Field(default=10_000, gt=0)
    max_duration_s: float = Field(default=600.0, gt=0)
    max_in_flight: int = Field(default=1024, gt=0)
    request_timeout_s: float = Field(default=120.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0, description="How long to wait for replies after the last send.")
    stream: bool = False


class TargetReport(_Strict):
    url: str
    sent: int
    ok: int
    failed: int
    prompt_tokens_ok: int = Field(description="Prompt tokens of requests that completed.")
    completion_tokens_ok: int


class LoadReport(_Strict):
    sent: int
    ok: int
    failed: int
    shed: int = Field(description="Arrivals dropped because max_in_flight requests were outstanding.")
    duration_s: float
    errors: dict[str, int] = Field(description="Failure reason -> count.")
    targets: list[TargetReport]

    @property
    def mean_prompt_tokens_ok(self) -> float:
        return sum(t.prompt_tokens_ok for t in self.targets) / max(1, self.ok)

    @property
    def mean_completion_tokens_ok(self) -> float:
        return sum(t.completion_tokens_ok for t in self.targets) / max(1, self.ok)


class _Tally:
    def __init__(self, targets: list[str]):
        self.per = {u: {"sent": 0, "ok": 0, "failed": 0, "prompt": 0, "completion": 0} for u in targets}
        self.errors: dict[str, int] = {}
        self.shed = 0

    def fail(self, url: str, reason: str) -> None:
        self.per[url]["failed"] += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1


def _class_picker(spec: LoadSpec, rng: random.Random):
    if spec.mix_order == "cycle":
        i = 0

        def pick() -> LengthClass:
            nonlocal i
            c = spec.mix[i % len(spec.mix)]
            i += 1
            return c
        return pick
    weights = [c.weight for c in spec.mix]
    return lambda: rng.choices(spec.mix, weights)[0]


def _arrival_offsets(spec: LoadSpec, rng: random.Random):
    """Seconds from the start at which each request is sent, phase after phase."""
    phase_start = 0.0
    for phase in spec.phases:
        end = phase_start + phase.duration_s
        if phase.rate_rps > 0:
            t = phase_start
            while True:
                t += rng.expovariate(phase.rate_rps) if spec.arrivals == "poisson" else 1.0 / phase.rate_rps
                if t >= end:
                    break
                yield t
        phase_start = end


async def _read_stream(resp, cls: LengthClass) -> tuple[int, int]:
    """(prompt, completion) tokens of an SSE completion stream: from its usage chunk when the server
    sends one, else one token per chunk with text (what the emulator and vLLM send)."""
    chunks, usage = 0, None
    async for line in resp.content:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]
        if any(c.get("text") for c in event.get("choices", ())):
            chunks += 1
    if usage:
        return usage["prompt_tokens"], usage["completion_tokens"]
    return cls.prompt_tokens, chunks


async def _one(session, spec: LoadSpec, url: str, cls: LengthClass, tally: _Tally) -> None:
    body = {"model": spec.model, "prompt_token_count": cls.prompt_tokens, "max_tokens": cls.max_tokens,
            "stream": spec.stream} | ({"stream_options": {"include_usage": True}} if spec.stream else {})
    try:
        async with session.post(f"{url}/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=spec.request_timeout_s)) as resp:
            if resp.status != 200:
                tally.fail(url, f"HTTP {resp.status}")
                return
            if spec.stream:
                prompt, completion = await _read_stream(resp, cls)
            else:
                usage = (await resp.json())["usage"]
                prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    except TimeoutError:
        tally.fail(url, "timeout")
        return
    except aiohttp.ClientError as exc:
        tally.fail(url, type(exc).__name__)
        return
    t = tally.per[url]
    t["ok"] += 1
    t["prompt"] += prompt
    t["completion"] += completion


async def generate_load(spec: LoadSpec, stop: asyncio.Event | None = None) -> LoadReport:
    """Send the schedule; return when it ends, a bound is hit or `stop` is set, and replies are in."""
    rng = random.Random(spec.seed)
    pick = _class_picker(spec, rng)
    tally = _Tally(spec.targets)
    loop = asyncio.get_running_loop()
    start = loop.time()
    wall_start = time.monotonic()
    tasks: dict[asyncio.Task, str] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sent = 0
        for offset in _arrival_offsets(spec, rng):
            if sent >= spec.max_requests or offset > spec.max_duration_s or (stop is not None and stop.is_set()):
                break
            delay = start + offset - loop.time()
            if delay > 0:
                if stop is None:
                    await asyncio.sleep(delay)
                else:
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                        break
                    except TimeoutError:
                        pass
            url = spec.targets[sent % len(spec.targets)]
            sent += 1
            if len(tasks) >= spec.max_in_flight:
                tally.shed += 1
                continue
            tally.per[url]["sent"] += 1
            task = asyncio.create_task(_one(session, spec, url, pick(), tally))
            tasks[task] = url
            task.add_done_callback(lambda t: tasks.pop(t, None))
        if tasks:
            outstanding = dict(tasks)
            _, pending = await asyncio.wait(set(outstanding), timeout=spec.drain_timeout_s)
            for task in pending:
                task.cancel()
                tally.fail(outstanding[task], "unfinished at end of run")
            await asyncio.gather(*pending, return_exceptions=True)
    targets = [TargetReport(url=u, sent=v["sent"], ok=v["ok"], failed=v["failed"], prompt_tokens_ok=v["prompt"],
                            completion_tokens_ok=v["completion"]) for u, v in tally.per.items()]
    return LoadReport(
        sent=sum(t.sent for t in targets), ok=sum(t.ok for t in targets), failed=sum(t.failed for t in targets),
        shed=tally.shed, duration_s=time.monotonic() - wall_start, errors=tally.errors, targets=targets,
    )
