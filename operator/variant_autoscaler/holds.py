"""Hold rules: when a variant's replicas must not follow the optimizer this cycle, and how that is said.

What it decides: which models have usable metrics (the others are *held*: their variants pinned at the
replicas they run); which models are planned on their last measured demand after a variant of them went
away (carried demand, scale-up only); the pinned bounds of a held variant; the note for accelerators of
which more run than the inventory holds; and the condition reason and message of a target that does not
move (stabilization, make-before-break, inventory, metrics recovering, paused, ...).

What it may not touch: the Kubernetes API, Prometheus, the exporter or the optimizer's solve. It reads
the cycle's observations and returns values; `carry_demand` alone writes the controller's memory of
demand (`live_models`, `last_good`, `carry_since`). The stabilization window and make-before-break
rules themselves are the transition planner's (`optimizer.transition`); this module applies the holds
around them and words them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optimizer.fleet import Variant
from optimizer.transition import VariantState
from variant_autoscaler.collector import CollectionResult, ModelObservation
from variant_autoscaler.resources import PAUSED_ANNOTATION

if TYPE_CHECKING:
    from variant_autoscaler.controller import Live, Memory

CARRY_NOTE = "; a variant of "  # starts the part of a model's metrics reason that says its demand is carried
CARRY_DEMAND_S = 600.0  # how long a model's last measured demand stands in after a variant of it went away


def models_with_metrics(live: dict[str, Live], collection: CollectionResult) -> dict[str, tuple[bool, str]]:
    """Per model: usable (True, why) or held (False, why a person can act on)."""
    out: dict[str, tuple[bool, str]] = {}
    for model in sorted({v.parsed.model_id for v in live.values()}):
        if not collection.available:
            out[model] = (False, f"Prometheus: {collection.reason}")
            continue
        obs = collection.models.get(model)
        if obs is None or not obs.variants or obs.arrival_rate_rps is None:
            mine = [k for k, v in live.items() if v.parsed.model_id == model and v.view.spec_replicas > 0]
            reasons = [collection.variants[k].reason for k in mine if k in collection.variants]
            why = "; ".join(dict.fromkeys(reasons)) or f"no replica of {model} is running, so no metrics report its demand"
            out[model] = (False, why)
        else:
            out[model] = (True, f"{len(obs.variants)} variant(s) reporting")
    return out


def carry_demand(memory: Memory, live: dict[str, Live], collection: CollectionResult,
                 model_ok: dict[str, tuple[bool, str]], now: float) -> dict[str, ModelObservation]:
    """Models to plan on their last measured demand: a variant of the model went away (its target or
    its VA deleted) and the metrics went with its pods, so the remaining variants, at 0, report
    nothing. Without this the model is held at 0 replicas until some pod of it reports (issue 14).

    Lasts while the model has no metrics, at most CARRY_DEMAND_S after the last good reading; the
    planner only scales up on it (`VariantState.demand_carried`). The reason is added to model_ok;
    memory.live_models, last_good and carry_since are updated (the only memory this module writes).
    """
    for key, model in memory.live_models.items():
        if key not in live:
            memory.carry_since.setdefault(model, now)
    memory.live_models = {k: v.parsed.model_id for k, v in live.items()}
    carried: dict[str, ModelObservation] = {}
    for m, (ok, why) in model_ok.items():
        if ok:
            memory.last_good[m] = (now, collection.models[m])
            memory.carry_since.pop(m, None)
            continue
        last = memory.last_good.get(m)
        if m not in memory.carry_since or last is None or now - last[0] > CARRY_DEMAND_S:
            continue
        if not last[1].arrival_rate_rps:
            continue
        carried[m] = last[1]
        model_ok[m] = (False, f"{why}{CARRY_NOTE}{m} went away, so the others are planned on its last "
                              f"measured demand ({last[1].arrival_rate_rps:.2f} req/s, {now - last[0]:.0f} s ago) "
                              "and may only scale up until metrics return")
    return carried


def pinned(var: Variant, v: Live) -> Variant:
    """A held variant: min = max = its current replicas, inside its own bounds, so the optimizer counts
    what runs (and its accelerators) but cannot move it."""
    cur = var.current_replicas
    pin = max(cur, v.parsed.min_replicas)
    if v.parsed.max_replicas is not None:
        pin = min(pin, v.parsed.max_replicas)
    return var.model_copy(update={"min_replicas": pin, "max_replicas": pin})


def over_inventory(states: list[VariantState], inventory: dict[str, int | None]) -> dict[str, str]:
    """Accelerators of which more are in use than the inventory says exist (it shrank, or a node went away):
    a note for the Actuated condition, since holding what runs would otherwise read as an ordinary hold."""
    used: dict[str, int] = {}
    for st in states:
        used[st.accelerator] = used.get(st.accelerator, 0) + st.current_replicas * st.accelerators_per_replica
    return {a: (f"inventory: {n} {a} in use but {inventory[a]} available; nothing running is removed to fit, "
                f"and scale-ups of {a} wait for free accelerators (minReplicas is still honoured)")
            for a, n in used.items() if inventory.get(a) is not None and n > inventory[a]}


def paused_message(p, have: int, mode: str) -> str:
    """Why a paused VA's target does not move, worded for the mode, so both modes say Paused alike."""
    held = (f"{p.target.kind} {p.target.name} stays at {have} replicas" if mode == "direct" else
            f"wva_desired_replicas for {p.target.kind} {p.target.name} is held at its {have} replicas")
    return (f"annotation {PAUSED_ANNOTATION}=true: {held}; the optimizer counts them and plans the other "
            "variants around them")


def holding_reason(step, desired: int | None) -> str:
    """Why a target that is not moved this cycle stays where it is, as a condition reason."""
    for limit, reason in (("metrics_unavailable", "HeldWithoutMetrics"), ("metrics_recovering", "MetricsRecovering"),
                          ("demand_unserved", "NoReplacement"), ("waiting_for_ready", "WaitingForReplacement"),
                          ("rolling_swap", "RollingSwap"), ("stabilization", "Stabilizing"),
                          ("inventory", "InventoryExhausted"), ("max_change", "MaxChangePerCycle"),
                          ("rate_policy", "RatePolicy"), ("pair_incomplete", "PairIncomplete")):
        if limit in step.limited_by:
            return reason
    return "AtDesired" if desired is None or step.target_replicas == desired else "Holding"
