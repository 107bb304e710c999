"""Flow control for the emulated inference gateway: hold, weight and dispatch on what the operator publishes.

Why: issue 15 says our saturation and routing weights help a request scheduler; the simulator shows
it (`optimizer.simulation.routers.OursFlowRouter`, "flow-ours"), and `make live` should show the same
signal driving a real HTTP gateway. `OperatorSignal` polls the operator's `/metrics` over HTTP on
127.0.0.1 every `poll_interval_s` (bounded by a timeout per poll) and reads, with prometheus_client's
own text parser:

* `variant_autoscaler_pool_saturation{namespace, inference_pool, stage}`: the `effective` stage (the
  larger of prefill and decode; the larger of those present if an exporter leaves it out);
* `variant_autoscaler_routing_weight{model, bucket, namespace, variant}`: shares per (model, bucket);
* `variant_autoscaler_last_successful_cycle_timestamp_seconds`: how old the operator's decision is.

`FlowGate` holds requests of a pool in a bounded FIFO while the pool's effective saturation is >= 1.0,
and releases them in arrival order once it reads below 1.0 (checked after every poll and at every
arrival). The FIFO is per model within the pool (a model is a flow, as llm-d's flow control keeps a
queue per flow), so one model with no ready pod never blocks another model's requests behind it. Fail closed, as the llm-d router treats a stale endpoint: a pool's value counts as fresh
for `stale_after_s` after the last scrape that carried it (or after the operator's last successful
cycle, whichever is older); once older than that, or never seen and the gateway has run longer
than `stale_after_s`, the pool reads 1.0 and new work is held. During that grace the last value
stands (and before any value arrives the pool is open: the operator's first cycle needs traffic
to measure). A pool with no ready pod of the model is held too (no endpoint: the router's 1.0).
Nothing is held forever: after `hold_timeout_s` a held request is answered 503 with the pool, the
reading and why; beyond `max_held_requests` held in one pool a new request is answered 429.

With `hold=False` the gate ignores saturation (weights only, as the simulator's `weighted` router
follows the guidance without flow control); a model with no ready pod is still held.

Dispatch (`choose_pod`): the request's bucket is the operator's length cell that holds its prompt and
output token counts, found the way the operator names cells (`histogram_estimates`): vLLM's
prompt and generation histograms count a request of n tokens in the bucket `(lo, hi]` with
`lo < n <= hi`, and a cell named `in{lo}-{hi}xout{lo}-{hi}` spans the outer edges of the buckets that
join it; the prompt length is counted the way the emulated server counts it (`prompt_token_count`,
or the prompt), the output as `max_tokens` (the emulator generates exactly that many). A variant
is chosen among the bucket's weights by smooth weighted round-robin (deterministic; credits reset
when the weights change), then the least-outstanding ready pod of that variant takes the request;
when the chosen variant has no ready pod, the least-outstanding ready pod of the model does
("fallback"); a request with no weights for its cell (no series for the model, a cell the operator
dropped under its minimum share, or a cell-less bucket name) goes least-outstanding over all ready
pods ("unguided"). A pod belongs to the variant named like its Deployment (as in `make live`, and as
a VariantAutoscaling without scaleTargetRef targets), unless `variants` maps the Deployment.

Where this differs from the simulator's flow-ours, and why:

* flow-ours computes saturation at every dispatch from requests in flight / the SLO concurrency of
  the pool's ready replicas; this gateway follows the value the operator publishes (demand / SLO
  capacity), which changes once per operator cycle. So a value >= 1.0 holds a pool until the next
  cycle publishes less, and held requests are not demand the operator sees (it measures at the
  servers), so a hold lowers the next value: the gate can open and close at the cycle's cadence.
* flow-ours dispatches only to replicas below their own SLO concurrency; the gateway has no
  per-pod cap (the operator publishes none).
* flow-ours' weighted choice is among variants with live replicas, scales a weight by live /
  planned replicas and spills a request the pick would queue; the gateway follows the published
  weights alone and falls back to any ready pod only when the chosen variant has none.
* flow-ours' guidance is by prompt-length range; the gateway's by the operator's prompt x output cell.
* The simulator's metrics are never stale and its cluster drops a held request after its pending
  timeout; here a stale signal fails closed and a held request gets 503 (a full queue 429).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field, field_validator

log = logging.getLogger(__name__)

SATURATION_METRIC = "variant_autoscaler_pool_saturation"
WEIGHT_METRIC = "variant_autoscaler_routing_weight"
LAST_CYCLE_METRIC = "variant_autoscaler_last_successful_cycle_timestamp_seconds"
STALE_SATURATION = 1.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_SCRAPE_BYTES = 8 << 20
DISPATCH_LOG_LENGTH = 10_000
_CELL = re.compile(r"in([0-9.]+)-([0-9.]+|inf)xout([0-9.]+)-([0-9.]+|inf)")


class PoolRef(BaseModel):
    """The InferencePool a model's requests belong to (the `inference_pool` label of the saturation)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pool: str = Field(min_length=1)
    namespace: str | None = Field(default=None, description="None: the largest value of the pool in any namespace.")


class FlowControlSettings(BaseModel):
    """How the gateway follows the operator: where it reads, how often, and its bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics_url: str = Field(description="The operator's /metrics, on a loopback address.")
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    poll_timeout_s: float = Field(default=2.0, gt=0, le=60)
    stale_after_s: float = Field(default=30.0, gt=0, le=3600,
                                 description="Grace before a stale or missing signal counts as saturation 1.0.")
    hold: bool = Field(default=True, description="False: follow the weights but never hold on saturation "
                                                 "(the simulator's `weighted` router; a model with no ready pod "
                                                 "is still held).")
    hold_timeout_s: float = Field(default=15.0, gt=0, le=600, description="A held request is answered 503 after this.")
    max_held_requests: int = Field(default=1024, ge=1, le=100_000, description="Per model's queue; beyond it 429.")
    pools: dict[str, PoolRef] = Field(default_factory=dict,
                                      description="Model -> pool; default: the pool named like the model "
                                                  "(the operator's default without the inference-pool annotation).")
    variants: dict[str, str] = Field(default_factory=dict,
                                     description="Deployment -> variant name, where they differ.")

    @field_validator("metrics_url")
    @classmethod
    def _loopback(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
            raise ValueError(f"metrics_url must be http:// on a loopback address ({', '.join(LOOPBACK_HOSTS)}), "
                             f"got {url!r}")
        return url

    def pool_of(self, model: str) -> PoolRef:
        return self.pools.get(model) or PoolRef(pool=model)


@dataclass(frozen=True)
class Cell:
    """One bucket label of the routing weights, with the token ranges its name spans."""

    label: str
    in_lo: float
    in_hi: float
    out_lo: float
    out_hi: float

    def holds(self, prompt_tokens: int, output_tokens: int) -> bool:
        return self.in_lo < prompt_tokens <= self.in_hi and self.out_lo < output_tokens <= self.out_hi


def parse_cell(label: str) -> Cell | None:
    """`in200-500xout20-50` -> its ranges; None for a cell-less name (`in120xout40`)."""
    m = _CELL.fullmatch(label)
    if m is None:
        return None
    a, b, c, d = (math.inf if x == "inf" else float(x) for x in m.groups())
    return Cell(label, a, b, c, d) if a < b and c < d else None


def cell_for(cells: list[Cell], prompt_tokens: int, output_tokens: int) -> Cell | None:
    """The cell the operator would count this request in, if it publishes one."""
    return next((c for c in cells if c.holds(prompt_tokens, output_tokens)), None)


@dataclass(frozen=True)
class SignalReading:
    """What one scrape of the operator's /metrics says."""

    saturation: dict[tuple[str, str], float]
    weights: dict[tuple[str, str], dict[tuple[str, str], float]]
    cells: dict[str, list[Cell]]
    last_cycle_s: float | None


def parse_operator_metrics(text: str) -> SignalReading:
    """The saturation (effective stage), routing weights and last-cycle time of one exposition."""
    stages: dict[tuple[str, str], dict[str, float]] = {}
    weights: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
    last_cycle = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if math.isnan(s.value):
                continue
            if s.name == SATURATION_METRIC and s.value >= 0:  # +Inf stays: an unbounded overload holds
                key = (s.labels.get("namespace", ""), s.labels.get("inference_pool", ""))
                stages.setdefault(key, {})[s.labels.get("stage", "")] = s.value
            elif s.name == WEIGHT_METRIC and 0 < s.value < math.inf:
                key = (s.labels.get("model", ""), s.labels.get("bucket", ""))
                weights.setdefault(key, {})[(s.labels.get("namespace", ""), s.labels.get("variant", ""))] = s.value
            elif s.name == LAST_CYCLE_METRIC and math.isfinite(s.value):
                last_cycle = s.value
    saturation = {k: v["effective"] if "effective" in v else max(v.values()) for k, v in stages.items()}
    cells: dict[str, list[Cell]] = {}
    for model, bucket in sorted(weights):
        cell = parse_cell(bucket)
        if cell is not None:
            cells.setdefault(model, []).append(cell)
    return SignalReading(saturation=saturation, weights=weights, cells=cells, last_cycle_s=last_cycle)


class OperatorSignal:
    """The operator's last published saturation and weights, with the age of each pool's value."""

    def __init__(self, settings: FlowControlSettings):
        self.settings = settings
        self.started_s = time.time()
        self.reading = SignalReading({}, {}, {}, None)
        self._pools: dict[tuple[str, str], tuple[float, float]] = {}  # (ns, pool) -> (value, fresh at, wall s)
        self.polls_ok = 0
        self.polls_failed = 0
        self.last_error = ""
        self._last_ok_s = self.started_s
        self._logged: tuple[str, int] | None = None

    async def poll_once(self, session: aiohttp.ClientSession) -> bool:
        """One bounded scrape; on failure the previous values stay and age towards fail-closed."""
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.poll_timeout_s)
            async with session.get(self.settings.metrics_url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                raw = await resp.content.read(MAX_SCRAPE_BYTES + 1)
                if len(raw) > MAX_SCRAPE_BYTES:
                    raise ValueError(f"exposition larger than {MAX_SCRAPE_BYTES} bytes")
            reading = parse_operator_metrics(raw.decode("utf-8", errors="replace"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.polls_failed += 1
            why = f"{type(exc).__name__}: {exc}".rstrip(": ")
            # a warning once it matters (past the grace: the gate fails closed), not while an operator starts
            level = logging.WARNING if time.time() - self._last_ok_s > self.settings.stale_after_s else logging.DEBUG
            if (why, level) != self._logged:
                log.log(level, "gateway: cannot read the operator's metrics at %s: %s", self.settings.metrics_url, why)
                self._logged = (why, level)
            self.last_error = why
            return False
        self.ingest(reading)
        return True

    def ingest(self, reading: SignalReading, now_s: float | None = None) -> None:
        """Adopt a scrape: weights replace the old ones (one decision), pool values refresh their age."""
        now_s = time.time() if now_s is None else now_s
        fresh_at = now_s if reading.last_cycle_s is None else min(now_s, reading.last_cycle_s)
        for key, value in reading.saturation.items():
            self._pools[key] = (value, fresh_at)
        self.reading = reading
        self.polls_ok += 1
        self.last_error = ""
        self._last_ok_s = now_s
        self._logged = None

    def saturation(self, ref: PoolRef, now_s: float | None = None) -> tuple[float, str]:
        """The pool's effective saturation as the gate uses it, and where the number comes from."""
        now_s = time.time() if now_s is None else now_s
        grace = self.settings.stale_after_s
        known = [(v, at) for (ns, pool), (v, at) in self._pools.items()
                 if pool == ref.pool and (ref.namespace is None or ns == ref.namespace)]
        name = f"{ref.namespace}/{ref.pool}" if ref.namespace else ref.pool
        if not known:
            if now_s - self.started_s <= grace:
                return 0.0, f"no saturation for pool {name!r} yet (within the {grace:g} s grace)"
            return STALE_SATURATION, (f"no saturation for pool {name!r} on {self.settings.metrics_url} "
                                      f"for over {grace:g} s{self._error()}: fail closed at 1.0")
        value = max(v for v, _ in known)
        oldest = min(at for _, at in known)
        if now_s - oldest > grace:
            return STALE_SATURATION, (f"saturation of pool {name!r} is {now_s - oldest:.0f} s old (grace "
                                      f"{grace:g} s){self._error()}: fail closed at 1.0")
        return value, f"pool {name!r} saturation {value:.3g} from the operator"

    def _error(self) -> str:
        return f"; last scrape failed: {self.last_error}" if self.last_error else ""


@dataclass
class _Held:
    seq: int
    request_id: str | None
    prompt_tokens: int
    output_tokens: int
    future: asyncio.Future = field(repr=False)


@dataclass
class FlowCounts:
    """What the gateway did with requests (printed at the end of `make live`)."""

    held: int = 0
    released: int = 0
    refused_timeout: int = 0
    refused_full: int = 0
    refused_stopping: int = 0
    weighted: int = 0
    fallback: int = 0
    unguided: int = 0
    per_variant: dict[str, int] = field(default_factory=dict)
    held_s_total: float = 0.0
    held_s_max: float = 0.0

    def note_hold(self, seconds: float) -> None:
        self.held_s_total += seconds
        self.held_s_max = max(self.held_s_max, seconds)

    def summary(self) -> str:
        variants = ", ".join(f"{v} {n}" for v, n in sorted(self.per_variant.items())) or "none"
        return (f"{self.weighted + self.fallback + self.unguided} dispatched ({self.weighted} by the operator's "
                f"weights, {self.fallback} fallback to any ready pod, {self.unguided} without weights for their "
                f"bucket); {self.held} held (saturation >= 1.0 or no ready pod; mean {self.held_s_total / max(1, self.held):.1f} s, "
                f"longest {self.held_s_max:.1f} s): {self.released} released, "
                f"{self.refused_timeout} refused 503 after the hold timeout, {self.refused_full} refused 429 "
                f"(hold queue full), {self.refused_stopping} refused at shutdown; per variant: {variants}")


class FlowGate:
    """Per-pool FIFO holds and weighted dispatch on an `OperatorSignal` (see the module doc)."""

    def __init__(self, settings: FlowControlSettings, ready_pods):
        self.settings = settings
        self.signal = OperatorSignal(settings)
        self.ready_pods = ready_pods  # model -> ready pods (`in_flight`, `info`: a kubelet PodInfo)
        self.counts = FlowCounts()
        self.dispatch_log: collections.deque[tuple[int, str | None, str]] = collections.deque(
            maxlen=DISPATCH_LOG_LENGTH)
        self._queues: dict[tuple[str, str | None, str], collections.deque[_Held]] = {}
        self._credit: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
        self._credit_for: dict[tuple[str, str], dict[tuple[str, str], float]] = {}
        self._seq = 0

    # --- gate -------------------------------------------------------------------------------------
    def closed(self, model: str) -> tuple[bool, str]:
        """Whether the model's pool holds new work now, and why."""
        value, why = self.signal.saturation(self.settings.pool_of(model))
        if value >= 1.0 and self.settings.hold:
            return True, why
        if not self.ready_pods(model):
            return True, f"no ready replica serves {model!r}"
        return False, why

    def held(self, model: str) -> int:
        return len(self._queues.get(self._key(model), ()))

    def _key(self, model: str) -> tuple[str, str | None, str]:
        ref = self.settings.pool_of(model)
        return (model, ref.namespace, ref.pool)

    async def admit(self, model: str, prompt_tokens: int, output_tokens: int,
                    request_id: str | None = None) -> tuple[object | None, int, str]:
        """A pod for the request (its in-flight count already raised), or None with an HTTP status and message."""
        self._seq += 1
        seq = self._seq
        queue = self._queues.setdefault(self._key(model), collections.deque())
        shut, why = self.closed(model)
        if not shut and not queue:
            return self._dispatch(model, seq, request_id, prompt_tokens, output_tokens), 200, ""
        if len(queue) >= self.settings.max_held_requests:
            self.counts.refused_full += 1
            return None, 429, (f"gateway hold queue for {model!r} is full ({len(queue)} requests held, "
                               f"max {self.settings.max_held_requests}): {why}; retry later")
        waiter = _Held(seq, request_id, prompt_tokens, output_tokens, asyncio.get_running_loop().create_future())
        queue.append(waiter)
        self.counts.held += 1
        self.release(model)
        since = time.monotonic()
        try:
            pick = await asyncio.wait_for(waiter.future, self.settings.hold_timeout_s)
        except TimeoutError:
            self.counts.note_hold(time.monotonic() - since)
            self._forget(queue, waiter)
            self.counts.refused_timeout += 1
            _, why = self.closed(model)
            return None, 503, (f"held {self.settings.hold_timeout_s:g} s at the gateway and not dispatched: {why} "
                               f"(flow control holds requests while the pool's saturation is >= 1.0)")
        except asyncio.CancelledError:
            self._forget(queue, waiter)
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.result() is not None:
                waiter.future.result().in_flight -= 1
            raise
        self.counts.note_hold(time.monotonic() - since)
        if pick is None:
            self.counts.refused_stopping += 1
            return None, 503, "the gateway is stopping; the request was held and not dispatched"
        return pick, 200, ""

    @staticmethod
    def _forget(queue: collections.deque, waiter: _Held) -> None:
        try:
            queue.remove(waiter)
        except ValueError:
            pass

    def release(self, model: str | None = None) -> int:
        """Dispatch held requests in arrival order while their pool reads open; returns how many."""
        released = 0
        for key, queue in self._queues.items():
            if model is not None and key[0] != model:
                continue
            while queue and not self.closed(key[0])[0]:
                waiter = queue.popleft()
                if waiter.future.done():
                    continue
                pick = self._dispatch(key[0], waiter.seq, waiter.request_id, waiter.prompt_tokens,
                                      waiter.output_tokens)
                waiter.future.set_result(pick)
                self.counts.released += 1
                released += 1
        return released

    def stop(self) -> None:
        """Answer every held request (503, gateway stopping) so shutdown never waits on a hold."""
        for queue in self._queues.values():
            while queue:
                waiter = queue.popleft()
                if not waiter.future.done():
                    waiter.future.set_result(None)

    # --- dispatch ---------------------------------------------------------------------------------
    def _variant_of(self, pod) -> tuple[str, str]:
        info = pod.info
        return info.namespace, self.settings.variants.get(info.deployment, info.deployment)

    def choose_pod(self, model: str, prompt_tokens: int, output_tokens: int):
        """(pod, how): by the weights of the request's cell, see the module doc; None when no pod is ready."""
        pods = self.ready_pods(model)
        if not pods:
            return None, "none"
        reading = self.signal.reading
        cell = cell_for(reading.cells.get(model, []), prompt_tokens, output_tokens)
        weights = reading.weights.get((model, cell.label)) if cell is not None else None
        if not weights:
            return _least(pods), "unguided"
        key = (model, cell.label)
        if self._credit_for.get(key) != weights:
            self._credit_for[key] = dict(weights)
            self._credit[key] = {}
        credit = self._credit[key]
        for v, w in weights.items():
            credit[v] = credit.get(v, 0.0) + w
        chosen = max(sorted(weights), key=lambda v: credit[v])
        credit[chosen] -= sum(weights.values())
        mine = [p for p in pods if self._variant_of(p) == chosen]
        if mine:
            return _least(mine), "weighted"
        return _least(pods), "fallback"

    def _dispatch(self, model: str, seq: int, request_id: str | None, prompt_tokens: int, output_tokens: int):
        pick, how = self.choose_pod(model, prompt_tokens, output_tokens)
        if pick is None:  # admit/release only dispatch while a pod is ready; kept for safety
            return None
        pick.in_flight += 1
        setattr(self.counts, how, getattr(self.counts, how) + 1)
        variant = self._variant_of(pick)[1]
        self.counts.per_variant[variant] = self.counts.per_variant.get(variant, 0) + 1
        self.dispatch_log.append((seq, request_id, pick.info.name))
        return pick

    # --- polling ----------------------------------------------------------------------------------
    async def run(self, session: aiohttp.ClientSession, stopping: asyncio.Event) -> None:
        """Poll, then release what the new reading opens; bounded by `stopping` and each poll's timeout."""
        while not stopping.is_set():
            await self.signal.poll_once(session)
            self.release()
            try:
                await asyncio.wait_for(stopping.wait(), self.settings.poll_interval_s)
            except TimeoutError:
                pass


def _least(pods):
    return min(pods, key=lambda p: (p.in_flight, p.info.name))
