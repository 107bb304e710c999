"""An emulated vLLM model server: OpenAI-style completions timed by a performance profile.

It stands in for vLLM in tests and in the local live demo, so everything downstream (Prometheus,
the collector, the operator) sees what it would see from a real GPU server: continuous batching,
queueing when the batch is full, KV-cache use, and vLLM's metric names in the plain text format.

Scheduling follows vLLM's default (non-chunked) policy, first come first served:
each iteration either prefills newly admitted requests (prefill has priority, up to
`max_batched_tokens` prompt tokens, `max_batch` sequences and the KV cache) or runs one decode step
for every running sequence. Prefill produces the first token; each decode step one more. A request
reserves KV space for prompt + max_tokens when admitted, so nothing is ever preempted. Every request
generates exactly `max_tokens` tokens (finish reason "length").

Time: the engine keeps an *emulated* clock advanced by exactly the profile's durations, and sleeps
until the real clock catches up (`time_scale` emulated seconds per real second). An iteration starts
at the end of the previous one, or at the arrival of its last admitted request when the engine was
idle. Latencies it reports are therefore the profile's, independent of event-loop jitter; a busy
host only delays them in real time. Arrival stamps come from the real clock scaled by `time_scale`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import deque
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from optimizer.profile import PerformanceProfile
from variant_autoscaler_testbed.vllm_metrics import (
    CONTENT_TYPE,
    E2E_BUCKETS_S,
    ITL_BUCKETS_S,
    TTFT_BUCKETS_S,
    Counter,
    Gauge,
    Histogram,
    Registry,
    batch_group,
    one_two_five_buckets,
)

CHARS_PER_TOKEN = 4


class ModelServerConfig(BaseModel):
    """Everything that shapes one emulated server's behaviour."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, description="Served model name (the `model_name` metric label).")
    profile: PerformanceProfile
    max_batch: int = Field(default=256, gt=0, description="Most sequences running at once (max_num_seqs).")
    max_batched_tokens: int = Field(default=8192, gt=0, description="Most prompt tokens prefilled in one iteration.")
    max_model_len: int = Field(default=8192, gt=1, description="Most prompt + output tokens of one request.")
    kv_cache_tokens: int = Field(default=262144, gt=0, description="KV-cache capacity in tokens.")
    block_size: int = Field(default=16, gt=0, description="KV-cache block size in tokens.")
    time_scale: float = Field(default=1.0, gt=0, description="Emulated seconds per real second (> 1 = faster).")
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, lt=65536, description="0 picks a free port.")
    iteration_metrics: bool = Field(
        default=True, description="Export the emulator-only `vllm_emulator:*` iteration timing series."
    )

    @model_validator(mode="after")
    def _fits(self) -> ModelServerConfig:
        if self.kv_cache_tokens < self.max_model_len:
            raise ValueError(
                f"kv_cache_tokens ({self.kv_cache_tokens}) must hold one request of max_model_len ({self.max_model_len})"
            )
        return self


class CompletionRequest(BaseModel):
    """The subset of OpenAI's /v1/completions body the emulator honours.

    `prompt_token_count` is an emulator extension: load generators give a length without
    sending a prompt of that length. A text prompt counts one token per 4 characters.
    """

    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[int] | None = None
    prompt_token_count: int | None = Field(default=None, ge=1)
    max_tokens: int = Field(default=16, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _has_prompt(self) -> CompletionRequest:
        if self.prompt is None and self.prompt_token_count is None:
            raise ValueError("give `prompt` (text or token ids) or `prompt_token_count`")
        return self

    def prompt_tokens(self) -> int:
        if self.prompt_token_count is not None:
            return self.prompt_token_count
        if isinstance(self.prompt, list):
            return max(1, len(self.prompt))
        return max(1, math.ceil(len(self.prompt or "") / CHARS_PER_TOKEN))


class _Sequence:
    __slots__ = ("prompt_tokens", "max_tokens", "arrival_s", "generated", "first_token_s", "last_token_s",
                 "done", "stream", "aborted")

    def __init__(self, prompt_tokens: int, max_tokens: int, arrival_s: float, stream: asyncio.Queue | None):
        self.prompt_tokens, self.max_tokens, self.arrival_s = prompt_tokens, max_tokens, arrival_s
        self.generated = 0
        self.first_token_s = self.last_token_s = 0.0
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.stream = stream
        self.aborted = False

    @property
    def kv_reserved(self) -> int:
        return self.prompt_tokens + self.max_tokens


class _Metrics:
    """vLLM's metric families for one served model, plus the emulator-only iteration series."""

    def __init__(self, config: ModelServerConfig, engine: _Engine):
        m = (config.model,)
        self.labels = m
        r = self.registry = Registry()
        L = ("model_name",)
        r.add(Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", L,
                    lambda: [(m, len(engine.running))]))
        r.add(Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", L,
                    lambda: [(m, len(engine.waiting))]))
        r.add(Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", L,
                    lambda: [(m, engine.kv_usage())]))
        info_names = ("block_size", "cache_dtype", "enable_prefix_caching", "num_gpu_blocks")
        info_values = (str(config.block_size), "auto", "False", str(config.kv_cache_tokens // config.block_size))
        r.add(Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig.", info_names,
                    lambda: [(info_values, 1.0)]))
        self.prompt_tokens_total = r.add(Counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", L))
        self.generation_tokens_total = r.add(
            Counter("vllm:generation_tokens_total", "Number of generation tokens processed.", L))
        self.success = r.add(Counter("vllm:request_success_total", "Count of successfully processed requests.",
                                     ("model_name", "finished_reason")))
        token_buckets = one_two_five_buckets(config.max_model_len)
        self.prompt_tokens = r.add(Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                             L, token_buckets))
        self.generation_tokens = r.add(Histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", L, token_buckets))
        self.ttft = r.add(Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                    L, TTFT_BUCKETS_S))
        self.tpot = r.add(Histogram("vllm:time_per_output_token_seconds",
                                    "Histogram of time per output token in seconds.", L, ITL_BUCKETS_S))
        self.itl = r.add(Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                                   L, ITL_BUCKETS_S))
        self.e2e = r.add(Histogram("vllm:e2e_request_latency_seconds",
                                   "Histogram of end to end request latency in seconds.", L, E2E_BUCKETS_S))
        self.queue_time = r.add(Histogram("vllm:request_queue_time_seconds",
                                          "Histogram of time spent in WAITING phase for request.", L, E2E_BUCKETS_S))
        self.iteration_metrics = config.iteration_metrics
        G = ("model_name", "batch_group")
        P = ("model_name", "tokens_group")
        self.decode_iterations = r.add(Counter(
            "vllm_emulator:decode_iterations_total", "Emulator only: decode iterations, by power-of-two batch group.", G))
        self.decode_seconds = r.add(Counter(
            "vllm_emulator:decode_iteration_seconds_total", "Emulator only: summed decode iteration time.", G))
        self.decode_sequences = r.add(Counter(
            "vllm_emulator:decode_iteration_sequences_total", "Emulator only: summed decode batch sizes.", G))
        self.decode_kv_tokens = r.add(Counter(
            "vllm_emulator:decode_iteration_kv_tokens_total",
            "Emulator only: summed KV tokens read (batch x mean context) per decode iteration.", G))
        self.prefill_iterations = r.add(Counter(
            "vllm_emulator:prefill_iterations_total", "Emulator only: prefill iterations, by power-of-two tokens.", P))
        self.prefill_seconds = r.add(Counter(
            "vllm_emulator:prefill_iteration_seconds_total", "Emulator only: summed prefill iteration time.", P))
        self.prefill_tokens = r.add(Counter(
            "vllm_emulator:prefill_iteration_tokens_total", "Emulator only: summed prompt tokens per prefill.", P))

        for family in (self.prompt_tokens_total, self.generation_tokens_total, self.prompt_tokens,
                       self.generation_tokens, self.ttft, self.tpot, self.itl, self.e2e, self.queue_time):
            family.touch(m)
        for reason in ("stop", "length", "abort"):
            self.success.touch((config.model, reason))
        if self.iteration_metrics:
            for group in _power_of_two_groups(config.max_batch):
                for family in (self.decode_iterations, self.decode_seconds, self.decode_sequences,
                               self.decode_kv_tokens):
                    family.touch((config.model, str(group)))
            for group in _power_of_two_groups(max(config.max_batched_tokens, config.max_model_len)):
                for family in (self.prefill_iterations, self.prefill_seconds, self.prefill_tokens):
                    family.touch((config.model, str(group)))

    def decode_iteration(self, batch: int, context: float, step_s: float) -> None:
        if self.iteration_metrics:
            key = (self.labels[0], str(batch_group(batch)))
            self.decode_iterations.inc(key)
            self.decode_seconds.inc(key, step_s)
            self.decode_sequences.inc(key, batch)
            self.decode_kv_tokens.inc(key, batch * context)

    def prefill_iteration(self, tokens: int, time_s: float) -> None:
        if self.iteration_metrics:
            key = (self.labels[0], str(batch_group(tokens)))
            self.prefill_iterations.inc(key)
            self.prefill_seconds.inc(key, time_s)
            self.prefill_tokens.inc(key, tokens)

    def finished(self, seq: _Sequence, now_s: float) -> None:
        m = self.labels
        self.success.inc((m[0], "length"))
        self.prompt_tokens.observe(m, seq.prompt_tokens)
        self.generation_tokens.observe(m, seq.generated)
        self.e2e.observe(m, now_s - seq.arrival_s)


def _power_of_two_groups(maximum: int) -> list[int]:
    return [1 << k for k in range(maximum.bit_length())]


class _Engine:
    """The continuous-batching scheduler loop (see the module docstring for the policy)."""

    def __init__(self, config: ModelServerConfig):
        self.config = config
        self.profile = config.profile
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.kv_reserved = 0
        self.clock_s = 0.0
        self.iterations = 0
        self.metrics = _Metrics(config, self)
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()
        self._wake = asyncio.Event()

    def now_s(self) -> float:
        return (self._loop.time() - self._t0) * self.config.time_scale

    def kv_usage(self) -> float:
        bs = self.config.block_size
        blocks = sum(-(-(s.prompt_tokens + s.generated) // bs) for s in self.running)
        return blocks / (self.config.kv_cache_tokens // bs)

    def submit(self, seq: _Sequence) -> None:
        self.waiting.append(seq)
        self._wake.set()

    async def _sleep_until(self, emulated_s: float) -> None:
        delay = self._t0 + emulated_s / self.config.time_scale - self._loop.time()
        await asyncio.sleep(max(0.0, delay))

    def _drop_aborted(self) -> None:
        if any(s.aborted for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.aborted)
        for s in [s for s in self.running if s.aborted]:
            self.running.remove(s)
            self.kv_reserved -= s.kv_reserved

    def _admit(self) -> list[_Sequence]:
        cfg = self.config
        admitted: list[_Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) < cfg.max_batch:
            head = self.waiting[0]
            if admitted and tokens + head.prompt_tokens > cfg.max_batched_tokens:
                break
            if self.kv_reserved + head.kv_reserved > cfg.kv_cache_tokens:
                break
            self.waiting.popleft()
            self.running.append(head)
            self.kv_reserved += head.kv_reserved
            admitted.append(head)
            tokens += head.prompt_tokens
        return admitted

    async def run(self) -> None:
        while True:
            self._drop_aborted()
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            admitted = self._admit()
            if admitted:
                await self._prefill(admitted)
            elif self.running:
                await self._decode()
            else:  # pragma: no cover - requests that cannot fit are rejected on arrival
                raise RuntimeError("scheduler stuck: head request does not fit an empty engine")
            self.iterations += 1

    async def _prefill(self, batch: list[_Sequence]) -> None:
        tokens = sum(s.prompt_tokens for s in batch)
        start = max(self.clock_s, max(s.arrival_s for s in batch))
        duration = float(self.profile.prefill_s(tokens))
        end = start + duration
        await self._sleep_until(end)
        self.clock_s = end
        m = self.metrics
        m.prefill_iteration(tokens, duration)
        m.prompt_tokens_total.inc(m.labels, tokens)
        m.generation_tokens_total.inc(m.labels, len(batch))
        for s in batch:
            m.queue_time.observe(m.labels, start - s.arrival_s)
            m.ttft.observe(m.labels, end - s.arrival_s)
            self._emit(s, end)

    async def _decode(self) -> None:
        batch = len(self.running)
        context = sum(s.prompt_tokens + s.generated for s in self.running) / batch
        duration = float(self.profile.decode_step_s(batch, context))
        end = self.clock_s + duration
        await self._sleep_until(end)
        self.clock_s = end
        m = self.metrics
        m.decode_iteration(batch, context, duration)
        m.generation_tokens_total.inc(m.labels, batch)
        gaps: dict[float, int] = {}
        for s in list(self.running):
            gaps[s.last_token_s] = gaps.get(s.last_token_s, 0) + 1
            self._emit(s, end)
        for last, count in gaps.items():
            m.itl.observe(m.labels, end - last, count)
            m.tpot.observe(m.labels, end - last, count)

    def _emit(self, s: _Sequence, now_s: float) -> None:
        s.generated += 1
        if s.generated == 1:
            s.first_token_s = now_s
        s.last_token_s = now_s
        if s.stream is not None:
            s.stream.put_nowait(1)
        if s.generated >= s.max_tokens:
            self.running.remove(s)
            self.kv_reserved -= s.kv_reserved
            if not s.aborted:
                self.metrics.finished(s, now_s)
            if s.stream is not None:
                s.stream.put_nowait(None)
            if not s.done.done():
                s.done.set_result(now_s)


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.json_response(body, status=status)


class EmulatedModelServer:
    """One emulated vLLM server; use as `async with EmulatedModelServer(cfg) as s:` or start()/stop()."""

    def __init__(self, config: ModelServerConfig):
        self.config = config
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._engine: _Engine | None = None
        self._engine_task: asyncio.Task | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"http://{self.config.host}:{self.port}"

    @property
    def engine(self) -> _Engine:
        if self._engine is None:
            raise RuntimeError("server not started")
        return self._engine

    def metrics_text(self) -> str:
        return self.engine.metrics.registry.render()

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        return app

    async def start(self) -> EmulatedModelServer:
        self._engine = _Engine(self.config)
        self._engine_task = asyncio.create_task(self._engine.run(), name=f"engine:{self.config.model}")
        self._runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._engine_task is not None:
            self._engine_task.cancel()
            try:
                await self._engine_task
            except asyncio.CancelledError:
                pass
            self._engine_task = None
        if self._engine is not None:
            for s in [*self._engine.waiting, *self._engine.running]:
                if not s.done.done():
                    s.done.cancel()

    async def __aenter__(self) -> EmulatedModelServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics_text().encode(), headers={"Content-Type": CONTENT_TYPE})

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": self.config.model, "object": "model", "owned_by": "variant-autoscaler-emulator",
                "max_model_len": self.config.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = CompletionRequest.model_validate(json.loads(await request.read()))
        except json.JSONDecodeError as exc:
            return _error(400, f"request body is not JSON: {exc}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return _error(400, f"{where}: {first['msg'].removeprefix('Value error, ')}")
        if body.model != self.config.model:
            return _error(404, f"The model `{body.model}` does not exist.", "NotFoundError")
        prompt = body.prompt_tokens()
        if prompt + body.max_tokens > self.config.max_model_len:
            return _error(400, f"This model's maximum context length is {self.config.max_model_len} tokens. "
                               f"However, you requested {prompt + body.max_tokens} tokens "
                               f"({prompt} in the messages, {body.max_tokens} in the completion).")
        engine = self.engine
        seq = _Sequence(prompt, body.max_tokens, engine.now_s(), asyncio.Queue() if body.stream else None)
        rid = f"cmpl-{next(self._ids)}"
        engine.submit(seq)
        try:
            if body.stream:
                return await self._stream(request, body, seq, rid)
            await seq.done
        except (asyncio.CancelledError, ConnectionResetError):
            seq.aborted = True
            raise
        return web.json_response({
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": body.model,
            "choices": [{"index": 0, "text": " t" * seq.generated, "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": seq.generated,
                      "total_tokens": prompt + seq.generated},
        })

    async def _stream(self, request: web.Request, body: CompletionRequest, seq: _Sequence, rid: str):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())

        def chunk(text: str, finish: str | None, usage: dict | None = None) -> bytes:
            event = {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                     "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            if usage is not None:
                event = {**event, "choices": [], "usage": usage}
            return f"data: {json.dumps(event)}\n\n".encode()

        assert seq.stream is not None
        sent = 0
        while sent < seq.max_tokens:
            item = await seq.stream.get()
            if item is None:
                break
            sent += 1
            await resp.write(chunk(" t", "length" if sent == seq.max_tokens else None))
        if (body.stream_options or {}).get("include_usage"):
            usage = {"prompt_tokens": seq.prompt_tokens, "completion_tokens": sent,
                     "total_tokens": seq.prompt_tokens + sent}
            await resp.write(chunk("", None, usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def serve_until_cancelled(config: ModelServerConfig, announce=print) -> None:
    """Run one server until the task is cancelled (Ctrl-C in the CLI)."""
    async with EmulatedModelServer(config) as server:
        announce(f"emulated vLLM server for {config.model!r} on {server.url} "
                 f"(max batch {config.max_batch}, time scale {config.time_scale:g})")
        await asyncio.Event().wait()
