"""Request routers that know about scale-down (the Vidur autoscaling lab's point).

A router that keeps sending work to a replica the autoscaler wants gone keeps it alive (it never
empties) or makes its requests fail. So every router here skips replicas marked for removal, and
each also decides *which* replicas a scale-down marks: an idle one leaves at once and costs nothing
to remove, so idle replicas always go first.

Routers see replicas through a tiny protocol (`RoutableReplica`): the cluster simulator and a
real gateway can both provide it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from optimizer.simulation.policy import RouteGuidance


class RoutableReplica(Protocol):
    id: str
    variant: str
    draining: bool
    created_s: float

    @property
    def outstanding(self) -> int: ...


def _idle_first(replicas: Sequence[RoutableReplica], count: int, key) -> list[RoutableReplica]:
    live = [r for r in replicas if not r.draining]
    idle = [r for r in live if r.outstanding == 0]
    busy = sorted((r for r in live if r.outstanding > 0), key=key)
    return (idle + busy)[: max(0, count)]



def slo_concurrency(problem) -> dict[str, int]:
    """Per variant: requests one replica holds in flight at its SLO capacity (see `OursFlowRouter`)."""
    from optimizer.capacity import capacity_table

    table = capacity_table(problem)
    out = {}
    for v in problem.variants:
        workload = problem.workload(v.model)
        rate_inv = held = 0.0
        for b in workload.buckets if workload is not None else ():
            est = table.get((v.name, b.label))
            if est is None or est.max_rate_rps <= 0:
                continue
            latency_s = est.e2e_s if est.e2e_s is not None else est.ttft_s
            if latency_s is None:
                continue
            rate_inv += b.share / est.max_rate_rps
            held += b.share * latency_s
        out[v.name] = max(1, int(held / rate_inv)) if rate_inv > 0 else max(1, v.max_batch)
    return out

class RoundRobinRouter:
    """Cycles over the live replicas of a pool; on scale-down removes idle ones, then the newest."""

    name = "round-robin"
    reads_load = False

    def __init__(self):
        self._next: dict[str, int] = {}

    def pick(self, pool_key: str, pool: Sequence[RoutableReplica], input_tokens: int = 0):
        n = len(pool)
        start = self._next.get(pool_key, 0)
        for i in range(n):
            replica = pool[(start + i) % n]
            if not replica.draining:
                self._next[pool_key] = (start + i + 1) % n
                return replica
        return None

    def victims(self, replicas: Sequence[RoutableReplica], count: int) -> list[RoutableReplica]:
        return _idle_first(replicas, count, key=lambda r: -r.created_s)

    def set_guidance(self, routing: list[RouteGuidance], planned_replicas: dict[str, int] | None = None) -> None:
        """Round-robin ignores optimizer guidance."""


class LeastOutstandingRouter:
    """Sends each request to the live replica with the fewest outstanding requests.

    On scale-down it marks idle replicas first and, when none is idle, the one with the fewest
    outstanding requests: it drains soonest, so the cluster stops paying for it soonest.
    Ties go round-robin, so equally loaded replicas share the work.
    """

    name = "least-outstanding"
    reads_load = True

    def __init__(self):
        self._next: dict[str, int] = {}

    def pick(self, pool_key: str, pool: Sequence[RoutableReplica], input_tokens: int = 0):
        n = len(pool)
        if n == 0:
            return None
        start = self._next.get(pool_key, 0) % n
        best, best_load, best_i = None, None, 0
        for i in range(n):
            replica = pool[(start + i) % n]
            if replica.draining:
                continue
            load = replica.outstanding
            if best_load is None or load < best_load:
                best, best_load, best_i = replica, load, i
                if load == 0:
                    break
        if best is not None:
            self._next[pool_key] = (start + best_i + 1) % n
        return best

    def victims(self, replicas: Sequence[RoutableReplica], count: int) -> list[RoutableReplica]:
        return _idle_first(replicas, count, key=lambda r: (r.outstanding, -r.created_s))

    def set_guidance(self, routing: list[RouteGuidance], planned_replicas: dict[str, int] | None = None) -> None:
        """Least-outstanding ignores optimizer guidance."""


SPILL_RATIO = 2.0
SPILL_SLACK = 16
"""Outstanding requests the weighted router tolerates above the least loaded eligible replica."""


class WeightedRouter:
    """Follows the optimizer's per-bucket routing weights across variants, least-outstanding within one.

    The optimizer decides what share of each prompt-length bucket each variant should serve (cheap
    accelerators for short prompts, fast ones for long ones); this router realises those shares
    with smooth weighted round-robin (deterministic, no long runs on one variant). The shares were
    planned for the replicas the optimizer asked for; while some of them are still starting, a
    variant's weight is scaled by live / planned replicas and the rest renormalised, so the one
    replica that is up does not take the load meant for six. With no guidance for a request it
    falls back to least-outstanding over the whole pool.

    Shares are a plan, and a plan can be wrong: a request the picked replica would queue (it has
    requests waiting for a batch slot or KV) goes to an allowed replica with none waiting; and when
    the replica they pick holds more than
    `SPILL_RATIO` times the outstanding requests of the least loaded replica allowed for the
    bucket (plus `SPILL_SLACK`), the request goes to that one instead. Without this bound one H100
    took a share sized by an optimistic capacity estimate, ran 254 requests with 100 waiting while
    four A100 replicas ran 11 each, and missed a third of its requests (the 8B Azure hour at 4x).
    A replica takes spilled requests only while it holds fewer than its SLO concurrency
    (`slo_concurrency`: what it holds in flight at its SLO capacity, from the capacity model, once
    the cluster binds the router to its problem): an H100 runs 30 requests within the SLO where an L4
    misses with 8, and spilling the H100's queue onto L4 and T4 replicas planned for 1-2 % of a
    bucket made them miss 45-75 % of what they got (the default demo's 8B, minutes 9-13). Counting
    load per unit of planned share instead stopped that, but also stopped the spill from the 70B's
    H100 prefill replicas onto A100 PD replicas with room at the Azure hour's peak (99.08 -> 95.9 %).
    """

    name = "weighted"
    reads_load = True

    def __init__(self):
        self._inner = LeastOutstandingRouter()
        self._rules: dict[str, list[RouteGuidance]] = {}
        self._credit: dict[tuple[str, int], dict[str, float]] = {}
        self._planned: dict[str, int] = {}
        self._concurrency: dict[str, int] = {}

    def bind(self, problem) -> None:
        """The cluster simulator passes its problem before the run: spill targets need room at the SLO."""
        self._concurrency = slo_concurrency(problem)

    def set_concurrency(self, concurrency: dict[str, int]) -> None:
        """SLO concurrency per variant set directly (a hand-built pool has no problem to bind)."""
        self._concurrency = {v: max(1, int(c)) for v, c in concurrency.items()}

    def set_guidance(self, routing: list[RouteGuidance], planned_replicas: dict[str, int] | None = None) -> None:
        self._planned = dict(planned_replicas or {})
        rules: dict[str, list[RouteGuidance]] = {}
        for rule in routing:
            key = f"{rule.model}/{'decode' if rule.stage == 'D' else 'entry'}"
            rules.setdefault(key, []).append(rule)
        self._rules = rules
        self._credit = {}

    def _weights(self, pool_key: str, input_tokens: int) -> tuple[int, dict[str, float]]:
        merged: dict[str, float] = {}
        bucket = -1
        for i, rule in enumerate(self._rules.get(pool_key, ())):
            if rule.covers(input_tokens):
                bucket = i if bucket < 0 else bucket
                for variant, w in rule.weights.items():
                    merged[variant] = merged.get(variant, 0.0) + w
        return bucket, merged

    def pick(self, pool_key: str, pool: Sequence[RoutableReplica], input_tokens: int = 0):
        bucket, weights = self._weights(pool_key, input_tokens)
        if weights:
            by_variant: dict[str, list[RoutableReplica]] = {}
            for r in pool:
                if not r.draining and weights.get(r.variant, 0.0) > 0:
                    by_variant.setdefault(r.variant, []).append(r)
            if by_variant:
                credit = self._credit.setdefault((pool_key, bucket), {})
                live = {}
                for v, reps in by_variant.items():
                    planned = self._planned.get(v, 0)
                    live[v] = weights[v] * (min(1.0, len(reps) / planned) if planned > 0 else 1.0)
                total = sum(live.values())
                for v in by_variant:
                    credit[v] = credit.get(v, 0.0) + live[v]
                chosen = max(sorted(by_variant), key=lambda v: credit[v])
                credit[chosen] -= total
                pick = self._inner.pick(f"{pool_key}/{chosen}", by_variant[chosen], input_tokens)
                return self._bounded(pick, by_variant)
        return self._inner.pick(pool_key, pool, input_tokens)

    def _has_room(self, replica) -> bool:
        limit = self._concurrency.get(replica.variant)
        return limit is None or replica.outstanding < limit

    def _bounded(self, pick, by_variant: dict[str, list]):
        """The plan's pick, unless it would queue the request while another replica allowed for the
        bucket would start it now, or run far ahead of the least loaded of them. Only replicas the
        plan allows for the bucket, and only while they are below their SLO concurrency: spilling a
        long prompt onto a replica planned for short ones (a PD replica beside P/D pairs, a small
        GPU), or onto one already as full as the SLO allows, trades a queue for an SLO miss."""
        if pick is None:
            return None
        eligible = [r for reps in by_variant.values() for r in reps if r is pick or self._has_room(r)]
        if getattr(pick, "waiting", 0) > 0:
            idle = [r for r in eligible if getattr(r, "waiting", 0) == 0]
            if idle:
                return min(idle, key=lambda r: (r.outstanding, getattr(r, "index", 0)))
        if pick.outstanding > SPILL_SLACK:
            least = min(eligible, key=lambda r: r.outstanding)
            if pick.outstanding > SPILL_RATIO * least.outstanding + SPILL_SLACK:
                return least
        return pick

    def victims(self, replicas: Sequence[RoutableReplica], count: int) -> list[RoutableReplica]:
        return self._inner.victims(replicas, count)


MAX_HELD_REQUESTS = 4096
"""Requests a flow-controlled router holds per pool; the next one is dropped (llm-d's flow control
also bounds its queues and rejects beyond them)."""


class _FlowControlled:
    """Shared part of the flow-controlled routers: a pool-level saturation gate in front of dispatch.

    The cluster simulator asks `pick` as usual; a pool at saturation >= 1.0 gets None, and the
    cluster keeps the request in the pool's FIFO queue (at most `max_held_requests`), retrying the
    head of the queue when a replica of the pool finishes an iteration, at each policy tick and when
    a replica becomes ready, and dropping it after the cluster's pending timeout. Saturation is
    computed on every call from the replicas' in-flight state, never once per control cycle: a
    per-cycle value >= 1.0 would stop dispatch for a whole cycle.
    """

    reads_load = True
    flow_controlled = True

    def __init__(self, max_held_requests: int = MAX_HELD_REQUESTS):
        if max_held_requests < 1:
            raise ValueError(f"max_held_requests must be at least 1, got {max_held_requests}")
        self.max_held_requests = max_held_requests
        self._inner = LeastOutstandingRouter()

    def bind(self, problem) -> None:
        """The cluster simulator passes its problem (fleet, workloads, SLOs) before the run."""

    def saturation(self, pool: Sequence[RoutableReplica]) -> float:
        raise NotImplementedError

    def victims(self, replicas: Sequence[RoutableReplica], count: int) -> list[RoutableReplica]:
        return self._inner.victims(replicas, count)

    def set_guidance(self, routing: list[RouteGuidance], planned_replicas: dict[str, int] | None = None) -> None:
        """Only the flow-controlled router that follows our guidance uses it (it overrides this)."""


class UtilizationFlowRouter(_FlowControlled):
    """llm-d's default saturation detector in front of least-outstanding dispatch.

    Saturation of a pool = mean over its endpoints of max(waiting / 5, KV usage / 0.8), an endpoint
    with stale metrics counting as 1.0 (`stale` attribute; the simulator's metrics are never stale);
    requests are held while it is >= 1.0. Dispatch is least-outstanding, the closest of our routers
    to llm-d's default queue and KV-utilisation scorers. Draining replicas are no endpoints.
    """

    name = "flow-utilization"
    QUEUE_DEPTH_THRESHOLD = 5.0
    KV_CACHE_UTIL_THRESHOLD = 0.8

    def saturation(self, pool: Sequence[RoutableReplica]) -> float:
        live = [r for r in pool if not r.draining]
        if not live:
            return 1.0
        total = 0.0
        for r in live:
            if getattr(r, "stale", False):
                total += 1.0
                continue
            total += max(getattr(r, "waiting", 0) / self.QUEUE_DEPTH_THRESHOLD,
                         getattr(r, "kv_usage", 0.0) / self.KV_CACHE_UTIL_THRESHOLD)
        return total / len(live)

    def pick(self, pool_key: str, pool: Sequence[RoutableReplica], input_tokens: int = 0):
        if self.saturation(pool) >= 1.0:
            return None
        return self._inner.pick(pool_key, pool, input_tokens)


class OursFlowRouter(_FlowControlled):
    """Flow control on our saturation, dispatch by our routing weights.

    Saturation of a pool = outstanding requests on its ready replicas / the sum of their SLO
    concurrency. A replica's SLO concurrency comes from the capacity model by Little's law: for a
    bucket b alone it sustains max_rate_rps R_b at the SLO, where a request stays L_b (the
    estimate's latency at that rate: E2E, or TTFT for a prefill-only replica, whose requests leave
    after their first token); for the model's bucket mix (shares f_b) the replica sustains
    R = 1 / sum(f_b / R_b) and holds C = R x sum(f_b x L_b) requests. So 1.0 means "as many requests
    in flight as the replica holds at its SLO capacity", the meaning of the saturation the operator
    publishes (demand / capacity at SLO), but measured per dispatch from in-flight state. L_b is the
    latency at the SLO percentile, not the mean, so C is an upper bound of the mean in flight at
    capacity: the gate errs towards dispatching. (The mean decode batch `batch_at_max` is no
    substitute: for a prefill replica it is the mean prefill batch, below 1, and would admit one
    request at a time.) Buckets a replica cannot serve at the SLO (R_b = 0) are left out of its mix;
    with no estimate at all C is the variant's max_batch.

    While the pool is below 1.0 a request goes where the policy's weights send it (`WeightedRouter`),
    among the replicas still below their own concurrency (floor of C, at least 1), so no dispatch
    puts a replica above it; if none of the replicas the weights allow has room, the least loaded
    replica with room takes it (the weighted router's own fallback).
    """

    name = "flow-ours"

    def __init__(self, max_held_requests: int = MAX_HELD_REQUESTS):
        super().__init__(max_held_requests)
        self._weighted = WeightedRouter()
        self._concurrency: dict[str, int] = {}

    def bind(self, problem) -> None:
        self._concurrency.update(slo_concurrency(problem))

    def set_concurrency(self, concurrency: dict[str, int]) -> None:
        """SLO concurrency per variant set directly (a hand-built pool has no problem to bind)."""
        self._concurrency = {v: max(1, int(c)) for v, c in concurrency.items()}

    def concurrency(self, replica: RoutableReplica) -> int:
        if replica.variant not in self._concurrency:
            raise ValueError(f"no SLO concurrency for variant {replica.variant!r}: bind the router first")
        return self._concurrency[replica.variant]

    def saturation(self, pool: Sequence[RoutableReplica]) -> float:
        live = [r for r in pool if not r.draining]
        capacity = sum(self.concurrency(r) for r in live)
        if capacity == 0:
            return 1.0
        return sum(r.outstanding for r in live) / capacity

    def set_guidance(self, routing: list[RouteGuidance], planned_replicas: dict[str, int] | None = None) -> None:
        self._weighted.set_guidance(routing, planned_replicas)

    def pick(self, pool_key: str, pool: Sequence[RoutableReplica], input_tokens: int = 0):
        if self.saturation(pool) >= 1.0:
            return None
        room = [r for r in pool if not r.draining and r.outstanding < self.concurrency(r)]
        if not room:
            return None
        return self._weighted.pick(pool_key, room, input_tokens)


ROUTERS = {cls.name: cls for cls in (RoundRobinRouter, LeastOutstandingRouter, WeightedRouter,
                                     UtilizationFlowRouter, OursFlowRouter)}


def make_router(name: str):
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r} (known: {sorted(ROUTERS)})")
    return ROUTERS[name]()
