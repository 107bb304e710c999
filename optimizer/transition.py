"""Plan one safe step from the replicas a cluster runs now toward the replicas the optimizer wants.

Why a separate planner: the allocation is an end state; getting there carelessly drops requests.
Moving from 2 x H100 to 4 x L4 by writing both numbers at once removes the H100 capacity before
the L4 replicas have loaded their weights, and a blip in Prometheus must not scale a service to
zero. Each cycle this planner moves every variant one step, under these rules, in this order:

1. Bounds. The optimizer's desire is clamped to [minReplicas, maxReplicas]; the bounds are hard:
   no other rule may cross them.
2. Missing metrics hold. A variant whose metrics are unavailable keeps its replicas (raised to its
   minimum if below, or to a desire planned on the model's last measured demand when
   `demand_carried`): no scale-down at all, and each held cycle is recorded as a recommendation at
   the held size, so the scale-down window is full of it when metrics return. The first readings
   after such a gap are rates over a window that spans it (too low): they may scale up but not
   down until `fresh_data_window_s` (the collector's rate window) of fresh data exists.
3. Stabilization, as the Kubernetes HPA does it: every recommendation is remembered; the variant
   scales up to the *lowest* recommendation of the scale-up window and down to the *highest* of the
   scale-down window, so one quiet minute does not undo the capacity a busy one needed. A variant
   seen for the first time counts its current replicas as a recommendation, so an operator restart
   does not skip the scale-down window.
   A variant's own `scale_up` / `scale_down` rules (the HPA's spec.behavior) replace the global
   windows for it.
4. Rate policies (per variant, the HPA's spec.behavior policies): over each policy's period, a
   `Pods` policy allows `value` replicas of change and a `Percent` policy `value` % of the replicas
   the variant had when the period began (scale-up rounds up, scale-down down, as the HPA);
   `select_policy` Max takes the policy allowing the largest change, Min the smallest, Disabled
   forbids that direction. The changes this planner wrote are remembered for the longest period.
   Then max change per cycle, both ways.
5. Inventory. Scale-ups are granted only from accelerators that no pod holds: occupied is
   max(replicas asked for, pods that exist), so pending pods and pods still terminating count.
   Variants below their minimum are served first, then the others in the order given.
6. Make-before-break. Variants in the same group (the same model, any role: a prefill/decode pair
   can stand in for a "both" variant and the reverse) scale down only when no other variant of the
   group has replicas that are not ready yet or still wants more than it got. The one exception breaks a deadlock: when the group's growth is
   blocked only by inventory of the very accelerator the shrinking variant holds and nothing in the
   group is pending, the shrinking variant steps down one replica at a time (a rolling swap).
7. Drain only when a replacement exists. When the optimizer's allocation leaves part of a model's
   demand unserved (`demand_unserved`: the inventory shrank, even to 0), no *ready* replica of that
   model is removed: there is nothing to take its load, so it keeps serving (its accelerators stay
   held beyond the inventory, like a cordoned node's pods) and the step says so. Replicas that are
   not ready yet may still go, and a lowered maxReplicas applies at once.
8. No half pair. One half of a prefill/decode pair serves nothing: a group's prefill variants get no
   new replicas while none of its decode variants is planned any (the inventory blocked them), and
   the reverse (the simulator's engine holds pairs the same way).

Pure and deterministic: no clock, no I/O; time comes in as `now_s`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Limit = Literal[
    "metrics_unavailable", "metrics_recovering", "stabilization", "max_change", "min_replicas", "max_replicas", "inventory",
    "waiting_for_ready", "rolling_swap", "demand_unserved", "demand_carried", "rate_policy", "pair_incomplete",
]
MAX_STABILIZATION_WINDOW_S = 3600  # the HPA's bounds: stabilizationWindowSeconds <= 3600
MAX_POLICY_PERIOD_S = 1800  # periodSeconds in (0, 1800]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScalingPolicy(_Frozen):
    """One HPA rate policy: at most `value` replicas (Pods) or `value` % (Percent) per `period_s`."""

    type: Literal["Pods", "Percent"]
    value: int = Field(gt=0)
    period_s: float = Field(gt=0, le=MAX_POLICY_PERIOD_S)


class ScalingRules(_Frozen):
    """One direction of the HPA's spec.behavior; None fields fall back to the global policy."""

    stabilization_window_s: float | None = Field(default=None, ge=0, le=MAX_STABILIZATION_WINDOW_S)
    select_policy: Literal["Max", "Min", "Disabled"] = "Max"
    policies: tuple[ScalingPolicy, ...] = ()

    def limit(self, current: int, changes: tuple[tuple[float, int], ...], now_s: float, up: bool) -> int | None:
        """The furthest replicas this direction allows now (None: no policy), as the HPA computes it:
        each policy from the replicas at the start of its period (current minus this direction's
        changes within it)."""
        if self.select_policy == "Disabled":
            return current
        bounds = []
        for pol in self.policies:
            moved = sum(d for t, d in changes if t > now_s - pol.period_s and (d > 0) == up)
            start = current - moved
            if pol.type == "Pods":
                bounds.append(start + pol.value if up else start - pol.value)
            else:
                bounds.append(math.ceil(start * (1 + pol.value / 100)) if up
                              else math.floor(start * (1 - pol.value / 100)))
        if not bounds:
            return None
        widest = max if up else min
        pick = widest if self.select_policy == "Max" else (min if up else max)
        return max(0, pick(bounds))


class VariantState(_Frozen):
    """What the planner knows of one variant this cycle."""

    name: str = Field(min_length=1, description="Unique key, e.g. namespace/name.")
    group: str = Field(min_length=1, description="Variants that can replace each other (the model).")
    role: Literal["both", "prefill", "decode"] = Field(default="both", description="A P/D half, or both.")
    accelerator: str = Field(min_length=1)
    accelerators_per_replica: int = Field(default=1, gt=0)
    current_replicas: int = Field(ge=0, description="Replicas the target asks for now (spec).")
    ready_replicas: int = Field(ge=0)
    pods: int | None = Field(default=None, ge=0, description="Pods that exist, pending and terminating included.")
    desired_replicas: int = Field(ge=0, description="The optimizer's target.")
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int | None = Field(default=None, ge=0)
    metrics_available: bool = True
    demand_carried: bool = Field(default=False, description="No metrics, but desired_replicas was planned on the "
                                                            "model's last measured demand: held, yet may scale up.")
    demand_unserved: bool = Field(default=False, description="The allocation leaves part of this variant's model's "
                                                             "demand unserved: its ready replicas are not drained.")
    scale_up: ScalingRules | None = Field(default=None, description="Per-variant behavior.scaleUp (HPA semantics).")
    scale_down: ScalingRules | None = Field(default=None, description="Per-variant behavior.scaleDown.")

    @model_validator(mode="after")
    def _bounds(self) -> VariantState:
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"{self.name}: min_replicas ({self.min_replicas}) exceeds max_replicas "
                             f"({self.max_replicas})")
        return self

    def clamp(self, replicas: int) -> int:
        replicas = max(replicas, self.min_replicas)
        return replicas if self.max_replicas is None else min(replicas, self.max_replicas)

    @property
    def occupied_replicas(self) -> int:
        return max(self.current_replicas, self.pods if self.pods is not None else 0)


class TransitionPolicy(_Frozen):
    scale_up_window_s: float = Field(default=0.0, ge=0, description="HPA scaleUp stabilizationWindowSeconds.")
    scale_down_window_s: float = Field(default=300.0, ge=0, description="HPA scaleDown stabilizationWindowSeconds.")
    max_change_per_cycle: int | None = Field(default=None, gt=0, description="Most replicas one variant may move per cycle.")
    fresh_data_window_s: float = Field(
        default=0.0, ge=0, description="After a metrics gap, no scale-down until metrics have been back this long "
                                       "(the rate window: earlier rates span the gap).")


class StabilizationHistory(_Frozen):
    """Past recommendations per variant, (time s, replicas), oldest first.

    `first_seen` holds, per variant, the time and the replicas it had when the planner first saw it:
    they count as a scale-down recommendation (never a scale-up one) for one scale-down window.
    """

    recommendations: dict[str, tuple[tuple[float, int], ...]] = Field(default_factory=dict)
    first_seen: dict[str, tuple[float, int]] = Field(default_factory=dict)
    metrics_back_since: dict[str, float | None] = Field(
        default_factory=dict, description="Variants in or just after a metrics gap: None while held, else when "
                                          "metrics returned; dropped once a full fresh-data window has passed.")
    changes: dict[str, tuple[tuple[float, int], ...]] = Field(
        default_factory=dict, description="(time s, replicas written minus current) within the longest rate-policy "
                                          "period, for variants with rate policies.")


class TransitionStep(_Frozen):
    name: str
    current_replicas: int
    ready_replicas: int
    desired_replicas: int
    stabilized_replicas: int = Field(description="After bounds, hold, stabilization and max change.")
    target_replicas: int = Field(description="What to write this cycle.")
    limited_by: tuple[Limit, ...] = ()
    reason: str = Field(description="One sentence for a human.")

    @property
    def direction(self) -> Literal["up", "down", "none"]:
        if self.target_replicas > self.current_replicas:
            return "up"
        return "down" if self.target_replicas < self.current_replicas else "none"


class TransitionPlan(_Frozen):
    steps: tuple[TransitionStep, ...]
    history: StabilizationHistory

    def step(self, name: str) -> TransitionStep:
        return next(s for s in self.steps if s.name == name)

    @property
    def settled(self) -> bool:
        """Every variant at its desire (within bounds) and fully ready."""
        return all(s.target_replicas == s.stabilized_replicas == s.current_replicas == s.ready_replicas
                   for s in self.steps)


def plan_transition(
    variants: list[VariantState],
    inventory: dict[str, int | None],
    policy: TransitionPolicy,
    history: StabilizationHistory,
    now_s: float,
) -> TransitionPlan:
    """The replicas to write this cycle for every variant, and the updated stabilization history.

    `inventory` maps accelerator type to how many the cluster has (None or absent: unlimited).
    """
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got duplicates {sorted({n for n in names if names.count(n) > 1})}")
    def window(rules: ScalingRules | None, default: float) -> float:
        return default if rules is None or rules.stabilization_window_s is None else rules.stabilization_window_s

    up_window = {v.name: window(v.scale_up, policy.scale_up_window_s) for v in variants}
    down_window = {v.name: window(v.scale_down, policy.scale_down_window_s) for v in variants}
    new_history: dict[str, tuple[tuple[float, int], ...]] = {}
    first_seen: dict[str, tuple[float, int]] = {}
    back_since: dict[str, float | None] = {}
    stabilized: dict[str, int] = {}
    limits: dict[str, list[Limit]] = {v.name: [] for v in variants}

    for v in variants:
        lim = limits[v.name]
        seed = history.first_seen.get(v.name, (now_s, v.current_replicas))
        first_seen[v.name] = seed
        keep_s = max(up_window[v.name], down_window[v.name])
        past = tuple(r for r in history.recommendations.get(v.name, ()) if r[0] >= now_s - keep_s)
        rec = v.clamp(v.desired_replicas)
        if rec != v.desired_replicas:
            lim.append("min_replicas" if rec > v.desired_replicas else "max_replicas")
        if not v.metrics_available:
            lim.append("metrics_unavailable")
            held = v.clamp(v.current_replicas)
            if v.demand_carried and rec > held:
                held = rec
                lim.append("demand_carried")
            new_history[v.name] = past + ((now_s, held),)  # the hold is what this cycle recommends
            back_since[v.name] = None
            stabilized[v.name] = held
            continue
        recovering = False
        if v.name in history.metrics_back_since:
            since = history.metrics_back_since[v.name]
            since = now_s if since is None else since
            if now_s - since < policy.fresh_data_window_s:
                back_since[v.name] = since
                recovering = True
        seen = past + ((now_s, rec),)
        new_history[v.name] = seen
        up_rec = min(r for t, r in seen if t >= now_s - up_window[v.name])
        down_candidates = [r for t, r in seen if t >= now_s - down_window[v.name]]
        if seed[0] > now_s - down_window[v.name]:
            down_candidates.append(seed[1])
        down_rec = max(down_candidates)
        if recovering and down_rec < v.current_replicas:
            down_rec = v.current_replicas
            lim.append("metrics_recovering")
        if v.current_replicas < up_rec:
            target = up_rec
        elif v.current_replicas > down_rec:
            target = down_rec
        else:
            target = v.current_replicas
        if target != rec:
            lim.append("stabilization")
        rules = v.scale_up if target > v.current_replicas else v.scale_down if target < v.current_replicas else None
        bound = rules.limit(v.current_replicas, history.changes.get(v.name, ()), now_s, target > v.current_replicas) \
            if rules is not None else None
        if bound is not None and (target > bound if target > v.current_replicas else target < bound):
            target = bound
            lim.append("rate_policy")
        if policy.max_change_per_cycle is not None:
            step = policy.max_change_per_cycle
            limited = min(max(target, v.current_replicas - step), v.current_replicas + step)
            if limited != target:
                lim.append("max_change")
            target = limited
        stabilized[v.name] = v.clamp(target)

    granted = _grant_scale_ups(variants, inventory, stabilized, limits)
    targets = _make_before_break(variants, inventory, stabilized, granted, limits)
    _drain_only_with_replacement(variants, targets, limits)
    _no_half_pairs(variants, targets, limits)

    steps = []
    changes: dict[str, tuple[tuple[float, int], ...]] = {}
    for v in variants:
        t = v.clamp(targets[v.name])
        periods = [p.period_s for r in (v.scale_up, v.scale_down) if r is not None for p in r.policies]
        if periods:
            kept = tuple(c for c in history.changes.get(v.name, ()) if c[0] > now_s - max(periods))
            changes[v.name] = kept + (((now_s, t - v.current_replicas),) if t != v.current_replicas else ())
        steps.append(TransitionStep(
            name=v.name, current_replicas=v.current_replicas, ready_replicas=v.ready_replicas,
            desired_replicas=v.desired_replicas, stabilized_replicas=stabilized[v.name], target_replicas=t,
            limited_by=tuple(dict.fromkeys(limits[v.name])), reason=_reason(v, stabilized[v.name], t, limits[v.name]),
        ))
    return TransitionPlan(steps=tuple(steps),
                          history=StabilizationHistory(recommendations=new_history, first_seen=first_seen,
                                                       metrics_back_since=back_since, changes=changes))


def _grant_scale_ups(variants, inventory, stabilized, limits) -> dict[str, int]:
    """Targets after inventory: scale-ups fit into accelerators no pod holds; the rest as stabilized."""
    free: dict[str, float] = {}
    for v in variants:
        cap = inventory.get(v.accelerator)
        if cap is None:
            free.setdefault(v.accelerator, math.inf)
        else:
            free.setdefault(v.accelerator, float(cap))
            free[v.accelerator] -= v.occupied_replicas * v.accelerators_per_replica
    granted = dict(stabilized)
    growing = [v for v in variants if stabilized[v.name] > v.current_replicas]
    growing.sort(key=lambda v: 0 if v.current_replicas < v.min_replicas else 1)
    for v in growing:
        want = stabilized[v.name]
        start = v.current_replicas
        if start < v.min_replicas:  # the floor is hard: granted even beyond the inventory
            free[v.accelerator] -= (v.min_replicas - start) * v.accelerators_per_replica
            start = v.min_replicas
        need = want - start
        room = free[v.accelerator]
        fit = need if math.isinf(room) else max(0, min(need, int(room // v.accelerators_per_replica)))
        free[v.accelerator] -= fit * v.accelerators_per_replica
        granted[v.name] = start + fit
        if fit < need:
            limits[v.name].append("inventory")
    return granted


def _make_before_break(variants, inventory, stabilized, granted, limits) -> dict[str, int]:
    targets = dict(granted)
    by_group: dict[str, list[VariantState]] = {}
    for v in variants:
        by_group.setdefault(v.group, []).append(v)
    for v in variants:
        if granted[v.name] >= v.current_replicas:
            continue
        bound = v.clamp(v.current_replicas)  # max_replicas lowered by the user applies at once
        others = [u for u in by_group[v.group] if u.name != v.name]
        pending = [u for u in others
                   if targets[u.name] > u.ready_replicas and stabilized[u.name] >= u.current_replicas]
        short = [u for u in others if stabilized[u.name] > granted[u.name]]
        if not pending and not short:
            continue
        settling = any(u.current_replicas > u.ready_replicas or (u.pods or 0) > u.current_replicas
                       for u in by_group[v.group])
        swap = (not pending and not settling
                and all(u.accelerator == v.accelerator and "inventory" in limits[u.name] for u in short)
                and inventory.get(v.accelerator) is not None)
        if swap:
            targets[v.name] = max(granted[v.name], v.current_replicas - 1, v.min_replicas)
            limits[v.name].append("rolling_swap")
        else:
            targets[v.name] = max(granted[v.name], bound)
            if targets[v.name] > granted[v.name]:
                limits[v.name].append("waiting_for_ready")
    return targets


def _no_half_pairs(variants, targets, limits) -> None:
    """Rule 8: no new replicas for one half of a prefill/decode pair while the other half gets none."""
    pairs: dict[str, dict[str, list[VariantState]]] = {}  # one pass over the variants, not one per group
    for v in variants:
        if v.role in ("prefill", "decode"):
            pairs.setdefault(v.group, {"prefill": [], "decode": []})[v.role].append(v)
    for halves in pairs.values():
        for role, other in (("prefill", "decode"), ("decode", "prefill")):
            if halves[role] and not any(targets[u.name] for u in halves[other]):
                for v in halves[role]:
                    if targets[v.name] > v.current_replicas:
                        targets[v.name] = v.current_replicas
                        limits[v.name].append("pair_incomplete")


def _drain_only_with_replacement(variants, targets, limits) -> None:
    """Rule 7: a model whose demand is not fully served keeps every ready replica (bounds excepted)."""
    for v in variants:
        if not v.demand_unserved or targets[v.name] >= v.current_replicas:
            continue
        floor = min(v.clamp(v.current_replicas), v.ready_replicas)
        if floor > targets[v.name]:
            targets[v.name] = floor
            limits[v.name].append("demand_unserved")


_WHY = {
    "metrics_unavailable": "metrics are unavailable, so replicas are held (never scaled down without data)",
    "metrics_recovering": "metrics just returned after a gap: no scale-down until a full rate window of fresh data",
    "stabilization": "held by the stabilization window",
    "max_change": "limited by the max change per cycle",
    "rate_policy": "limited by the variant's behavior rate policy",
    "min_replicas": "raised to minReplicas",
    "max_replicas": "capped at maxReplicas",
    "inventory": "limited by free accelerators",
    "waiting_for_ready": "waiting until the replacement replicas are ready before scaling down",
    "rolling_swap": "stepping down one replica to free accelerators for its replacement",
    "demand_carried": "scaled up on the model's last measured demand: another variant of it went away with its "
                      "metrics",
    "pair_incomplete": "not scaled up alone: the other half of its prefill/decode pair gets no replicas",
    "demand_unserved": "ready replicas kept: the allocation leaves demand unserved and nothing replaces them "
                       "(drain only when a replacement exists)",
}


def _reason(v: VariantState, stabilized: int, target: int, lim: list[Limit]) -> str:
    if target > v.current_replicas:
        head = f"scale up {v.current_replicas} -> {target}"
    elif target < v.current_replicas:
        head = f"scale down {v.current_replicas} -> {target}"
    else:
        head = f"hold at {target}"
    head += f" (optimizer wants {v.desired_replicas})"
    notes = [_WHY[x] for x in dict.fromkeys(lim)]
    return head + ("; " + "; ".join(notes) if notes else "")
