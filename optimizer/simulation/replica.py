"""Discrete-event simulation of ONE vLLM-style replica with continuous batching.

Why a simulator: the analytical capacity model (``optimizer.capacity``) makes queueing
approximations; this replays requests through the iteration-level scheduler a vLLM server really
runs, so the approximations can be checked, and the cluster simulator can host many of these.

Two scheduling policies, chosen by the profile's ``max_num_batched_tokens`` (or the
``max_num_batched_tokens`` argument, which overrides it):

Chunked prefill (an integer token budget; vLLM V1, the default engine since 2025, always runs it;
the profile's default 2048 is V1's ``--max-num-batched-tokens`` default for the OpenAI API server,
``EngineArgs.get_batch_defaults``; recent releases raise it to 8192 on >= 70 GiB GPUs other than A100):

* Every iteration is one forward pass over at most ``max_num_batched_tokens`` tokens. Running
  decodes go first, one token each; the rest of the budget goes to prefill chunks, first to
  prompts already partly prefilled (first come first served), then to waiting requests admitted
  while they fit (running + prefilling < ``max_batch`` and their KV reservation fits), each taking
  min(its remaining prompt, the budget left). A prompt longer than the budget is prefilled over
  several iterations while the batch keeps decoding, so one long prompt no longer stalls every
  decode for its whole prefill.
* A mixed iteration lasts ``decode_step_s(decodes, mean context)`` plus each chunk's own cost
  p(end) - p(start) (``prefill_batch_s`` without its fixed base, which the decode step already
  pays); an iteration with chunks only lasts ``prefill_batch_s`` of its chunks. The iteration that
  completes a prompt yields its first token; the request decodes from the next one on.

Without a budget (``None``: the vLLM V0 default scheduler, no chunked prefill):

* Iterations are atomic. At each iteration boundary, if requests are waiting and at least one can
  be admitted (running + new < ``max_batch`` and its KV reservation fits), the iteration is a
  *prefill* of the admitted waiting requests, first come first served, batched while they fit
  (and while their prompt tokens stay under ``max_prefill_tokens`` if set); it lasts
  ``profile.prefill_batch_s(their prompt lengths)`` = base + sum of each prompt's own prefill
  beyond the base (attention is per prompt: the batch total is never squared), and yields each
  one's first token.
  Otherwise it is one *decode* step for every running sequence, lasting
  ``profile.decode_step_s(batch, mean context)``. Prefill first is what makes prefills stall the
  decodes of a mixed (PD) replica and stretch its inter-token latency.
* KV memory is reserved for a request's whole life (prompt + all output tokens) when it is
  admitted, so a replica never preempts; a request that could never fit is rejected.
* Role P prefills and hands the request off at the end of its prefill (its KV leaves with it).
  Role D takes requests whose prefill is done (their KV arriving): they join the decode batch at
  the next boundary with no prefill cost, and the time they arrive is their first token.
  Role PD does both.

Hosting: an outer event loop keeps each replica's ``next_event_time()`` in its own heap, calls
``advance(t)`` to run every iteration that ends by ``t`` (getting first-token / hand-off /
finished events back) and ``admit(request, t)`` to give it work. ``advance`` runs iterations
back to back in a tight loop, so a host that only needs the replica at arrivals may call it
lazily; ``simulate_replica`` does exactly that.

Speed: a decode step is O(1) plus O(log batch) per finishing sequence: each running sequence
stores the step count at which it finishes instead of being touched every step.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

import numpy as np

from optimizer.fleet import Role

_EPS_S = 1e-12
FROM_PROFILE = object()
"""Default of ``max_num_batched_tokens``: take the profile's (``None`` when it has none)."""


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request as it travels through replicas; the simulators fill in its times."""

    id: int
    arrival_s: float
    input_tokens: int
    output_tokens: int
    first_token_s: float = math.nan
    prefill_done_s: float = math.nan
    completion_s: float = math.nan
    rejected: bool = False
    prefill_replica: str | None = None
    decode_replica: str | None = None

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def itl_s(self) -> float:
        """Mean time between output tokens after the first; NaN for one-token answers."""
        if self.output_tokens <= 1:
            return math.nan
        return (self.completion_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.completion_s - self.arrival_s


class EventKind(StrEnum):
    FIRST_TOKEN = "first_token"
    HANDOFF = "handoff"
    """Role P: prefill done, the request (and its KV) must now go to a decode replica."""
    FINISHED = "finished"
    REJECTED = "rejected"
    """The request's KV reservation exceeds the replica's whole KV cache; it can never run here."""


class ReplicaEvent(NamedTuple):
    time_s: float
    kind: EventKind
    request: SimRequest


class Replica:
    """One replica: waiting queue, running batch, KV cache, and the iteration in flight."""

    def __init__(
        self,
        replica_id: str,
        profile,
        *,
        max_batch: int,
        kv_capacity_tokens: float,
        role: Role | str = Role.BOTH,
        variant: str = "",
        max_prefill_tokens: int | None = None,
        max_num_batched_tokens: int | None | object = FROM_PROFILE,
    ):
        if max_num_batched_tokens is FROM_PROFILE:
            max_num_batched_tokens = getattr(profile, "max_num_batched_tokens", None)
        if max_num_batched_tokens is not None and int(max_num_batched_tokens) < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1 or None, got {max_num_batched_tokens}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if kv_capacity_tokens <= 0:
            raise ValueError(f"kv_capacity_tokens must be > 0, got {kv_capacity_tokens}")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1 or None, got {max_prefill_tokens}")
        self.id = replica_id
        self.variant = variant
        self.profile = profile
        self.max_batch = int(max_batch)
        self.kv_capacity_tokens = float(kv_capacity_tokens)
        self.role = Role(role)
        self.max_prefill_tokens = max_prefill_tokens
        self.max_num_batched_tokens = None if max_num_batched_tokens is None else int(max_num_batched_tokens)

        # decode_step_s(b, ctx) = f(b) + k * b * ctx for both profile kinds: tabulate f once.
        self._kv_coef = float(getattr(profile, "decode_per_kv_token_s", 0.0))
        batches = np.arange(self.max_batch + 1, dtype=float)
        self._decode_fixed = [float(x) for x in np.atleast_1d(profile.decode_step_s(batches, 0.0))]
        self._prefill_cache: dict[int, float] = {}
        self._prefill_base = float(profile.prefill_base_time_s())

        self._waiting: deque[SimRequest] = deque()
        # (finish_step, seq, request, reserved KV, its term in _ctx_offset)
        self._running: list[tuple[int, int, SimRequest, int, int]] = []
        self._seq = 0
        self._step = 0  # decode steps run so far
        self._ctx_offset = 0  # sum over running of (input + 1 - join_step); ctx sum = this + n * step
        self._kv_reserved = 0.0
        # [request, reserved KV, prompt tokens prefilled so far]
        self._prefilling: list[list] = []
        self._chunks: list[tuple[list, int]] = []  # (prefilling entry, end) in the iteration in flight
        self._pending: list[ReplicaEvent] = []

        self._iter_kind: str | None = None
        self._iter_start = 0.0
        self._iter_end: float | None = None
        self.now = 0.0
        self.busy_s = 0.0
        self.prefill_iterations = 0
        self.decode_iterations = 0
        self.decode_batch_time = 0.0  # integral of batch size over decode time
        self.decode_time_s = 0.0
        self.prefill_time_s = 0.0

    @classmethod
    def from_variant(cls, replica_id: str, variant, model, accelerator, **kwargs) -> Replica:
        """A replica of a fleet ``Variant``, its KV cache sized from accelerator memory."""
        from optimizer.kv_memory import kv_capacity_tokens

        return cls(
            replica_id,
            variant.profile,
            max_batch=variant.max_batch,
            kv_capacity_tokens=kv_capacity_tokens(model, accelerator, variant.accelerators_per_replica),
            role=variant.role,
            variant=variant.name,
            **kwargs,
        )

    # ----- state the host and metrics read -----
    @property
    def queue_len(self) -> int:
        return len(self._waiting)

    @property
    def running_len(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def outstanding(self) -> int:
        """Requests queued or in flight, what a least-outstanding-requests router balances."""
        return len(self._waiting) + len(self._running) + len(self._prefilling)

    @property
    def kv_usage(self) -> float:
        """KV tokens actually held / capacity (what vLLM reports as kv_cache_usage_perc)."""
        held = self._ctx_offset + len(self._running) * self._step
        held += sum(done for _, _, done in self._prefilling)
        return min(1.0, held / self.kv_capacity_tokens)

    @property
    def kv_reserved(self) -> float:
        """KV tokens reserved / capacity: the admission limit."""
        return self._kv_reserved / self.kv_capacity_tokens

    @property
    def is_idle(self) -> bool:
        return self._iter_end is None and not self._waiting and not self._pending

    def busy_time_s(self, now: float | None = None) -> float:
        """Seconds spent running iterations up to ``now`` (default: the last time advanced to)."""
        now = self.now if now is None else now
        busy = self.busy_s
        if self._iter_end is not None:
            busy += max(0.0, min(now, self._iter_end) - self._iter_start)
        return busy

    def next_event_time(self) -> float | None:
        """When the iteration in flight ends (or now, if events are pending); None when idle."""
        if self._pending:
            return self.now
        return self._iter_end

    # ----- the host drives these -----
    def admit(self, request: SimRequest, now: float) -> bool:
        """Queue a request arriving at ``now``; False (and a REJECTED event) if it can never fit.

        Call ``advance(now)`` first: iterations that ended before ``now`` must have run.
        """
        if self._iter_end is not None and now > self._iter_end + _EPS_S:
            raise ValueError(
                f"replica {self.id}: admit at {now} but the iteration ending at {self._iter_end} "
                "has not been advanced"
            )
        self.now = max(self.now, now)
        if self._reservation(request) > self.kv_capacity_tokens:
            request.rejected = True
            self._pending.append(ReplicaEvent(now, EventKind.REJECTED, request))
            return False
        if self.role is Role.DECODE:
            request.decode_replica = self.id
            if math.isnan(request.first_token_s):
                request.first_token_s = now
            if request.output_tokens <= 1:
                request.completion_s = now
                self._pending.append(ReplicaEvent(now, EventKind.FINISHED, request))
                return True
        else:
            request.prefill_replica = self.id
            if self.role is Role.BOTH:
                request.decode_replica = self.id
        self._waiting.append(request)
        if self._iter_end is None:
            self._start_next(now)
        return True

    def advance(self, now: float) -> list[ReplicaEvent]:
        """Run every iteration that ends by ``now``; return the events they produced, in time order."""
        events, self._pending = self._pending, []
        while self._iter_end is not None and self._iter_end <= now + _EPS_S:
            t = self._iter_end
            self._finish_iteration(t, events)
            self._start_next(t)
        self.now = max(self.now, now)
        return events

    def withdraw_waiting(self) -> list[SimRequest]:
        """Take back every request not yet admitted to the batch (for draining or re-routing)."""
        out = list(self._waiting)
        self._waiting.clear()
        return out

    # ----- internals -----
    def _reservation(self, r: SimRequest) -> int:
        if self.role is Role.PREFILL:
            return r.input_tokens + 1
        return r.input_tokens + r.output_tokens

    def _prefill_time(self, tokens: int) -> float:
        t = self._prefill_cache.get(tokens)
        if t is None:
            t = float(self.profile.prefill_s(tokens))
            self._prefill_cache[tokens] = t
        return t

    def _start_next(self, t: float) -> None:
        self._iter_end = None
        self._iter_kind = None
        if self.max_num_batched_tokens is not None and self.role is not Role.DECODE:
            self._start_chunked(t)
            return
        if self._waiting and self.role is not Role.DECODE:
            self._take_prefill_batch()
            if self._prefilling:
                base = self._prefill_base
                own = sum(self._prefill_time(r.input_tokens) - base for r, _, _ in self._prefilling)
                self._begin(t, "prefill", base + own)
                return
        if self._waiting and self.role is Role.DECODE:
            self._join_waiting_decodes()
        n = len(self._running)
        if n:
            ctx = self._ctx_offset + n * self._step
            self._begin(t, "decode", self._decode_fixed[n] + self._kv_coef * ctx)

    def _start_chunked(self, t: float) -> None:
        """One forward pass under the token budget: decodes, then partial prefills, then new prompts."""
        n = len(self._running)
        room = self.max_num_batched_tokens - n
        chunks = self._chunks
        chunks.clear()
        cost = 0.0
        for entry in self._prefilling:
            if room <= 0:
                break
            r, _, done = entry
            end = min(r.input_tokens, done + room)
            chunks.append((entry, end))
            cost += self._prefill_time(end) - self._prefill_time(done)
            room -= end - done
        while room > 0 and self._waiting and self._fits(self._waiting[0], n + len(self._prefilling)):
            r = self._waiting.popleft()
            need = self._reservation(r)
            self._kv_reserved += need
            entry = [r, need, 0]
            self._prefilling.append(entry)
            end = min(r.input_tokens, room)
            chunks.append((entry, end))
            cost += self._prefill_time(end) - self._prefill_base
            room -= end
        if n:
            ctx = self._ctx_offset + n * self._step
            self._begin(t, "mixed" if chunks else "decode", self._decode_fixed[n] + self._kv_coef * ctx + cost)
        elif chunks:
            self._begin(t, "prefill", self._prefill_base + cost)

    def _begin(self, t: float, kind: str, duration: float) -> None:
        self._iter_kind = kind
        self._iter_start = t
        self._iter_end = t + max(duration, 0.0)

    def _fits(self, r: SimRequest, batch: int) -> bool:
        if batch >= self.max_batch:
            return False
        return self._kv_reserved + self._reservation(r) <= self.kv_capacity_tokens

    def _take_prefill_batch(self) -> None:
        tokens = 0
        batch = len(self._running)
        while self._waiting:
            r = self._waiting[0]
            if not self._fits(r, batch):
                break
            if self._prefilling and self.max_prefill_tokens is not None and \
                    tokens + r.input_tokens > self.max_prefill_tokens:
                break
            self._waiting.popleft()
            need = self._reservation(r)
            self._kv_reserved += need
            self._prefilling.append([r, need, 0])
            tokens += r.input_tokens
            batch += 1

    def _join_waiting_decodes(self) -> None:
        while self._waiting and self._fits(self._waiting[0], len(self._running)):
            r = self._waiting.popleft()
            need = self._reservation(r)
            self._kv_reserved += need
            self._join(r, need)

    def _join(self, r: SimRequest, reserved: int) -> None:
        remaining = r.output_tokens - 1
        self._seq += 1
        ctx_term = r.input_tokens + 1 - self._step
        heapq.heappush(self._running, (self._step + remaining, self._seq, r, reserved, ctx_term))
        self._ctx_offset += ctx_term

    def _finish_iteration(self, t: float, events: list[ReplicaEvent]) -> None:
        duration = t - self._iter_start
        self.busy_s += duration
        kind = self._iter_kind
        if kind in ("decode", "mixed"):
            n = len(self._running)
            self.decode_iterations += 1
            self.decode_time_s += duration
            self.decode_batch_time += n * duration
            self._step += 1
            running = self._running
            while running and running[0][0] <= self._step:
                _, _, r, need, ctx_term = heapq.heappop(running)
                r.completion_s = t
                self._kv_reserved -= need
                self._ctx_offset -= ctx_term
                events.append(ReplicaEvent(t, EventKind.FINISHED, r))
        if kind == "decode":
            return
        self.prefill_iterations += 1
        self.prefill_time_s += duration
        if self.max_num_batched_tokens is None:
            done, self._prefilling = self._prefilling, []
        else:
            for entry, end in self._chunks:
                entry[2] = end
            self._chunks.clear()
            done = [e for e in self._prefilling if e[2] >= e[0].input_tokens]
            if done:
                self._prefilling = [e for e in self._prefilling if e[2] < e[0].input_tokens]
        for r, need, _ in done:
            r.prefill_done_s = t
            if self.role is Role.PREFILL:
                self._kv_reserved -= need
                events.append(ReplicaEvent(t, EventKind.HANDOFF, r))
                continue
            r.first_token_s = t
            events.append(ReplicaEvent(t, EventKind.FIRST_TOKEN, r))
            if r.output_tokens <= 1:
                r.completion_s = t
                self._kv_reserved -= need
                events.append(ReplicaEvent(t, EventKind.FINISHED, r))
            else:
                self._join(r, need)


@dataclass
class ReplicaRecords:
    """Per-request outcome of ``simulate_replica``, as arrays, plus replica-level accounting."""

    arrival_s: np.ndarray
    first_token_s: np.ndarray
    completion_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    rejected: np.ndarray
    busy_s: float
    end_s: float
    mean_decode_batch: float
    prefill_iterations: int
    decode_iterations: int
    extra: dict = field(default_factory=dict)

    @property
    def ttft_s(self) -> np.ndarray:
        return self.first_token_s - self.arrival_s

    @property
    def itl_s(self) -> np.ndarray:
        """Per request; NaN where the answer has a single token (no inter-token gap)."""
        gaps = self.output_tokens - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gaps > 0, (self.completion_s - self.first_token_s) / np.maximum(gaps, 1), np.nan)

    @property
    def e2e_s(self) -> np.ndarray:
        return self.completion_s - self.arrival_s

    @property
    def utilization(self) -> float:
        return self.busy_s / self.end_s if self.end_s > 0 else 0.0


def simulate_replica(
    profile,
    arrival_times_s,
    input_tokens,
    output_tokens,
    *,
    max_batch: int,
    kv_capacity_tokens: float,
    role: Role | str = Role.BOTH,
    kv_transfer_s: float = 0.0,
    max_prefill_tokens: int | None = None,
    max_num_batched_tokens: int | None | object = FROM_PROFILE,
) -> ReplicaRecords:
    """Replay requests through one replica; arrivals must be sorted.

    Role P: the first token is taken to reach the user when the KV has been shipped, so it is
    stamped at prefill end + ``kv_transfer_s`` and nothing completes. Role D: arrivals are the
    moments each request's KV lands, which is also its first token.
    """
    arrivals = np.asarray(arrival_times_s, dtype=float)
    ins = np.asarray(input_tokens, dtype=np.int64)
    outs = np.asarray(output_tokens, dtype=np.int64)
    if not (arrivals.shape == ins.shape == outs.shape) or arrivals.ndim != 1:
        raise ValueError("arrival_times_s, input_tokens and output_tokens must be 1-D and the same length")
    if arrivals.size and np.any(np.diff(arrivals) < 0):
        raise ValueError("arrival_times_s must be sorted")
    if np.any(ins < 1) or np.any(outs < 1):
        raise ValueError("input_tokens and output_tokens must be >= 1")
    rep = Replica("sim", profile, max_batch=max_batch, kv_capacity_tokens=kv_capacity_tokens, role=role,
                  max_prefill_tokens=max_prefill_tokens, max_num_batched_tokens=max_num_batched_tokens)
    requests = [SimRequest(i, float(a), int(n_in), int(n_out))
                for i, (a, n_in, n_out) in enumerate(zip(arrivals.tolist(), ins.tolist(), outs.tolist(),
                                                         strict=True))]
    for r in requests:
        rep.advance(r.arrival_s)
        rep.admit(r, r.arrival_s)
    # Bounded drain: every admitted request needs at most one prefill iteration per prompt token
    # (chunks of one token, the smallest budget) and output_tokens decode steps.
    end = math.inf
    for _ in range(2 * (len(requests) + int(outs.sum(initial=0)) + int(ins.sum(initial=0))) + 2):
        nxt = rep.next_event_time()
        if nxt is None:
            break
        rep.advance(nxt)
        end = nxt
    end = rep.now if not math.isfinite(end) else max(end, rep.now)

    first = np.array([r.first_token_s for r in requests], dtype=float)
    if rep.role is Role.PREFILL:
        first = np.array([r.prefill_done_s for r in requests], dtype=float) + kv_transfer_s
    return ReplicaRecords(
        arrival_s=arrivals,
        first_token_s=first,
        completion_s=np.array([r.completion_s for r in requests], dtype=float),
        input_tokens=ins,
        output_tokens=outs,
        rejected=np.array([r.rejected for r in requests], dtype=bool),
        busy_s=rep.busy_s,
        end_s=end,
        mean_decode_batch=rep.decode_batch_time / rep.decode_time_s if rep.decode_time_s > 0 else 0.0,
        prefill_iterations=rep.prefill_iterations,
        decode_iterations=rep.decode_iterations,
    )
