"""One control cycle: collect -> build the problem -> decide -> plan the transition -> actuate -> report.

Why one global cycle instead of a reconcile per resource: the variants of a model share its demand,
and all models share the accelerators, so the decision is only right when made for everything at
once. `Controller.cycle()` is a plain coroutine (no kopf), so tests and the benchmark drive it
directly; the kopf handlers in `variant_autoscaler.operator` only feed it resources and call it.

Order of a cycle and what each failure does:

1. Parse every VariantAutoscaling. An invalid one gets `OptimizationReady=False` (reason from the
   parser), an `InvalidSpec` Event when its problem changes, and is left out; the others go on.
2. Read every target (one list per namespace). A missing one gets `TargetResolved=False` and a
   `TargetNotFound` Event and is left out; one whose kind cannot be listed (403 without RBAC for
   it, 404 where the API does not serve it) gets `TargetResolved=False` reason `TargetUnreadable`
   and an Event, and the others go on. If the API cannot be read at all (5xx, no answer), the
   cycle stops before writing anything.
3. Collect metrics (one PromQL query per metric for all variants). A model without usable metrics
   (Prometheus down, slow, garbage, stale series) is *held*: its variants are pinned at their
   current replicas in the problem, so they keep their accelerators, and the transition planner
   never scales them down; `MetricsAvailable=False` names the reason.
4. Build one `Problem` for all models jointly (profiles: inline, ConfigMap, llm-d WVA parameters,
   online fit, datasheet roofline, in that order), then `capacity_table` and `allocate`.
   Infeasible demand still gives a best-effort allocation; an `Infeasible` Event names the shortfall.
5. Plan the step (`optimizer.transition`): stabilization, make-before-break, inventory, bounds.
6. Direct mode writes the scale subresource (pod-deletion-cost first on scale-downs); metrics mode
   only publishes. `ScaledUp` / `ScaledDown` Events.
7. Status of every resource (conditions `TargetResolved`, `MetricsAvailable`, `OptimizationReady`,
   `Actuated`), then the exporter's snapshot.

Restarts are idempotent: the cycle reads where each target is now and steps from there.

This module is the cycle: it reads the cluster and the metrics, builds the `Problem`, and writes what
was decided (scale, status, Events, exporter snapshot). What it may not do is decide anything the
modules beside it own: the `Decision` from a `Problem` is `decision`'s (a pure function), which models
are held or planned on carried demand, and how a hold is worded, is `holds`'s, and how conditions and
Events are composed (Ready summary, transition times, repeats left out) is `status`'s.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import Field, ValidationError

from optimizer.capacity import CapacityEstimate
from optimizer.datasheet import DATASHEETS, datasheet_profile
from optimizer.fleet import Accelerator, ModelSpec, Variant
from optimizer.problem import AllocationOptions, Problem
from optimizer.profile import PerformanceProfile
from optimizer.transition import (
    StabilizationHistory,
    TransitionPlan,
    TransitionPolicy,
    VariantState,
    plan_transition,
)
from optimizer.workload import SLO
from variant_autoscaler import annotations as annotated
from variant_autoscaler.actuator import (
    SCALABLE_KINDS,
    ApiCallFailed,
    KubeGateway,
    ObjectRef,
    TargetRef,
    TargetUnreadable,
    TargetView,
    deletion_costs,
)
from variant_autoscaler.collector import (
    CollectionResult,
    ModelObservation,
    VariantObservation,
    VariantSelector,
)
from variant_autoscaler.decision import Decision, FrozenModel, decide, homogeneous_baseline
from variant_autoscaler.demand_forecast import ModelForecast, forecast_demand
from variant_autoscaler.exporter import (
    AcceleratorUse,
    DecisionSnapshot,
    Exporter,
    ModelReading,
    RoutingWeight,
    VariantReading,
)
from variant_autoscaler.holds import (
    CARRY_NOTE,
    carry_demand,
    holding_reason,
    models_with_metrics,
    over_inventory,
    paused_message,
    pinned,
)
from variant_autoscaler.resources import (
    InvalidResource,
    ParsedVariant,
    parse_variant,
    profile_from_document,
    wva_slo_class,
)
from variant_autoscaler.saturation import StageLoad, pool_saturation
from variant_autoscaler.settings import (
    GPU_PRODUCT_LABEL,
    OperatorSettings,
    SettingsStore,
    SloSettings,
    accelerator_for_product,
    inventory_from_nodes,
)
from variant_autoscaler.status import CONFLICT, condition_list, is_repeat, rfc3339, with_ready

log = logging.getLogger("variant_autoscaler.controller")

PROFILE_REFIT_S = 300.0
STATUS_REFRESH_S = 300.0
WVA_DEFAULT_VARIANT_COST = 10.0  # llm-d WVA's price of a replica when neither variantCost nor the settings give one


class VariantOutcome(FrozenModel):
    key: str
    valid: bool
    target_found: bool = False
    metrics_available: bool = False
    current_replicas: int | None = None
    ready_replicas: int | None = None
    desired_replicas: int | None = None
    target_replicas: int | None = None
    scaled: bool = False
    conditions: dict[str, tuple[str, str, str]] = Field(default_factory=dict, description="type -> (status, reason, message)")
    events: list[tuple[str, str]] = Field(default_factory=list, description="(reason, message) emitted this cycle.")


class CycleReport(FrozenModel):
    started_at: float
    duration_s: float
    optimizer_s: float = 0.0
    phases_s: dict[str, float] = Field(default_factory=dict, description="Seconds per step of the cycle.")
    ok: bool
    error: str | None = None
    metrics_available: bool = False
    metrics_reason: str = ""
    optimizer_status: str | None = None
    optimizer_gap: float | None = Field(default=None, description="Proven optimality gap of this cycle's allocation.")
    optimizer_warm_started: bool = Field(
        default=False, description="The allocation started from the previous cycle's prices, columns and plan.")
    cost_per_hour: float | None = None
    variants: dict[str, VariantOutcome] = Field(default_factory=dict)
    plan: TransitionPlan | None = None


@dataclass
class ControllerDeps:
    """What a cycle talks to. `collect` and `fit_profiles` are blocking (run in a thread)."""

    gateway: KubeGateway
    settings: SettingsStore
    exporter: Exporter
    collect: Callable[[list[VariantSelector]], CollectionResult]
    pod_load: Callable[[list[str]], dict[tuple[str, str], float]] | None = None
    fit_profiles: Callable[[list[VariantSelector]], Any] | None = None
    clock: Callable[[], float] = time.time
    settings_configmap: tuple[str, str] | None = None
    namespaces: tuple[str, ...] = ()  # `run -n`: the only namespaces this operator may read or write VAs in


def served_namespaces(flag: tuple[str, ...] | list[str], configured: list[str]) -> list[str] | None:
    """The namespaces whose VariantAutoscalings a cycle serves; None: all of them.

    The `run -n` flag bounds everything (kopf watches only those namespaces and the chart grants Roles
    only there); the settings' watched_namespaces narrow it further, never widen it. A flag and
    settings with nothing in common serve nothing (an empty list), never the whole cluster.
    """
    if flag:
        return [n for n in flag if not configured or n in configured]
    return list(configured) or None


@dataclass
class Live:
    """A parsed variant whose target exists, plus what this cycle learned about it."""

    parsed: ParsedVariant
    view: TargetView
    accelerator: str | None = None
    model: ModelSpec | None = None
    profile: PerformanceProfile | None = None
    profile_source: str = ""
    slo: SloSettings | None = None
    problem: str | None = None
    problem_reason: str = ""
    desired: int | None = None
    conflict: str | None = None  # direct mode: why another autoscaler owns the target's replicas


@dataclass
class Memory:
    """What the controller keeps between cycles (stabilization history, Events sent, fitted profiles,
    last statuses and demand): the only state a cycle carries over; a restart starts it empty."""

    history: StabilizationHistory = field(default_factory=StabilizationHistory)
    events: dict[tuple[str, str], tuple[str, str, float]] = field(default_factory=dict)
    fits: dict[str, tuple[float, PerformanceProfile]] = field(default_factory=dict)
    last_status: dict[str, tuple[float, dict]] = field(default_factory=dict)
    last_desired: dict[str, int] = field(default_factory=dict)
    last_actuation: dict[str, str] = field(default_factory=dict)
    live_models: dict[str, str] = field(default_factory=dict)  # variant key -> model, last cycle's live variants
    last_good: dict[str, tuple[float, ModelObservation]] = field(default_factory=dict)  # model -> last metrics
    carry_since: dict[str, float] = field(default_factory=dict)  # model -> when one of its variants went away
    status_failing: set[str] = field(default_factory=set)  # variant keys whose last status write failed
    warm_start: Any = None  # the last decision's optimizer.allocation_warm.WarmStart: the next allocation starts there
    forecasts: dict[str, ModelForecast] = field(default_factory=dict)  # model -> its arrival-rate forecast


class Controller:
    """The control loop's state between cycles (stabilization history, events sent, fitted profiles)."""

    def __init__(self, deps: ControllerDeps):
        self.deps = deps
        self.memory = Memory()
        self._discovered: dict[str, int] = {}
        self._model_owner: dict[str, str] = {}
        self._steps: dict = {}
        self._over_inventory: dict[str, str] = {}  # accelerator -> why more of it runs than the inventory has
        self._settings_error: str | None = None
        self._phases: dict[str, float] = {}
        self._mark = 0.0
        self._scope_warned: tuple | None = None
        self._annotation_skip: list[str] = []
        self._planned_rates: dict[str, float | None] = {}  # model -> the rate this cycle planned for

    # ------------------------------------------------------------------------------------------
    async def cycle(self, resources: list[dict] | None = None) -> CycleReport:
        """Run one cycle over `resources` (VariantAutoscaling dicts; None: list them from the API)."""
        deps, started = self.deps, self.deps.clock()
        t0 = time.monotonic()
        unusable = await self._reload_settings()
        if unusable:
            report = CycleReport(started_at=started, duration_s=time.monotonic() - t0, ok=False, error=unusable)
            deps.exporter.cycle_duration.observe(report.duration_s)
            return report
        settings = deps.settings.current
        scope = served_namespaces(deps.namespaces, settings.watched_namespaces)
        if scope == [] and self._scope_warned != (deps.namespaces, tuple(settings.watched_namespaces)):
            self._scope_warned = (deps.namespaces, tuple(settings.watched_namespaces))
            log.warning("the settings' watched_namespaces %s share no namespace with --namespace %s: nothing is served",
                        settings.watched_namespaces, list(deps.namespaces))
        try:
            self._phases = {}
            if resources is None:
                resources = [] if scope == [] else await deps.gateway.list_variant_autoscalings(scope)
            if settings.annotation_mode and scope != []:
                resources = [*resources, *await self._annotated(scope)]
            self._phase("list", t0)
            return await self._cycle(settings, scope, resources, started, t0)
        except ApiCallFailed as err:
            deps.exporter.count_error("KubernetesApiUnavailable")
            log.warning("cycle aborted, nothing written: %s", err)
            report = CycleReport(started_at=started, duration_s=time.monotonic() - t0, ok=False, error=str(err))
            deps.exporter.cycle_duration.observe(report.duration_s)
            return report

    async def _annotated(self, scope: list[str] | None) -> list[dict]:
        """Annotation mode: the ScaledObjects and HPAs in scope (the parse step keeps the managed ones).
        A kind that cannot be listed (no KEDA CRD, no RBAC rule) is logged once per reason, and the
        others go on."""
        items, skipped = await self.deps.gateway.list_annotated(scope)
        if skipped and skipped != self._annotation_skip:
            log.warning("annotation mode: not listed, so not managed: %s", "; ".join(skipped))
        self._annotation_skip = skipped
        return items

    def _phase(self, name: str, since: float) -> float:
        """Record the time since the previous mark (or `since`) under `name`; returns now."""
        now = time.monotonic()
        self._phases[name] = now - max(since, self._mark)
        self._mark = now
        return now

    async def _reload_settings(self) -> str | None:
        """Re-read the settings ConfigMap. Returns why no cycle may run: the source never gave valid
        settings (missing, invalid, empty): defaults are not a last good, running on them would make
        every VA ModelUnknown and point at the default Prometheus."""
        where = self.deps.settings_configmap
        store = self.deps.settings
        if where is None:
            return None
        namespace, name = where
        try:
            cm = await self.deps.gateway.read_configmap(namespace, name)
        except ApiCallFailed as err:
            log.warning("cannot read settings ConfigMap %s/%s, keeping the current settings: %s", namespace, name, err)
            return None if store.loaded else f"settings ConfigMap {namespace}/{name} cannot be read yet: {err}"
        error = (store.update_from_configmap(cm) if cm is not None
                 else store.reject(f"settings ConfigMap {namespace}/{name} does not exist"))
        if not error:
            self._settings_error = None
            return None
        self.deps.exporter.count_error("InvalidSettings")
        keeping = "keeping the last good ones" if store.loaded else "no cycle runs until they are valid"
        if error != self._settings_error:
            self._settings_error = error
            log.error("invalid settings, %s: %s", keeping, error)
            if cm is not None:
                ref = ObjectRef(namespace=namespace, name=name, uid=(cm.get("metadata") or {}).get("uid"),
                                kind="ConfigMap", api_version="v1")
                try:
                    await self.deps.gateway.emit_event(ref, "Warning", "InvalidSettings", f"{error}; {keeping}")
                except ApiCallFailed as err:
                    log.warning("event InvalidSettings for ConfigMap %s/%s not posted: %s", namespace, name, err)
        return None if store.loaded else f"no valid settings: {error}"

    async def _cycle(self, settings: OperatorSettings, scope: list[str] | None, resources: list[dict],
                     started: float, t0: float) -> CycleReport:
        deps, memory = self.deps, self.memory
        now_text = rfc3339(started)
        outcomes: dict[str, VariantOutcome] = {}
        statuses: dict[str, tuple[ObjectRef, dict]] = {}
        events: list[tuple[ObjectRef, str, str, str, str]] = []  # ref, type, reason, message, dedupe key

        # 1. parse
        parsed: dict[str, ParsedVariant] = {}
        va_keys = {f"{(o.get('metadata') or {}).get('namespace') or 'default'}/{(o.get('metadata') or {}).get('name')}"
                   for o in resources if o.get("kind") not in annotated.KINDS}
        for obj in resources:
            meta = obj.get("metadata") or {}
            ns, name = meta.get("namespace") or "default", meta.get("name") or "?"
            if scope is not None and ns not in scope:
                continue
            key = f"{ns}/{name}"
            declared = obj.get("kind") in annotated.KINDS  # annotation mode: a ScaledObject or an HPA
            if declared and not annotated.is_managed(obj):
                continue
            try:
                if declared and (key in va_keys or key in parsed):
                    other = "VariantAutoscaling" if key in va_keys else parsed[key].ref.kind
                    raise InvalidResource("metadata.name", f"{other} {key} has the same name; the variant "
                                          "label of the exported metrics must name one variant: rename one of "
                                          "them", condition_reason="VariantNameConflict")
                parsed[key] = parse_variant(annotated.variant_from_annotated(obj) if declared else obj)
            except InvalidResource as err:
                ref = ObjectRef(namespace=ns, name=name, uid=meta.get("uid"),
                                **({"kind": obj["kind"], "api_version": annotated.API_VERSIONS[obj["kind"]]}
                                   if declared else {"api_version": obj.get("apiVersion")
                                                     or ObjectRef.model_fields["api_version"].default}))
                self._invalid(key, ref, obj, err.condition_reason, f"{err}", int(meta.get("generation") or 0),
                              now_text, statuses, events, outcomes)
        for key, p in list(parsed.items()):
            if p.target.kind not in SCALABLE_KINDS:
                del parsed[key]
                self._invalid(key, p.ref, {"status": p.status}, "UnsupportedTargetKind",
                              f"spec.scaleTargetRef.kind: {p.target.kind} cannot be scaled by this operator "
                              f"(supported: {', '.join(sorted(SCALABLE_KINDS))})", p.generation, now_text, statuses,
                              events, outcomes)
        by_target: dict[TargetRef, list[str]] = {}
        # the oldest VA of a target keeps it (creationTimestamp, then uid): a newcomer never takes over
        for key, p in sorted(parsed.items(), key=lambda kv: (kv[1].created or "~", kv[1].ref.uid or "", kv[0])):
            by_target.setdefault(p.target, []).append(key)
        for target, keys in by_target.items():
            for key in keys[1:]:
                p = parsed.pop(key)
                self._invalid(key, p.ref, {"status": p.status}, "TargetConflict",
                              f"spec.scaleTargetRef: {target.kind} {target.name} is already scaled by {keys[0]}",
                              p.generation, now_text, statuses, events, outcomes)

        self._phase("parse", t0)
        # 2. targets
        views = await deps.gateway.read_targets([p.target for p in parsed.values()])
        live: dict[str, Live] = {}
        for key, p in parsed.items():
            view = views.get(p.target)
            if isinstance(view, TargetUnreadable):
                conds = {
                    "TargetResolved": ("False", "TargetUnreadable", view.message),
                    "MetricsAvailable": ("Unknown", "TargetUnreadable", "the target cannot be read"),
                    "OptimizationReady": ("False", "TargetUnreadable",
                                          "left out of the optimization until the target can be read"),
                    "Actuated": ("False", "TargetUnreadable", "nothing is scaled while the target cannot be read"),
                }
                self._finish(key, p, conds, now_text, statuses, events, outcomes, extra={},
                             event=("Warning", "TargetUnreadable", view.message))
                continue
            if view is None:
                conds = {
                    "TargetResolved": ("False", "TargetNotFound",
                                       f"{p.target.kind} {p.target.namespace}/{p.target.name} does not exist; create it "
                                       "or fix spec.scaleTargetRef" + (DEFAULT_TARGET_NOTE if p.target_defaulted else "")),
                    "MetricsAvailable": ("Unknown", "TargetNotFound", "no target to collect metrics for"),
                    "OptimizationReady": ("False", "TargetNotFound", "left out of the optimization until the target exists"),
                    "Actuated": ("False", "TargetNotFound", "nothing to scale"),
                }
                self._finish(key, p, conds, now_text, statuses, events, outcomes, extra={},
                             event=("Warning", "TargetNotFound", conds["TargetResolved"][2]))
                continue
            live[key] = Live(parsed=p, view=view)

        if settings.actuation_mode == "direct" and live:
            await self._find_conflicting_autoscalers(live)
        self._phase("targets", t0)
        # 3. metrics and the ConfigMap-backed parts of specs
        await self._resolve_references(live, settings, now_text, statuses, events, outcomes)
        selectors = [VariantSelector(name=k, namespace=v.parsed.ref.namespace, model=v.parsed.model_id,
                                     deployment=v.parsed.target.name) for k, v in live.items()]
        if selectors:
            collection = await asyncio.to_thread(deps.collect, selectors)
        else:
            collection = CollectionResult(available=True, reason="no variants", evaluated_at=None, window_s=0,
                                          queries=0, duration_s=0)
        if not collection.available:
            deps.exporter.count_error("MetricsUnavailable")
        if any(obs.status == "invalid" for obs in collection.variants.values()):
            deps.exporter.count_error("MetricsInvalid")
        model_ok = models_with_metrics(live, collection)
        carried = carry_demand(self.memory, live, collection, model_ok, started)
        plan_ok = {**model_ok, **{m: (True, model_ok[m][1]) for m in carried}}
        ahead = forecast_demand(memory.forecasts, collection, model_ok, settings, started)
        planned_models = {**collection.models, **ahead, **carried}
        plan_collection = collection.model_copy(update={"models": planned_models}) if carried or ahead else collection
        self._planned_rates = {m: o.arrival_rate_rps for m, o in planned_models.items() if plan_ok.get(m, (False,))[0]}

        self._phase("collect", t0)
        # 4. the problem, jointly
        if settings.discover_inventory:
            nodes = await deps.gateway.list_nodes()
            self._discovered = inventory_from_nodes(nodes or [], settings.accelerators)
        await self._complete_variants(live, settings, collection)
        problem, in_problem, held_models = self._build_problem(live, settings, plan_collection, plan_ok)
        decision: Decision | None = None
        capacity: dict[tuple[str, str], CapacityEstimate] = {}
        optimizer_s = 0.0
        error = None
        if problem is not None:
            t_opt = time.monotonic()
            try:
                decision, capacity = await asyncio.to_thread(decide, problem, memory.warm_start)
                memory.warm_start = decision.warm_start
            except Exception as exc:  # noqa: BLE001 - an optimizer bug must not kill the loop
                log.exception("optimizer failed")
                deps.exporter.count_error("OptimizerFailed")
                error = f"optimizer failed: {exc}"
            optimizer_s = time.monotonic() - t_opt
            deps.exporter.optimizer_duration.observe(optimizer_s)
        if decision is not None and decision.status == "infeasible":
            deps.exporter.count_error("Infeasible")

        self._phase("decide", t0)
        if decision is not None:
            self._phases["decide.capacity"] = decision.capacity_s
            self._phases["decide.solver"] = decision.solver_s
        # 5. plan
        inventory = {a.name: a.available for a in (problem.accelerators if problem else [])}
        states = []
        for key, v in live.items():
            if v.accelerator is None:
                continue  # unknown accelerator: neither counted nor scaled
            cur = v.view.spec_replicas
            has_metrics = (key in in_problem and decision is not None and plan_ok.get(v.parsed.model_id, (False, ""))[0]
                           and v.parsed.model_id not in held_models)
            carry = has_metrics and v.parsed.model_id in carried
            has_metrics = has_metrics and not carry
            if has_metrics or carry:
                desired = decision.replicas.get(key, cur)
            else:
                # keep the last decision: this operator's, else the one in status (a restart)
                last = v.parsed.status.get("desiredReplicas")
                desired = memory.last_desired.get(key, last if isinstance(last, int) else cur)
            v.desired = desired if key in in_problem else None
            states.append(VariantState(
                # the model, not model/role: a P/D pair replaces a "both" variant (and the reverse), so the old
                # one must wait for the pair's replicas to be ready (make-before-break), as in the simulator
                name=key, group=v.parsed.model_id, role=v.parsed.role_name, accelerator=v.accelerator,
                accelerators_per_replica=v.parsed.accelerator_count, current_replicas=cur,
                ready_replicas=v.view.ready_replicas, pods=v.view.pod_count, desired_replicas=desired,
                min_replicas=v.parsed.min_replicas, max_replicas=v.parsed.max_replicas, metrics_available=has_metrics,
                demand_carried=carry, scale_up=v.parsed.scale_up, scale_down=v.parsed.scale_down,
                demand_unserved=has_metrics and decision.unmet_demand_rps.get(v.parsed.model_id, 0.0) > 1e-6))
        for a in settings.accelerators:
            inventory.setdefault(a.name, a.available if a.available is not None else self._discovered.get(a.name))
        policy = TransitionPolicy(scale_up_window_s=settings.scale_up_window_s,
                                  scale_down_window_s=settings.scale_down_window_s,
                                  max_change_per_cycle=settings.max_change_per_cycle,
                                  fresh_data_window_s=settings.rate_window_s)
        plan = plan_transition(states, inventory, policy, memory.history, started)
        memory.history = plan.history
        self._over_inventory = over_inventory(states, inventory)
        for st in states:
            if st.metrics_available:
                memory.last_desired[st.name] = st.desired_replicas

        self._phase("plan", t0)
        # 6. actuate
        actuation: dict[str, tuple[bool, str, str]] = {}
        scaled: set[str] = set()
        if settings.actuation_mode == "direct":
            await self._actuate(plan, live, actuation, scaled, events)
        self._phase("actuate", t0)
        # 7. report
        self._steps = {s.name: s for s in plan.steps}
        self._model_owner = {}
        for k in sorted(live, reverse=True):
            self._model_owner[live[k].parsed.model_id] = k  # the first key of each model: gets model Events
        load = self._loads(live, capacity, decision, collection, problem)
        for key, v in live.items():
            self._report_live(key, v, settings, collection, model_ok, decision, plan, load, actuation, scaled,
                              in_problem, now_text, statuses, events, outcomes)
        self._phase("report", t0)
        await self._write(statuses, events, started)
        self._phase("write", t0)
        for _ref, _kind, reason, message, (key, _topic, _text) in events:
            if key in outcomes:
                o = outcomes[key]
                outcomes[key] = o.model_copy(update={"events": [*o.events, (reason, message)]})
        snapshot = self._snapshot(live, plan, decision, collection, model_ok, load, problem, capacity)
        deps.exporter.publish(snapshot, success=error is None, at=started)
        duration = time.monotonic() - t0
        deps.exporter.cycle_duration.observe(duration)
        self._phase("export", t0)
        return CycleReport(started_at=started, duration_s=duration, optimizer_s=optimizer_s, ok=error is None,
                           phases_s=dict(self._phases),
                           error=error, metrics_available=collection.available, metrics_reason=collection.reason,
                           optimizer_status=decision.status if decision else None,
                           optimizer_gap=decision.gap if decision else None,
                           optimizer_warm_started=bool(decision and decision.warm_started),
                           cost_per_hour=decision.cost_per_hour if decision else None, variants=outcomes, plan=plan)

    # ------------------------------------------------------------------------------------------
    # Parsing helpers.

    def _invalid(self, key, ref, obj, reason, message, generation, now_text, statuses, events, outcomes) -> None:
        status = obj.get("status") or {}
        conds = {
            "TargetResolved": ("Unknown", reason, "the resource is invalid"),
            "MetricsAvailable": ("Unknown", reason, "the resource is invalid"),
            "OptimizationReady": ("False", reason, f"invalid VariantAutoscaling, left out of the optimization: {message}"),
            "Actuated": ("False", reason, "nothing is scaled for an invalid resource"),
        }
        previous = status.get("conditions") or []
        conds = with_ready(conds)
        body = {"observedGeneration": generation,
                "conditions": condition_list(previous, conds, generation, now_text)}
        statuses[key] = (ref, body)
        self._event(events, key, ref, "Warning", "InvalidSpec" if reason == "InvalidSpec" else reason, message,
                    dedupe="spec")
        outcomes[key] = VariantOutcome(key=key, valid=False, conditions=conds)

    async def _find_conflicting_autoscalers(self, live: dict[str, Live]) -> None:
        """Direct mode: a target that an autoscaling/v2 HPA in its namespace already scales is left to
        that HPA (two writers of one replicas field fight: each undoes the other every cycle). HPAs
        that cannot be listed (no RBAC rule, no autoscaling/v2, API down) leave the check out, logged."""
        namespaces = sorted({v.parsed.ref.namespace for v in live.values()})
        try:
            found, skipped = await self.deps.gateway.list_autoscalers(namespaces)
        except ApiCallFailed as err:
            found, skipped = {}, [str(err)]
        if skipped:
            log.warning("HorizontalPodAutoscalers not checked for conflicts: %s", "; ".join(skipped))
        for v in live.values():
            t = v.parsed.target
            group = t.api_version.rpartition("/")[0]
            for hpa in found.get(t.namespace, []):
                ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
                if (ref.get("kind"), ref.get("name")) == (t.kind, t.name) \
                        and str(ref.get("apiVersion") or "").rpartition("/")[0] == group:
                    name = (hpa.get("metadata") or {}).get("name")
                    v.conflict = (f"HorizontalPodAutoscaler {t.namespace}/{name} already scales {t.kind} {t.name}: "
                                  "the operator does not write its replicas (the optimizer counts them and plans "
                                  "the other variants around them); delete the HPA to let the operator scale it, or "
                                  "run in actuationMode metrics so an HPA acts on wva_desired_replicas")
                    break

    def _event(self, events, key: str, ref: ObjectRef, kind: str, reason: str, message: str, *, dedupe: str) -> None:
        """Queue an Event unless this resource already got it (`status.is_repeat`)."""
        if is_repeat(self.memory.events.get((key, dedupe)), reason, message, self.deps.clock()):
            return
        events.append((ref, kind, reason, message, (key, dedupe, (reason, message))))

    def _finish(self, key, p: ParsedVariant, conds, now_text, statuses, events, outcomes, *, extra: dict,
                event: tuple[str, str, str] | None) -> None:
        previous = p.status.get("conditions") or []
        conds = with_ready(conds)
        body = {"observedGeneration": p.generation, **extra,
                "conditions": condition_list(previous, conds, p.generation, now_text)}
        statuses[key] = (p.ref, body)
        if event is not None:
            self._event(events, key, p.ref, event[0], event[1], event[2], dedupe="state")
        else:
            self.memory.events.pop((key, "state"), None)
        outcomes[key] = VariantOutcome(key=key, valid=True, target_found="TargetResolved" in conds
                                       and conds["TargetResolved"][0] == "True", conditions=conds)

    async def _resolve_references(self, live: dict[str, Live], settings, now_text, statuses, events,
                                  outcomes) -> None:
        """Profiles and SLO classes kept in ConfigMaps: read each ConfigMap once per cycle."""
        wanted = {(v.parsed.ref.namespace, r.name) for v in live.values()
                  for r in (v.parsed.profile_ref, v.parsed.slo_class_ref) if r is not None}
        maps: dict[tuple[str, str], dict | None] = {}
        for ns, name in sorted(wanted):
            try:
                maps[(ns, name)] = await self.deps.gateway.read_configmap(ns, name)
            except ApiCallFailed as err:
                maps[(ns, name)] = {"error": str(err)}
        for key, v in list(live.items()):
            p = v.parsed
            try:
                if p.profile_ref is not None:
                    text = self._configmap_text(maps, p.ref.namespace, p.profile_ref.name, p.profile_ref.key,
                                                "spec.profile.configMapRef")
                    try:
                        doc = yaml.safe_load(text)
                    except yaml.YAMLError as exc:
                        raise InvalidResource("spec.profile.configMapRef",
                                              f"ConfigMap {p.profile_ref.name} key {p.profile_ref.key} is not valid "
                                              f"YAML: {' '.join(str(exc).split())}") from None
                    v.profile = profile_from_document(
                        doc, f"ConfigMap {p.profile_ref.name} key {p.profile_ref.key}")
                    v.profile_source = f"ConfigMap {p.profile_ref.name}"
                if p.slo is None and p.slo_class_ref is not None:
                    text = self._configmap_text(maps, p.ref.namespace, p.slo_class_ref.name, p.slo_class_ref.key,
                                                "spec.sloClassRef")
                    v.slo = wva_slo_class(text, p.model_id, f"spec.sloClassRef ({p.slo_class_ref.name}/"
                                                            f"{p.slo_class_ref.key})")
            except InvalidResource as err:
                del live[key]
                self._invalid(key, p.ref, {"status": p.status}, err.condition_reason, str(err), p.generation,
                              now_text, statuses, events, outcomes)

    @staticmethod
    def _configmap_text(maps, namespace, name, key, where) -> str:
        cm = maps.get((namespace, name))
        if cm is None:
            raise InvalidResource(where, f"ConfigMap {namespace}/{name} does not exist",
                                  condition_reason="ConfigMapNotFound")
        if "error" in cm:
            raise InvalidResource(where, f"ConfigMap {namespace}/{name} cannot be read: {cm['error']}",
                                  condition_reason="ConfigMapUnreadable")
        text = (cm.get("data") or {}).get(key)
        if text is None:
            raise InvalidResource(where, f"ConfigMap {namespace}/{name} has no key {key!r}",
                                  condition_reason="ConfigMapKeyMissing")
        return text

    # ------------------------------------------------------------------------------------------
    # Problem building.

    async def _complete_variants(self, live: dict[str, Live], settings: OperatorSettings,
                                 collection: CollectionResult) -> None:
        """Accelerator, model facts and profile of every live variant; `problem` says what is missing."""
        names = [a.name for a in settings.accelerators]
        need_fit = []
        now = self.deps.clock()
        for key, v in live.items():
            p = v.parsed
            v.accelerator = p.accelerator or (accelerator_for_product(v.view.node_product, settings.accelerators)
                                              if v.view.node_product else None)
            if v.accelerator is None and len(names) == 1:
                v.accelerator = names[0]
            if v.accelerator is None:
                v.problem, v.problem_reason = "AcceleratorUnknown", (
                    "spec.accelerator is not set and neither the target's node selector "
                    f"({GPU_PRODUCT_LABEL}) nor the settings (one accelerator type) decide it")
                continue
            if settings.accelerator(v.accelerator) is None and v.accelerator not in DATASHEETS:
                v.problem, v.problem_reason = "AcceleratorUnknown", (
                    f"accelerator {v.accelerator!r} is neither in the operator settings nor a known datasheet type "
                    f"({sorted(DATASHEETS)}); add it to the settings' accelerators")
                continue
            v.model = settings.model_spec(p.model_id)
            if v.model is None:
                v.problem, v.problem_reason = "ModelUnknown", (
                    f"model {p.model_id!r} has no weights/KV facts: add it to the settings' models (architecture, "
                    "or weight_gb and kv_bytes_per_token)")
                continue
            if v.slo is None:
                entry = settings.model(p.model_id)
                v.slo = p.slo or (entry.slo if entry and entry.slo else None) or settings.default_slo
            if p.profile is not None and v.profile is None:
                v.profile, v.profile_source = p.profile, "spec"
            if v.profile is None:
                cached = self.memory.fits.get(key)
                if cached and now - cached[0] < PROFILE_REFIT_S:
                    v.profile, v.profile_source = cached[1], "online fit"
                elif settings.online_profile_fit and self.deps.fit_profiles is not None and \
                        key in collection.variants and collection.variants[key].available:
                    need_fit.append(key)
        if need_fit:
            selectors = [VariantSelector(name=k, namespace=live[k].parsed.ref.namespace, model=live[k].parsed.model_id,
                                         deployment=live[k].parsed.target.name) for k in need_fit]
            try:
                result = await asyncio.to_thread(self.deps.fit_profiles, selectors)
                for k, fit in (getattr(result, "fits", None) or {}).items():
                    if fit.available and fit.profile is not None:
                        self.memory.fits[k] = (now, fit.profile)
                        live[k].profile, live[k].profile_source = fit.profile, "online fit"
            except Exception:  # noqa: BLE001 - a failed fit falls back to the datasheet
                log.exception("online profile fit failed")
        for v in live.values():
            if v.problem or v.profile is not None:
                continue
            facts = settings.model_facts(v.parsed.model_id)
            sheet = DATASHEETS.get(v.accelerator or "")
            if facts is not None and sheet is not None:
                v.profile = datasheet_profile(facts, sheet, v.parsed.accelerator_count)
                v.profile_source = "datasheet"
            else:
                v.problem, v.problem_reason = "NoProfile", (
                    "no performance profile: set spec.profile, or let the operator fit one online (needs live "
                    "traffic), or use a known architecture on a datasheet accelerator")

    def _accelerators(self, live: dict[str, Live], settings: OperatorSettings,
                      discovered: dict[str, int]) -> dict[str, Accelerator]:
        out: dict[str, Accelerator] = {}
        for v in live.values():
            name = v.accelerator
            if name is None or name in out or v.problem:
                continue
            entry = settings.accelerator(name)
            if entry is not None:
                out[name] = entry.to_accelerator(available=discovered.get(name) if settings.discover_inventory else None)
            else:
                sheet = DATASHEETS[name]
                price = (v.parsed.variant_cost or WVA_DEFAULT_VARIANT_COST) / max(1, v.parsed.accelerator_count)
                out[name] = sheet.accelerator(cost_per_hour=price, available=None)
        return out

    def _build_problem(self, live: dict[str, Live], settings: OperatorSettings, collection: CollectionResult,
                       model_ok: dict[str, tuple[bool, str]]) -> tuple[Problem | None, set[str], set[str]]:
        """The joint problem; returns it, the variant keys in it and the models held at current replicas."""
        accs = self._accelerators(live, settings, self._discovered)
        held: set[str] = set()
        models: dict[str, ModelSpec] = {}
        slos: dict[str, SLO] = {}
        for v in live.values():
            if v.problem:
                continue
            m = v.parsed.model_id
            models.setdefault(m, v.model)
            if v.slo is not None:
                s = v.slo.for_model(m)
                old = slos.get(m)
                if old is None:
                    slos[m] = s
                else:  # the strictest wins
                    slos[m] = SLO(model=m, ttft_s=min(old.ttft_s, s.ttft_s), itl_s=min(old.itl_s, s.itl_s),
                                  e2e_s=min(x for x in (old.e2e_s, s.e2e_s) if x is not None)
                                  if (old.e2e_s or s.e2e_s) else None,
                                  percentile=max(old.percentile, s.percentile))
        for m in models:
            if not model_ok.get(m, (False, ""))[0] or m not in slos:
                held.add(m)
        for v in live.values():
            if not v.problem and v.parsed.model_id not in slos:
                v.problem, v.problem_reason = "NoSLO", (
                    f"model {v.parsed.model_id!r} has no SLO: set spec.slo, spec.sloClassRef, or the settings' "
                    "models[].slo or default_slo")
        variants: list[Variant] = []
        keys: list[str] = []
        for key, v in live.items():
            if v.problem:
                continue
            p = v.parsed
            cur = v.view.spec_replicas
            lo, hi = p.min_replicas, p.max_replicas
            if p.paused or v.conflict:  # held where it is (by the user, or by another autoscaler)
                lo = hi = cur
            elif p.model_id in held:
                lo = hi = max(cur, p.min_replicas) if p.max_replicas is None else min(max(cur, p.min_replicas),
                                                                                        p.max_replicas)
            try:
                variants.append(Variant(
                    name=key, model=p.model_id, accelerator=v.accelerator,
                    accelerators_per_replica=p.accelerator_count, max_batch=p.max_batch or settings.default_max_batch,
                    role=p.role, min_replicas=lo, max_replicas=hi, current_replicas=cur, profile=v.profile,
                    cost_per_replica_per_hour=p.variant_cost))
                keys.append(key)
            except ValidationError as err:
                v.problem, v.problem_reason = "InvalidVariant", str(err.errors()[0]["msg"])
        workloads = []
        priorities: dict[str, list[float]] = {}  # per model, its variants' priorities (one pass, not one per model)
        for k in keys:
            if live[k].parsed.priority:
                priorities.setdefault(live[k].parsed.model_id, []).append(live[k].parsed.priority)
        for m in sorted(models):
            if m in held:
                continue
            obs = collection.models.get(m)
            entry = settings.model(m)
            mix = (entry.length_mix if entry and entry.length_mix else None) or settings.default_length_mix
            prios = priorities.get(m, [])
            priority = max(prios) if prios else (entry.priority if entry else 1.0)
            w = obs.to_workload(priority=priority, fallback_mix=mix) if obs is not None else None
            if w is None:
                held.add(m)
                continue
            workloads.append(w)
        # a held model's variants are pinned; re-pin the ones whose workload vanished just above
        variants = [pinned(var, live[var.name]) if var.model in held and var.min_replicas != var.max_replicas
                    else var for var in variants]
        if not variants:
            return None, set(), held
        options = AllocationOptions(change_penalty_per_replica=settings.change_penalty,
                                    kv_transfer_gb_s=settings.kv_transfer_gb_s, service_level=settings.service_level,
                                    time_limit_s=settings.optimizer_time_limit_s)
        used_models = {var.model for var in variants}
        for _ in range(len(variants) + 1):
            try:
                problem = Problem(accelerators=[a for n, a in accs.items() if any(x.accelerator == n for x in variants)],
                                  models=[models[m] for m in sorted(used_models)], variants=variants,
                                  workloads=[w for w in workloads if w.model in used_models],
                                  slos=[slos[m] for m in sorted(used_models) if m in slos], options=options)
                return problem, {v.name for v in variants}, held
            except ValidationError as err:
                bad = self._culprit(err, variants)
                if bad is None:
                    log.error("cannot build the problem: %s", err)
                    return None, set(), held
                v = live[variants[bad].name]
                v.problem, v.problem_reason = "InvalidVariant", str(err.errors()[0]["msg"]).removeprefix("Value error, ")
                variants.pop(bad)
                used_models = {var.model for var in variants}
                if not variants:
                    return None, set(), held
        return None, set(), held

    @staticmethod
    def _culprit(err: ValidationError, variants: list[Variant]) -> int | None:
        text = str(err)
        m = re.search(r"variants\[(\d+)\]", text)
        return int(m.group(1)) if m and int(m.group(1)) < len(variants) else None

    # ------------------------------------------------------------------------------------------
    # Actuation.

    async def _actuate(self, plan: TransitionPlan, live: dict[str, Live], actuation, scaled, events) -> None:
        downs = [s for s in plan.steps if s.target_replicas < live[s.name].view.spec_replicas]
        load: dict[tuple[str, str], float] = {}
        if downs and self.deps.pod_load is not None:
            namespaces = sorted({live[s.name].parsed.ref.namespace for s in downs})
            try:
                load = await asyncio.to_thread(self.deps.pod_load, namespaces)
            except Exception as exc:  # noqa: BLE001 - without load readings the default order applies
                log.warning("no per-pod load for deletion costs: %s", exc)

        async def one(step) -> None:
            v = live[step.name]
            have = v.view.spec_replicas
            if v.conflict:
                actuation[step.name] = (False, CONFLICT, v.conflict)
                return
            if v.parsed.paused:
                actuation[step.name] = (False, "Paused", paused_message(v.parsed, have, "direct"))
                return
            if "demand_unserved" in step.limited_by:
                self._event(events, step.name, v.parsed.ref, "Warning", "NoReplacement",
                            f"{v.parsed.model_id}: demand is not fully served within the inventory, so "
                            f"{v.parsed.target.kind} {v.parsed.target.name} keeps {step.target_replicas} ready "
                            f"replica(s) although the optimizer wants {step.desired_replicas}; they drain only when "
                            "a replacement exists", dedupe="drain")
            if step.target_replicas == have:
                actuation[step.name] = (True, holding_reason(step, v.desired), step.reason)
                return
            try:
                if step.target_replicas < have:
                    ns = v.parsed.ref.namespace
                    costs = deletion_costs(list(v.view.pods), {pod: x for (n, pod), x in load.items() if n == ns})
                    current = {p.name: p.deletion_cost for p in v.view.pods}
                    await self.deps.gateway.set_deletion_costs(ns, costs, current)
                result = await self.deps.gateway.scale(v.parsed.target, step.target_replicas)
            except ApiCallFailed as err:
                self.deps.exporter.count_error("ScaleFailed")
                actuation[step.name] = (False, "ScaleFailed", str(err))
                self._event(events, step.name, v.parsed.ref, "Warning", "ScaleFailed", str(err), dedupe="scale-error")
                return
            up = step.target_replicas > have
            reason = "ScaledUp" if up else "ScaledDown"
            message = (f"{v.parsed.target.kind} {v.parsed.target.name}: {result.before} -> {result.after} replicas; "
                       f"{step.reason}" + (f" ({result.conflicts} conflict(s) resolved)" if result.conflicts else ""))
            events.append((v.parsed.ref, "Normal", reason, message, (step.name, "scale", (reason, message))))
            self.deps.exporter.count_scaling(v.parsed.ref.namespace, v.parsed.ref.name, "up" if up else "down",
                                             reason=reason, accelerator=v.accelerator or "")
            actuation[step.name] = (True, reason, message)
            scaled.add(step.name)
            self.memory.last_actuation[step.name] = rfc3339(self.deps.clock())

        await asyncio.gather(*(one(s) for s in plan.steps))

    # ------------------------------------------------------------------------------------------
    # Loads, status, snapshot.

    def _loads(self, live, capacity, decision, collection, problem) -> dict[str, dict]:
        """Per variant: capacity per replica for the model's mix, demand routed to it, normalized load."""
        out: dict[str, dict] = {}
        if problem is None:
            return out
        # The load is what arrives now, not the forecast the plan was made for: the rate observed where
        # there is one (a carried model has only its last one, already in its workload).
        observed = {m: o.arrival_rate_rps for m, o in collection.models.items() if o.arrival_rate_rps is not None}
        rates = {w.model: {label: r * observed.get(w.model, w.arrival_rate_rps) / w.arrival_rate_rps
                           if w.arrival_rate_rps > 0 else r for label, r in w.bucket_rates_rps().items()}
                 for w in problem.workloads}
        shares = {w.model: {b.label: b.share for b in w.buckets} for w in problem.workloads}
        for var in problem.variants:
            v = live[var.name]
            m = var.model
            if m not in rates:
                continue
            inv_cap = 0.0
            feasible = True
            for label, share in shares[m].items():
                est = capacity.get((var.name, label))
                if est is None or est.max_rate_rps <= 0:
                    feasible = False
                    break
                inv_cap += share / est.max_rate_rps
            per_replica = (1.0 / inv_cap) if feasible and inv_cap > 0 else 0.0
            used = 0.0  # replicas' worth of capacity the routed demand needs
            routed = 0.0
            if decision is not None:
                for label, rate in rates[m].items():
                    w = decision.routing.get((m, label, var.name), 0.0)
                    est = capacity.get((var.name, label))
                    routed += rate * w
                    if w > 0 and est is not None and est.max_rate_rps > 0:
                        used += rate * w / est.max_rate_rps
            ready = v.view.ready_replicas
            out[var.name] = {"capacity": per_replica, "routed": routed, "used": used,
                             "load": (used / ready) if ready > 0 else (None if used > 0 else 0.0)}
        return out

    def _report_live(self, key, v: Live, settings, collection, model_ok, decision, plan, load, actuation, scaled,
                     in_problem, now_text, statuses, events, outcomes) -> None:
        p = v.parsed
        ok_metrics, metrics_why = model_ok.get(p.model_id, (False, "no metrics"))
        conds: dict[str, tuple[str, str, str]] = {
            "TargetResolved": ("True", "TargetFound", f"{p.target.kind} {p.target.name} has "
                                                      f"{v.view.spec_replicas} replicas, {v.view.ready_replicas} ready"
                               + (DEFAULT_TARGET_NOTE if p.target_defaulted else "")),
        }
        obs: VariantObservation | None = collection.variants.get(key)
        if not ok_metrics and obs is not None and not obs.available and obs.reason:
            # this variant's own pods, not every variant's of the model (issue 13); keep a carried-demand note
            metrics_why = obs.reason + (metrics_why[metrics_why.index(CARRY_NOTE):] if CARRY_NOTE in metrics_why else "")
        if ok_metrics:
            conds["MetricsAvailable"] = ("True", "MetricsFound", metrics_why)
        else:
            reason = ("PrometheusError" if not collection.available else
                      {"stale": "MetricsStale", "invalid": "MetricsInvalid"}.get(obs.status if obs else "",
                                                                               "MetricsMissing"))
            conds["MetricsAvailable"] = ("False", reason, f"{metrics_why}; replicas are held, never scaled down "
                                                          "without metrics")
        event = None
        step = self._steps.get(key)
        if v.problem:
            conds["OptimizationReady"] = ("False", v.problem, v.problem_reason)
            event = ("Warning", v.problem, v.problem_reason)
        elif key not in in_problem or decision is None:
            conds["OptimizationReady"] = ("False", "OptimizationFailed", "the optimizer produced no decision this cycle")
        elif not ok_metrics:
            conds["OptimizationReady"] = ("False", "MetricsUnavailable",
                                          f"held at {step.target_replicas if step else v.view.spec_replicas} replicas "
                                          "until metrics return")
            event = ("Warning", "MetricsUnavailable", metrics_why)
        elif decision.unmet_demand_rps.get(p.model_id, 0.0) > 1e-6:
            short = decision.unmet_demand_rps[p.model_id]
            demand = collection.models[p.model_id].arrival_rate_rps if p.model_id in collection.models else None
            of = f" of {demand:.2f}" if demand else ""
            msg = (f"best effort: {v.desired} replicas; {p.model_id} is short by {short:.2f}{of} req/s at the SLO "
                   f"within the inventory" + (f" ({decision.message})" if decision.message else ""))
            conds["OptimizationReady"] = ("True", "BestEffort", msg)
            if key == self._model_owner.get(p.model_id):
                event = ("Warning", "Infeasible", f"{p.model_id}: {short:.2f}{of} req/s cannot be served at the SLO "
                                                  f"with the accelerators available; best-effort allocation applied"
                                                  + (f"; limits: {decision.message}" if decision.message else ""))
        else:
            conds["OptimizationReady"] = ("True", "OptimizationSucceeded",
                                          f"{v.desired} replicas of {v.accelerator} (profile from {v.profile_source})")
        if not v.conflict:
            self.memory.events.pop((key, "conflict"), None)  # a conflict that comes back is told again
        if v.conflict:
            conds["Actuated"] = ("False", CONFLICT, v.conflict)
            conds[CONFLICT] = ("True", "HorizontalPodAutoscalerFound", v.conflict)
            self._event(events, key, p.ref, "Warning", CONFLICT, v.conflict, dedupe="conflict")
        elif p.paused:  # the same in both modes; in metrics mode the published desired replicas hold too
            conds["Actuated"] = ("False", "Paused", paused_message(p, v.view.spec_replicas, settings.actuation_mode))
        elif settings.actuation_mode == "metrics":
            conds["Actuated"] = ("True", "MetricsPublished", "desired replicas published for an HPA/KEDA "
                                                             "(wva_desired_replicas)")
        elif key in actuation:
            ok, reason, msg = actuation[key]
            conds["Actuated"] = ("True" if ok else "False", reason,
                                 msg + (f"; {self._over_inventory[v.accelerator]}"
                                        if v.accelerator in self._over_inventory else ""))
        else:
            conds["Actuated"] = ("False", "NotActuated", "not part of this cycle's plan")
        info = load.get(key, {})
        arrival = None
        mobs: ModelObservation | None = collection.models.get(p.model_id)
        extra: dict[str, Any] = {
            "currentReplicas": v.view.spec_replicas,
            "readyReplicas": v.view.ready_replicas,
            "currentAlloc": {"accelerator": v.accelerator or "", "numReplicas": v.view.spec_replicas},
        }
        price = replica_price(v.parsed, v.accelerator, settings)
        if price is not None:
            extra["replicaCostPerHour"] = round(price, 6)
        if v.desired is not None:
            extra["desiredReplicas"] = v.desired
        if mobs is not None and ok_metrics:
            arrival = mobs.arrival_rate_rps
            extra["observedLoad"] = {k: round(x, 6) for k, x in (("arrivalRateRps", arrival),
                                                                  ("meanInputTokens", mobs.mean_input_tokens),
                                                                  ("meanOutputTokens", mobs.mean_output_tokens))
                                     if x is not None}
            planned = self._planned_rates.get(p.model_id)
            if planned is not None:
                extra["plannedArrivalRateRps"] = round(planned, 6)
        if info.get("capacity") is not None:
            extra["capacityPerReplicaRps"] = round(info["capacity"], 6)
        if info.get("load") is not None:
            extra["normalizedLoad"] = round(info["load"], 6)
        if decision is not None and ok_metrics and arrival:
            extra["routingWeight"] = round(min(1.0, info.get("routed", 0.0) / arrival), 6) if arrival > 0 else 0.0
        if decision is not None and key in in_problem:
            extra["lastOptimizationTime"] = now_text
            extra["desiredOptimizedAlloc"] = {"lastRunTime": now_text, "accelerator": v.accelerator or "",
                                              "numReplicas": v.desired or 0}
        extra["actuation"] = {"applied": conds["Actuated"][0] == "True", "mode": settings.actuation_mode}
        if key in self.memory.last_actuation:
            extra["actuation"]["lastActuationTime"] = self.memory.last_actuation[key]
        self._finish(key, p, conds, now_text, statuses, events, outcomes, extra=extra, event=event)
        o = outcomes[key]
        outcomes[key] = o.model_copy(update={
            "target_found": True, "metrics_available": ok_metrics, "current_replicas": v.view.spec_replicas,
            "ready_replicas": v.view.ready_replicas, "desired_replicas": v.desired,
            "target_replicas": step.target_replicas if step else None, "scaled": key in scaled})

    async def _write(self, statuses: dict[str, tuple[ObjectRef, dict]], events, now: float) -> None:
        """Status patches (skipped when nothing but timestamps changed recently) and queued Events."""
        gw = self.deps.gateway

        def material(body: dict) -> dict:
            # the planned rate moves a little every cycle; /metrics has it live, the status gets it with the rest
            out = {k: v for k, v in body.items() if k not in ("lastOptimizationTime", "plannedArrivalRateRps")}
            if "desiredOptimizedAlloc" in out:
                out["desiredOptimizedAlloc"] = {k: v for k, v in out["desiredOptimizedAlloc"].items()
                                                if k != "lastRunTime"}
            return out

        # an annotated ScaledObject's or HPA's status belongs to KEDA / the HPA controller: its variant
        # reports by Events and /metrics
        statuses = {k: (r, b) for k, (r, b) in statuses.items() if r.kind not in annotated.KINDS}

        async def status(key: str, ref: ObjectRef, body: dict) -> None:
            last = self.memory.last_status.get(key)
            if last is not None and last[1] == material(body) and now - last[0] < STATUS_REFRESH_S:
                return
            try:
                if await gw.patch_status(ref, body):
                    self.memory.last_status[key] = (now, material(body))
                self.memory.status_failing.discard(key)
            except ApiCallFailed as err:
                self.deps.exporter.count_error("StatusWriteFailed")
                log.warning("status of %s not written: %s", key, err)
                if key in self.memory.status_failing:
                    return
                # no Condition can say it while status writes fail: one Warning Event per episode does
                try:
                    await gw.emit_event(ref, "Warning", "StatusWriteFailed",
                                        f"status not written: {err}; decisions and scaling go on, and the status "
                                        "is written again every cycle until the API accepts it")
                    self.memory.status_failing.add(key)
                except ApiCallFailed as event_err:
                    log.warning("event StatusWriteFailed for %s not posted: %s", key, event_err)

        async def event(ref, kind, reason, message, dedupe) -> None:
            try:
                await gw.emit_event(ref, kind, reason, message)
                if dedupe[1] != "scale":
                    self.memory.events[(dedupe[0], dedupe[1])] = (*dedupe[2], self.deps.clock())
                log.info("%s %s/%s: %s", reason, ref.namespace, ref.name, message)
            except ApiCallFailed as err:
                log.warning("event %s for %s/%s not posted: %s", reason, ref.namespace, ref.name, err)

        await asyncio.gather(*(status(k, r, b) for k, (r, b) in statuses.items()),
                             *(event(*e) for e in events))
        self.memory.status_failing &= set(statuses)
        gone = set(self.memory.last_status) - set(statuses)
        for key in gone:
            self.memory.last_status.pop(key, None)

    def _snapshot(self, live, plan, decision, collection, model_ok, load, problem, capacity) -> DecisionSnapshot:
        steps = {s.name: s for s in plan.steps} if plan else {}
        variants = []
        for key, v in live.items():
            step = steps.get(key)
            info = load.get(key, {})
            variants.append(VariantReading(
                namespace=v.parsed.ref.namespace, name=v.parsed.ref.name, model=v.parsed.model_id,
                accelerator=v.accelerator or "", role=v.parsed.role_name, current_replicas=v.view.spec_replicas,
                ready_replicas=v.view.ready_replicas,
                desired_replicas=step.target_replicas if step else v.view.spec_replicas,
                optimal_replicas=v.desired, normalized_load=info.get("load"),
                capacity_per_replica_rps=info.get("capacity"),
                metrics_available=model_ok.get(v.parsed.model_id, (False, ""))[0]))
        models = []
        loaded: dict[str, list[str]] = {}  # per model, its variants with a load (one pass, not one per model)
        for k, v in live.items():
            if k in load:
                loaded.setdefault(v.parsed.model_id, []).append(k)
        slo_models = {s.model for s in problem.slos} if problem is not None else set()
        for m in sorted({v.parsed.model_id for v in live.values()}):
            obs = collection.models.get(m)
            mine = loaded.get(m, [])
            groups: dict[str, list[str]] = {}
            for k in mine:
                groups.setdefault(live[k].parsed.role_name, []).append(k)
            mload = None
            for ks in groups.values():
                ready = sum(live[k].view.ready_replicas for k in ks)
                used = sum(load[k]["used"] for k in ks)
                if ready > 0:
                    mload = max(mload or 0.0, used / ready)
            slo = problem.slo(m) if m in slo_models else None
            q = f"p{(slo.percentile if slo else 90.0):g}"
            models.append(ModelReading(
                model=m, arrival_rate_rps=obs.arrival_rate_rps if obs and model_ok.get(m, (False,))[0] else None,
                planned_arrival_rate_rps=self._planned_rates.get(m) if m in slo_models else None,
                normalized_load=mload, unmet_demand_rps=(decision.unmet_demand_rps.get(m, 0.0) if decision else 0.0),
                slo_percentile=slo.percentile if slo else 90.0, slo_ttft_s=slo.ttft_s if slo else None,
                slo_itl_s=slo.itl_s if slo else None,
                observed_ttft_s=(obs.ttft.quantiles_s.get(q) if obs else None),
                observed_itl_s=(obs.itl.quantiles_s.get(q) if obs else None)))
        routing = []
        if decision is not None:
            for (m, b, var), w in sorted(decision.routing.items()):
                if var in live and w > 0:
                    routing.append(RoutingWeight(model=m, bucket=b, namespace=live[var].parsed.ref.namespace,
                                                 variant=live[var].parsed.ref.name, weight=min(1.0, w)))
        pools = pool_saturation(
            StageLoad(namespace=v.parsed.ref.namespace, pool=v.parsed.inference_pool or v.parsed.model_id,
                      model=v.parsed.model_id, role=v.parsed.role_name, used_replicas=load[k]["used"],
                      ready_replicas=v.view.ready_replicas, fresh=model_ok.get(v.parsed.model_id, (False, ""))[0])
            for k, v in live.items() if k in load)
        accelerators = []
        if problem is not None:
            for a in problem.accelerators:
                in_use = sum(s.target_replicas * live[s.name].parsed.accelerator_count for s in plan.steps
                             if live[s.name].accelerator == a.name)
                accelerators.append(AcceleratorUse(accelerator=a.name, in_use=in_use, available=a.available))
        baseline = homogeneous_baseline(problem, capacity) if problem is not None and decision is not None else None
        return DecisionSnapshot(variants=variants, models=models, routing=routing, pools=pools,
                                accelerators=accelerators,
                                cost_per_hour=decision.cost_per_hour if decision else None,
                                optimizer_gap=decision.gap if decision else None,
                                optimizer_warm_start=decision.warm_started if decision else None,
                                homogeneous_cost_per_hour=baseline[0] if baseline else None,
                                homogeneous_accelerator=baseline[1] if baseline else None)


DEFAULT_TARGET_NOTE = (" (spec.scaleTargetRef is unset: the Deployment named like this VariantAutoscaling, as the "
                       "older llm-d WVA CRD did)")


def replica_price(p: ParsedVariant, accelerator: str | None, settings: OperatorSettings) -> float | None:
    """$/h of one replica as the optimizer prices it: spec.variantCost when set (it overrides the settings),
    else the settings' accelerator price x acceleratorCount, else WVA's default for a datasheet type."""
    if p.variant_cost is not None:
        return p.variant_cost
    entry = settings.accelerator(accelerator) if accelerator else None
    if entry is not None:
        return entry.cost_per_hour * p.accelerator_count
    return WVA_DEFAULT_VARIANT_COST if accelerator in DATASHEETS else None
