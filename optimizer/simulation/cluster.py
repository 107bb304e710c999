"""Discrete-event simulation of a heterogeneous inference cluster driven by an autoscaling policy.

It hosts many single-replica simulations (`optimizer.simulation.replica.Replica`, continuous
batching) and adds what a cluster has and one replica does not:

* **heterogeneous variants**: each replica is a fleet `Variant` (accelerator, TP, max batch, role);
* **P/D disaggregation**: a request routed to a prefill (P) replica is handed off after its prefill,
  its KV cache crosses a link of the configured bandwidth, and a decode (D) replica finishes it;
* **cold start**: a replica requested by the policy is billed at once but serves only after
  `ColdStart.seconds(...)` (container start plus loading the weights);
* **draining**: a replica the policy removes is marked, the router sends it nothing more, and it
  leaves (and stops being billed) when its last request finishes;
* **inventory**: a scale-up never exceeds the accelerators the cluster has; what does not fit stays
  *pending* (as a pod the scheduler cannot place) and is retried at the next decision. Several
  models share one inventory: at each decision removals free accelerators first, then pending
  scale-ups are served first come, first served (the variant short for longest goes first), which
  is how per-model autoscalers fight over the same GPUs in a real cluster;
* **conservation**: every request either completes or is counted as dropped (no live replica of
  its model for `pending_timeout_s`, or too long for every replica's KV cache).

Event loop. Arrivals come from the trace in order; policy ticks, cold-start completions, prefill
iterations of P replicas and KV arrivals at D replicas sit in one heap. PD and D replicas are
advanced lazily, only when the router, a tick or an admission needs their state, which is exact
because a replica's state only changes through its own iterations. So a decode step costs no heap
operation, which is what keeps an hour of traffic on 20 replicas at a few seconds.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from optimizer.fleet import Role, Variant
from optimizer.input_limits import STRICT
from optimizer.kv_memory import kv_capacity_tokens
from optimizer.problem import Problem
from optimizer.simulation.accounting import CostLedger
from optimizer.simulation.policy import (
    ArrivalSample,
    CompletionSample,
    Decision,
    Observation,
    Policy,
    ReplicaObservation,
    ReplicaState,
)
from optimizer.simulation.replica import EventKind, Replica, SimRequest
from optimizer.simulation.traces import Trace


class ColdStart(BaseModel):
    """Time from scale-up to ready: engine start plus weight loading, per accelerator type if known.

    Defaults: ~40 s for pulling a cached image and starting the engine (CUDA graphs, KV allocation)
    and weights read at 2 GB/s per replica from a local NVMe or a fast object-store cache; a 16 GB
    8B model is ready in ~48 s, a 140 GB 70B model in ~110 s, which is what vLLM deployments see.
    """

    model_config = STRICT

    base_s: float = Field(default=40.0, ge=0)
    load_gb_per_s: float = Field(default=2.0, gt=0)
    base_s_by_accelerator: dict[str, float] = Field(default_factory=dict)

    def seconds(self, accelerator: str, weight_gb: float) -> float:
        return self.base_s_by_accelerator.get(accelerator, self.base_s) + weight_gb / self.load_gb_per_s


class ClusterOptions(BaseModel):
    model_config = STRICT

    cold_start: ColdStart = Field(default_factory=ColdStart)
    kv_link_gb_s: float | None = Field(
        default=None, gt=0, description="P->D KV link bandwidth; None uses the problem's options.kv_transfer_gb_s."
    )
    pending_timeout_s: float = Field(
        default=60.0, gt=0, description="A request with no live replica of its model for this long is dropped."
    )
    warmup_s: float = Field(
        default=0.0, ge=0, description="Requests arriving earlier are not scored, and cost starts here."
    )
    record_assignments: bool = Field(default=False, description="Keep (request, replica, time) of every routing.")


class HostedReplica:
    """A replica in the cluster: its engine plus lifecycle and counters the policy observes."""

    __slots__ = ("id", "variant", "model", "engine", "created_s", "ready_s", "draining", "draining_since",
                 "removed_s", "completed", "tokens", "last_event_s", "lazy", "scheduled_s", "index", "finished",
                 "slo_misses")

    def __init__(self, rid: str, variant: Variant, engine: Replica, created_s: float, index: int):
        self.id = rid
        self.variant = variant.name
        self.model = variant.model
        self.engine = engine
        self.created_s = created_s
        self.ready_s: float | None = None
        self.draining = False
        self.draining_since = math.inf
        self.removed_s: float | None = None
        self.completed = 0
        self.tokens = 0
        self.finished = 0
        self.slo_misses = 0
        self.last_event_s = created_s
        self.lazy = variant.role is not Role.PREFILL
        self.scheduled_s: float | None = None
        self.index = index

    @property
    def outstanding(self) -> int:
        return self.engine.outstanding

    @property
    def waiting(self) -> int:
        """Requests admitted but not yet in the batch (vllm:num_requests_waiting)."""
        return self.engine.queue_len

    @property
    def kv_usage(self) -> float:
        """KV cache in use / capacity (vllm:kv_cache_usage_perc), what llm-d's saturation detector reads."""
        return self.engine.kv_usage


@dataclass
class RunResult:
    """Everything a run produced; `optimizer.simulation.metrics` turns it into figures."""

    policy: str
    router: str
    trace_name: str
    models: tuple[str, ...]
    arrival_s: np.ndarray
    first_token_s: np.ndarray
    completion_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    model_index: np.ndarray
    dropped: np.ndarray
    ledger: CostLedger
    start_s: float
    end_s: float
    timeline_s: list[float] = field(default_factory=list)
    timeline: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    """Per variant, at each tick: (ready, starting, draining) replicas."""
    changes: list[tuple[float, int, str]] = field(default_factory=list)
    """(time, replicas added or removed, variant) of every scaling action after the initial warm fleet."""
    pending_timeline: dict[str, list[int]] = field(default_factory=dict)
    """Per variant, at each tick: replicas asked for that did not fit the free inventory (pending pods)."""
    variant_models: dict[str, str] = field(default_factory=dict)
    decisions: list[tuple[float, dict[str, int], str]] = field(default_factory=list)
    assignments: list[tuple[int, str, float]] = field(default_factory=list)
    draining_marks: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    scored: np.ndarray | None = None

    @property
    def n_requests(self) -> int:
        return len(self.arrival_s)


_TICK, _READY, _P_ITER, _KV_ARRIVAL, _RETRY = 0, 1, 2, 3, 4
FLOW_RETRY_MIN_S = 0.01
"""Shortest gap between two retries of a flow-controlled pool's held requests (bounds the events)."""


class ClusterSimulator:
    """One run: a trace, a fleet (a `Problem`'s accelerators, models, variants), a policy, a router."""

    def __init__(self, problem: Problem, trace: Trace, policy: Policy, router, options: ClusterOptions | None = None):
        self.problem = problem
        self.trace = trace
        self.policy = policy
        self.router = router
        self.options = options or ClusterOptions()
        self.variants = {v.name: v for v in problem.variants}
        unknown = [m for m in trace.models if m not in {mm.name for mm in problem.models}]
        if unknown:
            raise ValueError(f"trace models {unknown} are not in the fleet (models: {[m.name for m in problem.models]})")
        self._kv_bw = (self.options.kv_link_gb_s or problem.options.kv_transfer_gb_s) * 1e9
        self._kv_bytes = {m.name: m.kv_bytes_per_token for m in problem.models}
        self._weight_gb = {m.name: m.weight_gb for m in problem.models}
        self._kv_tokens = {
            v.name: kv_capacity_tokens(problem.model(v.model), problem.accelerator(v.accelerator),
                                       v.accelerators_per_replica)
            for v in problem.variants
        }
        self._inventory = {a.name: a.available for a in problem.accelerators}
        self._slo_targets = {slo.model: (slo.ttft_s, slo.itl_s) for slo in problem.slos}
        self.replicas: dict[str, list[HostedReplica]] = {v: [] for v in self.variants}
        self._entry_pool: dict[str, list[HostedReplica]] = {m: [] for m in trace.models}
        self._decode_pool: dict[str, list[HostedReplica]] = {m: [] for m in trace.models}
        self._pending: dict[str, deque] = {}
        self._heap: list = []
        self._seq = 0
        self._serial = 0
        self.ledger = CostLedger()
        self._completions: dict[str, tuple[list[int], list[int]]] = {m: ([], []) for m in trace.models}
        self._dropped: set[int] = set()
        self._requests: list[SimRequest | None] = [None] * len(trace)
        self._model_of = trace.model_of()
        self._needs_load = getattr(router, "reads_load", True)
        self._changes: list[tuple[float, int, str]] = []
        self._short_since: dict[str, float] = {}
        self._short_now: dict[str, int] = {}
        self._pending_timeline: dict[str, list[int]] = {}
        self._assignments: list[tuple[int, str, float]] = []
        self._marks: dict[str, float] = {}
        # Flow-controlled routers (routers.OursFlowRouter, UtilizationFlowRouter) hold requests at the
        # pool: the pending queue is their FIFO, retried on replica iterations (_RETRY), ticks and readiness.
        self._flow = bool(getattr(router, "flow_controlled", False))
        self._retry_at: dict[str, float] = {}
        # Routers that size by the capacity model (weighted: spill targets; flow-*: the gate) read
        # each variant's SLO concurrency from the problem once, here.
        if hasattr(router, "bind"):
            router.bind(problem)

    # ----- helpers -----
    def _push(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _advance(self, rep: HostedReplica, t: float) -> None:
        events = rep.engine.advance(t)
        if events:
            self._handle(rep, events)

    def _handle(self, rep: HostedReplica, events) -> None:
        model = rep.model
        for ev in events:
            r = ev.request
            kind = ev.kind
            if kind is EventKind.FINISHED:
                rep.completed += 1
                rep.finished += 1
                targets = self._slo_targets.get(model)
                if targets is not None:
                    itl = r.itl_s
                    if r.ttft_s > targets[0] or (itl == itl and itl > targets[1]):
                        rep.slo_misses += 1
                rep.tokens += r.output_tokens if rep.engine.role is Role.DECODE else r.input_tokens + r.output_tokens
                rep.last_event_s = ev.time_s
                ins, outs = self._completions[model]
                ins.append(r.input_tokens)
                outs.append(r.output_tokens)
            elif kind is EventKind.HANDOFF:
                rep.completed += 1
                rep.tokens += r.input_tokens
                rep.last_event_s = ev.time_s
                transfer = r.input_tokens * self._kv_bytes[model] / self._kv_bw
                self._push(ev.time_s + transfer, _KV_ARRIVAL, r)
            elif kind is EventKind.REJECTED:
                self._reroute_rejected(rep, r, ev.time_s)
        if rep.draining and rep.removed_s is None and rep.engine.is_idle:
            self._remove(rep, max(rep.last_event_s, rep.draining_since))

    def _schedule(self, rep: HostedReplica) -> None:
        if rep.lazy:
            return
        nxt = rep.engine.next_event_time()
        if nxt is not None and nxt != rep.scheduled_s:
            rep.scheduled_s = nxt
            self._push(nxt, _P_ITER, rep)

    def _pool_key(self, model: str, decode: bool) -> str:
        return f"{model}/{'decode' if decode else 'entry'}"

    def _route(self, r: SimRequest, model: str, t: float, decode: bool) -> bool:
        pool = (self._decode_pool if decode else self._entry_pool)[model]
        if self._flow:
            return self._hold(r, model, t, decode)
        if self._needs_load:
            for rep in tuple(pool):  # advancing may remove a drained replica from the pool
                if rep.lazy:
                    self._advance(rep, t)
        rep = self.router.pick(self._pool_key(model, decode), pool, r.input_tokens)
        if rep is None:
            self._pending.setdefault(self._pool_key(model, decode), deque()).append((r, t))
            return False
        if rep.draining:
            raise RuntimeError(f"router {self.router.name} picked replica {rep.id}, which is marked for removal")
        if not self._needs_load or not rep.lazy:
            self._advance(rep, t)
        self._admit(rep, r, t)
        return True

    def _admit(self, rep: HostedReplica, r: SimRequest, t: float) -> None:
        if self.options.record_assignments:
            self._assignments.append((r.id, rep.id, t))
        rep.engine.admit(r, t)
        self._advance(rep, t)  # collects what admission produced (a rejection, a one-token answer)
        self._schedule(rep)

    # ----- flow control (routers with `flow_controlled`) -----
    def _hold(self, r: SimRequest, model: str, t: float, decode: bool) -> bool:
        """Queue the request behind those already held for its pool (FIFO), then dispatch what the router
        lets through. Over the router's bound the request is dropped. True when it was dispatched."""
        key = self._pool_key(model, decode)
        if len(self._pending.get(key, ())) >= self.router.max_held_requests:
            self._dispatch_held(model, t, decode)  # the head may leave now, making room
        queue = self._pending.setdefault(key, deque())
        if len(queue) >= self.router.max_held_requests:
            self._dropped.add(r.id)
            return False
        queue.append((r, t))
        self._dispatch_held(model, t, decode)
        return not any(held is r for held, _ in self._pending.get(key, ()))

    def _dispatch_held(self, model: str, t: float, decode: bool) -> None:
        """Dispatch held requests in arrival order while the router accepts them; expire the timed-out."""
        key = self._pool_key(model, decode)
        queue = self._pending.get(key)
        if not queue:
            self._pending.pop(key, None)
            return
        pool = (self._decode_pool if decode else self._entry_pool)[model]
        for rep in tuple(pool):
            if rep.lazy:
                self._advance(rep, t)
        for _ in range(len(queue)):
            r, since = queue[0]
            if t - since > self.options.pending_timeout_s:
                queue.popleft()
                self._dropped.add(r.id)
                continue
            rep = self.router.pick(key, pool, r.input_tokens)
            if rep is None:
                break
            if rep.draining:
                raise RuntimeError(f"router {self.router.name} picked replica {rep.id}, which is marked for removal")
            queue.popleft()
            self._admit(rep, r, t)
        if not queue:
            del self._pending[key]
            return
        nxt = [n for rep in pool if not rep.draining and (n := rep.engine.next_event_time()) is not None]
        if not nxt:
            return  # no replica of the pool is up or busy: readiness or the next tick retries
        when = max(min(nxt), t + FLOW_RETRY_MIN_S)
        due = self._retry_at.get(key)
        if due is not None and t <= due <= when:
            return
        self._retry_at[key] = when
        self._push(when, _RETRY, (model, decode))

    def _reroute_rejected(self, rep: HostedReplica, r: SimRequest, t: float) -> None:
        """The request can never fit that replica's KV cache: try the largest live one, else drop."""
        decode = rep.engine.role is Role.DECODE
        pool = (self._decode_pool if decode else self._entry_pool)[rep.model]
        need = r.input_tokens + (1 if rep.engine.role is Role.PREFILL else r.output_tokens)
        fits = [p for p in pool if not p.draining and p.engine.kv_capacity_tokens >= need]
        if not fits:
            self._dropped.add(r.id)
            return
        r.rejected = False
        target = min(fits, key=lambda p: (p.outstanding, p.index))
        self._advance(target, t)
        if self.options.record_assignments:
            self._assignments.append((r.id, target.id, t))
        target.engine.admit(r, t)
        self._advance(target, t)
        self._schedule(target)

    # ----- lifecycle -----
    def _used_accelerators(self, accelerator: str) -> int:
        used = 0
        for name, reps in self.replicas.items():
            v = self.variants[name]
            if v.accelerator == accelerator:
                used += v.accelerators_per_replica * sum(1 for r in reps if r.removed_s is None)
        return used

    def _create(self, v: Variant, t: float, warm: bool) -> HostedReplica:
        self._serial += 1
        rid = f"{v.name}-{self._serial}"
        engine = Replica(rid, v.profile, max_batch=v.max_batch, kv_capacity_tokens=self._kv_tokens[v.name],
                         role=v.role, variant=v.name)
        rep = HostedReplica(rid, v, engine, t, self._serial)
        self.replicas[v.name].append(rep)
        cost = self.problem.variant_cost_per_hour(v)
        self.ledger.open(rid, v.name, v.accelerator, v.accelerators_per_replica, cost, t)
        if warm:
            self._make_ready(rep, t)
        else:
            delay = self.options.cold_start.seconds(v.accelerator, self._weight_gb[v.model])
            self._push(t + delay, _READY, rep)
        return rep

    def _make_ready(self, rep: HostedReplica, t: float) -> None:
        if rep.removed_s is not None:
            return
        rep.ready_s = t
        rep.engine.now = t
        self.ledger.ready(rep.id, t)
        decode = rep.engine.role is Role.DECODE
        pools = self._decode_pool if decode else self._entry_pool
        if rep.model in pools:
            pools[rep.model].append(rep)
        if self._flow:
            self._dispatch_held(rep.model, t, decode)
            return
        waiting = self._pending.pop(self._pool_key(rep.model, decode), None)
        for r, since in waiting or ():
            if t - since > self.options.pending_timeout_s:
                self._dropped.add(r.id)
            else:
                self._route(r, rep.model, t, decode)

    def _remove(self, rep: HostedReplica, t: float) -> None:
        rep.removed_s = t
        self.ledger.close(rep.id, t)
        for pools in (self._entry_pool, self._decode_pool):
            pool = pools.get(rep.model)
            if pool is not None and rep in pool:
                pool.remove(rep)

    def _mark_draining(self, rep: HostedReplica, t: float) -> None:
        rep.draining = True
        rep.draining_since = t
        self._marks[rep.id] = t
        if rep.lazy:
            self._advance(rep, t)
        if rep.engine.is_idle and rep.removed_s is None:
            self._remove(rep, t)

    def _apply(self, decision: Decision, t: float, warm: bool) -> None:
        self.router.set_guidance(decision.routing, decision.desired_replicas)
        wanted: dict[str, int] = {}
        for name, desired in sorted(decision.desired_replicas.items()):
            v = self.variants.get(name)
            if v is None:
                raise ValueError(f"policy {self.policy.name} asked for unknown variant {name!r}")
            if v.model not in self._entry_pool:
                continue
            if v.max_replicas is not None:
                desired = min(desired, v.max_replicas)
            wanted[name] = max(desired, v.min_replicas)
        growing = []
        for name, desired in wanted.items():
            live = [r for r in self.replicas[name] if r.removed_s is None and not r.draining]
            if desired > len(live):
                growing.append((name, desired - len(live)))
            else:
                self._short_since.pop(name, None)
                self._short_now.pop(name, None)
                if desired < len(live):
                    self._shrink(name, live, len(live) - desired, t)
        growing.sort(key=lambda item: (self._short_since.get(item[0], t), item[0]))
        for name, need in growing:
            v = self.variants[name]
            add = need
            limit = self._inventory.get(v.accelerator)
            if limit is not None:
                free = limit - self._used_accelerators(v.accelerator)
                add = min(add, max(0, free // v.accelerators_per_replica))
            for _ in range(add):
                self._create(v, t, warm)
            if add and not warm:
                self._changes.append((t, add, name))
            if add < need:
                self._short_since.setdefault(name, t)
                self._short_now[name] = need - add
            else:
                self._short_since.pop(name, None)
                self._short_now.pop(name, None)

    def _shrink(self, name: str, live: list[HostedReplica], drop: int, t: float) -> None:
        """Remove `drop` replicas: those still starting first (newest first), then the router's victims."""
        removed = drop
        starting = sorted((r for r in live if r.ready_s is None), key=lambda r: -r.created_s)
        for rep in starting[:drop]:
            self._remove(rep, t)
        drop -= min(drop, len(starting))
        ready = [r for r in live if r.ready_s is not None]
        for lazy_rep in ready:
            if lazy_rep.lazy:
                self._advance(lazy_rep, t)
        for rep in self.router.victims(ready, drop):
            self._mark_draining(rep, t)
        self._changes.append((t, removed, name))

    # ----- observation -----
    def _observe(self, t: float, prev_t: float, arrivals_from: int, arrivals_to: int) -> Observation:
        reps = []
        for name, lst in self.replicas.items():
            keep = []
            for rep in lst:
                if rep.removed_s is not None:
                    continue
                keep.append(rep)
                if rep.ready_s is None:
                    state = ReplicaState.STARTING
                else:
                    state = ReplicaState.DRAINING if rep.draining else ReplicaState.READY
                eng = rep.engine
                reps.append(ReplicaObservation.model_construct(
                    name=rep.id, variant=name, state=state, queue_len=eng.queue_len, running=eng.running_len,
                    kv_usage=eng.kv_usage, busy_s=eng.busy_time_s(t), completed=rep.completed, tokens=rep.tokens,
                    finished=rep.finished, slo_misses=rep.slo_misses,
                ))
            self.replicas[name] = keep
        tr = self.trace
        arrivals, completions = [], []
        mi = self._model_of[arrivals_from:arrivals_to]
        times = tr.arrival_s[arrivals_from:arrivals_to]
        ins = tr.input_tokens[arrivals_from:arrivals_to]
        for k, model in enumerate(tr.models):
            sel = mi == k
            arrivals.append(ArrivalSample.model_construct(
                model=model, times_s=times[sel].tolist(), input_tokens=ins[sel].tolist()))
            c_in, c_out = self._completions[model]
            completions.append(CompletionSample.model_construct(model=model, input_tokens=c_in, output_tokens=c_out))
            self._completions[model] = ([], [])
        return Observation.model_construct(time_s=t, interval_s=max(t - prev_t, 1e-9), replicas=reps,
                                           arrivals=arrivals, completions=completions)

    def _record_timeline(self, t: float, timeline_s: list[float], timeline: dict) -> None:
        timeline_s.append(t)
        for name in self.replicas:
            self._pending_timeline.setdefault(name, []).append(self._short_now.get(name, 0))
        for name, lst in self.replicas.items():
            ready = starting = draining = 0
            for r in lst:
                if r.removed_s is not None:
                    continue
                if r.ready_s is None:
                    starting += 1
                elif r.draining:
                    draining += 1
                else:
                    ready += 1
            timeline.setdefault(name, []).append((ready, starting, draining))

    def _expire_pending(self, t: float) -> None:
        for key, queue in list(self._pending.items()):
            while queue and t - queue[0][1] > self.options.pending_timeout_s:
                r, _ = queue.popleft()
                self._dropped.add(r.id)
            if not queue:
                del self._pending[key]

    # ----- main loop -----
    def run(self) -> RunResult:
        wall0 = time.perf_counter()
        tr = self.trace
        n = len(tr)
        arr = tr.arrival_s
        ins = tr.input_tokens.tolist()
        outs = tr.output_tokens.tolist()
        arr_list = arr.tolist()
        models = tr.models
        model_of = self._model_of.tolist()
        end_s = tr.duration_s
        interval = float(self.policy.interval_s)
        timeline_s: list[float] = []
        timeline: dict[str, list[tuple[int, int, int]]] = {}
        decisions: list[tuple[float, dict[str, int], str]] = []

        first = self.policy.decide(self._observe(0.0, -interval, 0, 0))
        self._apply(first, 0.0, warm=True)
        decisions.append((0.0, dict(first.desired_replicas), first.note))
        self._record_timeline(0.0, timeline_s, timeline)
        self._push(interval, _TICK, 0.0)

        i = 0
        arrivals_seen = 0
        heap = self._heap
        max_events = 50 * (n + 10) + 10 * int(end_s / interval + 10)
        if self._flow:  # each held pool retries at most every FLOW_RETRY_MIN_S
            max_events += 2 * len(models) * int((end_s + 10 * interval) / FLOW_RETRY_MIN_S)
        for _ in range(max_events):
            next_arrival = arr_list[i] if i < n else math.inf
            if heap and heap[0][0] <= next_arrival:
                t, _, kind, payload = heapq.heappop(heap)
                if kind == _TICK:
                    if t > end_s and i >= n:
                        continue
                    self._expire_pending(t)
                    for lst in self.replicas.values():
                        for rep in lst:
                            if rep.lazy and rep.removed_s is None and rep.ready_s is not None:
                                self._advance(rep, t)
                    obs = self._observe(t, payload, arrivals_seen, i)
                    arrivals_seen = i
                    decision = self.policy.decide(obs)
                    self._apply(decision, t, warm=False)
                    if self._flow:
                        for key in list(self._pending):
                            model, stage = key.rsplit("/", 1)
                            self._dispatch_held(model, t, stage == "decode")
                    decisions.append((t, dict(decision.desired_replicas), decision.note))
                    self._record_timeline(t, timeline_s, timeline)
                    if t + interval <= end_s + interval:
                        self._push(t + interval, _TICK, t)
                elif kind == _RETRY:
                    model, decode = payload
                    key = self._pool_key(model, decode)
                    if self._retry_at.get(key) != t:
                        continue
                    del self._retry_at[key]
                    self._dispatch_held(model, t, decode)
                elif kind == _READY:
                    self._make_ready(payload, t)
                elif kind == _P_ITER:
                    rep = payload
                    if rep.scheduled_s != t or rep.removed_s is not None:
                        continue
                    rep.scheduled_s = None
                    self._handle(rep, rep.engine.advance(t))
                    self._schedule(rep)
                else:
                    r = payload
                    self._route(r, models[model_of[r.id]], t, decode=True)
                continue
            if i >= n:
                break
            t = next_arrival
            r = SimRequest(i, t, ins[i], outs[i])
            self._requests[i] = r
            self._route(r, models[model_of[i]], t, decode=False)
            i += 1
        else:
            raise RuntimeError("event budget exhausted: the simulation did not terminate")

        self._drain_all()
        return self._result(end_s, timeline_s, timeline, decisions, time.perf_counter() - wall0)

    def _drain_all(self) -> None:
        """Finish every admitted request once the event heap is empty (bounded: each step makes progress).

        By then P replicas are idle and every KV hand-off has reached a D replica; only the lazily
        advanced PD and D replicas still hold work, and nothing they do creates new events.
        """
        for queue in self._pending.values():
            for r, _ in queue:
                self._dropped.add(r.id)
        self._pending.clear()
        budget = 4 * (len(self.trace) + int(self.trace.output_tokens.sum())) + 16
        for lst in self.replicas.values():
            for rep in lst:
                if rep.removed_s is not None:
                    continue
                for _ in range(budget):
                    nxt = rep.engine.next_event_time()
                    if nxt is None:
                        break
                    self._handle(rep, rep.engine.advance(nxt))

    def _result(self, end_s, timeline_s, timeline, decisions, wall_s) -> RunResult:
        reqs = self._requests
        n = len(reqs)
        first = np.full(n, np.nan)
        done = np.full(n, np.nan)
        for k, r in enumerate(reqs):
            if r is not None:
                first[k] = r.first_token_s
                done[k] = r.completion_s
        dropped = np.zeros(n, dtype=bool)
        if self._dropped:
            dropped[np.fromiter(self._dropped, dtype=np.int64)] = True
        first[dropped] = np.nan
        done[dropped] = np.nan
        warm = self.options.warmup_s
        return RunResult(
            policy=self.policy.name, router=getattr(self.router, "name", type(self.router).__name__),
            trace_name=self.trace.name, models=self.trace.models,
            arrival_s=self.trace.arrival_s, first_token_s=first, completion_s=done,
            input_tokens=self.trace.input_tokens, output_tokens=self.trace.output_tokens,
            model_index=self._model_of, dropped=dropped, ledger=self.ledger,
            start_s=min(warm, end_s), end_s=end_s, timeline_s=timeline_s, timeline=timeline,
            changes=self._changes, pending_timeline=self._pending_timeline,
            variant_models={name: v.model for name, v in self.variants.items()}, decisions=decisions, assignments=self._assignments,
            draining_marks=dict(self._marks), wall_s=wall_s, scored=self.trace.arrival_s >= warm,
        )


def simulate(problem: Problem, trace: Trace, policy: Policy, router, options: ClusterOptions | None = None) -> RunResult:
    """Run one policy with one router over one trace on the fleet of `problem`."""
    return ClusterSimulator(problem, trace, policy, router, options).run()
