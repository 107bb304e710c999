"""Compare policies on one scenario: build each from its spec, run them (in parallel), score them.

Every policy replays the same trace on the same fleet; the runs are independent, so they go to a
process pool (one process per core) and come back as `RunMetrics` plus the replica timeline the
report plots. Ours also runs at each service level of the scenario's Pareto spec; those runs
trace its latency-cost front, scored by normalized hypervolume against every other policy's
single point on the same references.

With several models the baselines are what users run today: one autoscaler per model, each
unaware of the others. The HPA is tuned as fairly as ours is: each model runs alone on the whole
fleet once per PD variant and target fraction (the *tuning* runs), each model keeps its cheapest
run at the attainment target, and those per-model HPAs then run together on the shared inventory
(the *combined* run), where they compete for the same accelerators first come, first served.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from optimizer.fleet import Role
from optimizer.simulation.cluster import ClusterSimulator
from optimizer.simulation.hypervolume import normalized_hypervolume, pareto_front
from optimizer.simulation.metrics import RunMetrics, summarize
from optimizer.simulation.policies.hpa import HpaLikePolicy
from optimizer.simulation.policies.inferline import InferLinePolicy
from optimizer.simulation.policies.per_model import PerModelPolicies
from optimizer.simulation.policies.saturation import SaturationPolicy
from optimizer.simulation.policies.static_peak import StaticPeakPolicy
from optimizer.simulation.routers import make_router
from optimizer.simulation.scenario import (
    HpaSpec,
    InferLineSpec,
    OursSpec,
    Prepared,
    SaturationSpec,
    StaticPeakSpec,
)

DEFAULT_CHANGE_PENALTY_SHARE = 0.2
"""Ours' default change penalty: a fifth of the replica's own $/h per replica added (removals: `removal_penalty_weight`)."""
ATTAINMENT_TARGET = 0.99
"""SLO attainment a run must reach for its cost to count (the issue's and the field's bar)."""


@dataclass(frozen=True)
class RunPlan:
    """One run to do: a label, the spec, and the concrete choices filled in from the scenario.

    `role`: a `run` is reported; a `tuning` run replays one model alone (`model`) to pick that
    model's HPA; a `combined` run puts the per-model picks (`choices`: model -> (variant, target
    fraction)) together on the shared fleet.
    """

    label: str
    spec: object
    variant: str | None = None
    service_level: float | None = None
    pareto: bool = False
    role: Literal["run", "tuning", "combined"] = "run"
    model: str | None = None
    target_fraction: float | None = None
    choices: tuple[tuple[str, str, float], ...] = ()


@dataclass
class RunOutcome:
    plan: RunPlan
    metrics: RunMetrics
    timeline_s: list[float]
    timeline: dict[str, list[tuple[int, int, int]]]


@dataclass
class Comparison:
    prepared: Prepared
    outcomes: list[RunOutcome] = field(default_factory=list)
    tuning: list[RunOutcome] = field(default_factory=list)
    """Per-model HPA tuning runs (each model alone on the fleet), not part of the table."""
    front: list[tuple[float, float]] = field(default_factory=list)
    hypervolume: dict[str, float] = field(default_factory=dict)
    hypervolume_at_target: dict[str, float] = field(default_factory=dict)
    """The same score counting only runs at the attainment target: a policy that misses the SLO is
    cheap because it under-provisions, and the plain hypervolume rewards that (0 when none is at target)."""
    references: tuple[float, float] = (1.0, 1.0)


def _pd_variants(prep: Prepared, model: str) -> list[str]:
    return [v.name for v in prep.variants_of(model)
            if v.role is Role.BOTH and prep.mix_capacity_rps[v.name] > 0]


def _cheapest_for(prep: Prepared, model: str, rate: float) -> str:
    options = _pd_variants(prep, model)
    if not options:
        raise ValueError(f"no PD variant of {model} can meet its SLO for the trace's mix")
    costs = {v.name: prep.problem.variant_cost_per_hour(v) for v in prep.variants_of(model)}
    return min(options, key=lambda v: (math.ceil(rate / prep.mix_capacity_rps[v]) * costs[v], v))


def _fractions(spec: HpaSpec) -> list[float]:
    return list(spec.target_fractions) if spec.target_fractions else [spec.target_fraction]


def _hpa_label(spec: HpaSpec, variant: str, fraction: float, many: bool) -> str:
    base = spec.name and f"{spec.name}[{variant}]" or f"hpa[{variant}]"
    return f"{base}@{fraction:g}" if many else base


def plan_runs(prep: Prepared) -> list[RunPlan]:
    """The runs of phase one: every reported run and every tuning run (combined runs come later)."""
    plans: list[RunPlan] = []
    multi = prep.scenario.multi_model
    for spec in prep.scenario.policies:
        if multi and getattr(spec, "variant", None) is not None:
            raise ValueError(f"{spec.kind}: `variant` names one model's variant; with several models each "
                             "baseline picks every model's variant itself, so leave it out")
        if isinstance(spec, HpaSpec) and spec.variant is None:
            fractions = _fractions(spec)
            for model in prep.models:
                for v in _pd_variants(prep, model):
                    for f in fractions:
                        label = _hpa_label(spec, v, f, len(fractions) > 1)
                        plans.append(RunPlan(label, spec, variant=v, target_fraction=f,
                                             role="tuning" if multi else "run", model=model if multi else None))
        elif isinstance(spec, StaticPeakSpec):
            if multi:
                if spec.replicas is not None:
                    raise ValueError("static-peak: `replicas` is per variant; leave it out with several models")
                plans.append(RunPlan(spec.name or "static-peak (per model)", spec))
            else:
                model = prep.models[0]
                v = spec.variant or _cheapest_for(prep, model, prep.peak_rps)
                plans.append(RunPlan(spec.name or f"static-peak[{v}]", spec, variant=v))
        elif isinstance(spec, HpaSpec):
            plans.append(RunPlan(spec.name or f"hpa[{spec.variant}]", spec, variant=spec.variant,
                                 target_fraction=_fractions(spec)[0]))
        elif isinstance(spec, InferLineSpec):
            if multi:
                plans.append(RunPlan(spec.name or "inferline (per model)", spec))
            else:
                model = prep.models[0]
                v = spec.variant or _cheapest_for(prep, model, prep.mix.arrival_rate_rps * 20)
                plans.append(RunPlan(spec.name or f"inferline[{v}]", spec, variant=v))
        elif isinstance(spec, SaturationSpec):
            plans.append(RunPlan(spec.name or ("wva-saturation (per model)" if multi else "wva-saturation"), spec))
        elif isinstance(spec, OursSpec):
            label = spec.name or ("ours-no-penalty" if spec.change_penalty == 0 else "ours")
            plans.append(RunPlan(label, spec, service_level=spec.service_level))
    pareto = prep.scenario.pareto
    if pareto is not None:
        base = next((p.spec for p in plans if isinstance(p.spec, OursSpec) and p.spec.change_penalty != 0),
                    OursSpec())
        for level in pareto.service_levels:
            same = next((p for p in plans if p.spec is base and p.service_level == level), None)
            if same is not None:
                plans[plans.index(same)] = RunPlan(same.label, same.spec, service_level=level, pareto=True)
            else:
                plans.append(RunPlan(f"ours@{level:g}", base, service_level=level, pareto=True))
    labels = [p.label for p in plans if p.role != "tuning"] + [
        f"{p.model}/{p.label}" for p in plans if p.role == "tuning"]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"two policies share the name(s) {dupes}: give them distinct `name`s")
    return plans


def meets_target(metrics: RunMetrics, target: float = ATTAINMENT_TARGET) -> bool:
    """At the target overall and, with several models, for every model: a fleet that starves one model
    to serve the others does not meet anyone's SLO."""
    return metrics.slo_attainment >= target and all(m.slo_attainment >= target for m in metrics.per_model)


def pick_tuned(runs: list[RunOutcome], target: float = ATTAINMENT_TARGET) -> RunOutcome:
    """The cheapest run at the attainment target, else the one with the highest attainment."""
    good = [o for o in runs if meets_target(o.metrics, target)]
    if good:
        return min(good, key=lambda o: (o.metrics.cost, o.plan.label))
    return max(runs, key=lambda o: (o.metrics.slo_attainment, -o.metrics.cost, o.plan.label))


def accelerators_held(prep: Prepared, outcome: RunOutcome) -> dict[str, np.ndarray]:
    """Per accelerator type, at each tick: accelerators the run held (ready, starting or draining)."""
    variants = {v.name: v for v in prep.problem.variants}
    per_type: dict[str, np.ndarray] = {}
    for name, series in outcome.timeline.items():
        v = variants[name]
        held = v.accelerators_per_replica * np.asarray([sum(c) for c in series], dtype=np.int64)
        acc = per_type.get(v.accelerator)
        per_type[v.accelerator] = held if acc is None else acc[: len(held)] + held[: len(acc)]
    return per_type


MAX_FIT_COMBINATIONS = 200_000
"""Exhaustive search over per-model HPA picks up to this many combinations (3 models x 9 runs: 729)."""


def fit_to_inventory(prep: Prepared, tuning: list[RunOutcome],
                     target: float = ATTAINMENT_TARGET) -> list[RunOutcome] | None:
    """The cheapest pick of one at-target tuning run per model whose peaks fit the inventory together.

    What a careful platform team would do by hand: give each model the variant that is cheapest
    for it *among those that leave room for the others*. The tuning runs replay each model's own
    trace on the same clock, so their holdings add up tick by tick: a pick fits when that sum never
    exceeds a type's inventory (the picks then never wait for one another). None when some model
    has no run at target, or no combination fits.
    """
    models = list(dict.fromkeys(o.plan.model for o in tuning))
    options = []
    for model in models:
        good = sorted((o for o in tuning if o.plan.model == model and meets_target(o.metrics, target)),
                      key=lambda o: o.metrics.cost)
        if not good:
            return None
        options.append([(o, accelerators_held(prep, o)) for o in good])
    if math.prod(len(o) for o in options) > MAX_FIT_COMBINATIONS:
        options = [o[:3] for o in options]
    inventory = {a.name: a.available for a in prep.problem.accelerators if a.available is not None}
    best: tuple[float, list[RunOutcome]] | None = None
    for combo in itertools.product(*options):
        used: dict[str, np.ndarray] = {}
        for _, held in combo:
            for acc, series in held.items():
                old = used.get(acc)
                used[acc] = series if old is None else old[: len(series)] + series[: len(old)]
        if any(acc in used and int(used[acc].max(initial=0)) > cap for acc, cap in inventory.items()):
            continue
        cost = sum(o.metrics.cost for o, _ in combo)
        if best is None or cost < best[0]:
            best = (cost, [o for o, _ in combo])
    return None if best is None else best[1]


def combined_plans(prep: Prepared, spec: HpaSpec, tuning: list[RunOutcome]) -> list[RunPlan]:
    """The per-model HPAs put together on the shared fleet, picked two ways.

    `per-model best`: each model's cheapest run at target when alone (what per-model tuning gives,
    blind to the others); `best fit to inventory`: the cheapest picks whose peaks fit together
    (`fit_to_inventory`), run only when it differs from the first.
    """
    name = spec.name or "hpa"
    alone = [pick_tuned([o for o in tuning if o.plan.model == m]) for m in dict.fromkeys(o.plan.model for o in tuning)]
    plans = [RunPlan(f"{name} (per-model best)", spec, role="combined",
                     choices=tuple((o.plan.model, o.plan.variant, o.plan.target_fraction) for o in alone))]
    fit = fit_to_inventory(prep, tuning)
    if fit is not None:
        choices = tuple((o.plan.model, o.plan.variant, o.plan.target_fraction) for o in fit)
        if choices != plans[0].choices:
            plans.append(RunPlan(f"{name} (best fit to inventory)", spec, role="combined", choices=choices))
    return plans


def _hpa(prep: Prepared, spec: HpaSpec, variant: str, fraction: float, name: str) -> HpaLikePolicy:
    target = spec.target
    if target is None:
        if spec.metric != "concurrency":
            raise ValueError(f"{name}: metric {spec.metric} needs an explicit target")
        target = max(1.0, fraction * prep.mix_concurrency[variant])
    return HpaLikePolicy(variant, target, metric=spec.metric, interval_s=spec.interval_s,
                         stabilization_s=spec.stabilization_s, name=name)


def _inferline(prep: Prepared, spec: InferLineSpec, model: str, variant: str, name: str) -> InferLinePolicy:
    mix = prep.model(model).mix
    tokens = sum(b.share * (b.input_tokens + b.output_tokens) for b in mix.buckets)
    return InferLinePolicy(variant, model, initial_throughput_tps=prep.mix_capacity_rps[variant] * tokens,
                           base_window_s=spec.base_window_s, horizon_s=spec.horizon_s,
                           interval_s=spec.interval_s, name=name)


def _saturation(prep: Prepared, spec: SaturationSpec, model: str, name: str) -> SaturationPolicy:
    costs = {v.name: prep.problem.variant_cost_per_hour(v) for v in prep.variants_of(model)
             if v.role is Role.BOTH}
    return SaturationPolicy(model, costs, interval_s=spec.interval_s, name=name)


def build_policy(prep: Prepared, plan: RunPlan):
    spec = plan.spec
    multi = len(prep.models) > 1
    if isinstance(spec, StaticPeakSpec):
        if plan.variant is not None:
            n = spec.replicas or max(1, math.ceil(prep.peak_rps / prep.mix_capacity_rps[plan.variant]))
            return StaticPeakPolicy({plan.variant: n}, name=plan.label)
        fleet = {}
        for m in prep.per_model:
            v = _cheapest_for(prep, m.model, m.peak_rps)
            fleet[v] = max(1, math.ceil(m.peak_rps / prep.mix_capacity_rps[v]))
        return StaticPeakPolicy(fleet, name=plan.label)
    if isinstance(spec, HpaSpec):
        if plan.role == "combined":
            return PerModelPolicies([_hpa(prep, spec, v, f, f"{plan.label}/{m}") for m, v, f in plan.choices],
                                    name=plan.label)
        return _hpa(prep, spec, plan.variant, plan.target_fraction or spec.target_fraction, plan.label)
    if isinstance(spec, InferLineSpec):
        if not multi:
            return _inferline(prep, spec, prep.models[0], plan.variant, plan.label)
        return PerModelPolicies(
            [_inferline(prep, spec, m.model, _cheapest_for(prep, m.model, m.mix.arrival_rate_rps * 20),
                        f"{plan.label}/{m.model}") for m in prep.per_model], name=plan.label)
    if isinstance(spec, SaturationSpec):
        if not multi:
            return _saturation(prep, spec, prep.models[0], plan.label)
        return PerModelPolicies([_saturation(prep, spec, m, f"{plan.label}/{m}") for m in prep.models],
                                name=plan.label)
    if isinstance(spec, OursSpec):
        from optimizer.simulation.policies.engine import EnginePolicy

        # Each model plans over its own slowest cold start: capacity for the 8B arrives in 48 s on
        # the example fleet, and holding its plan for the 70B's 110 s cost 3 % of the default demo.
        lead = spec.lead_time_s if spec.lead_time_s is not None else {
            model: max(prep.cold_start_s[v.name] for v in prep.problem.variants if v.model == model)
            for model in prep.models}
        penalty = spec.change_penalty or 0.0
        share = spec.change_penalty_share
        if share is None:
            # A change costs about one cold start of a replica and pays only if its saving lasts well
            # beyond that. Charging each replica a share of its own price weighs a change against
            # its own saving: a flat quarter of the mean price ($10/h on the example fleet) kept 28
            # $1.15/h L4 replicas of the default demo's 8B model for the whole run.
            share = DEFAULT_CHANGE_PENALTY_SHARE if spec.change_penalty is None else 0.0
        return EnginePolicy(prep.problem, service_level=plan.service_level or spec.service_level,
                            change_penalty=penalty, change_penalty_share=share,
                            removal_penalty_weight=spec.removal_penalty_weight, interval_s=spec.interval_s,
                            scale_down_delay_s=spec.scale_down_delay_s,
                            scale_down_window_s=spec.scale_down_window_s, lead_time_s=lead,
                            input_edges=tuple(prep.scenario.input_edges),
                            rate_windows_s=tuple(spec.rate_windows_s), burst_headroom=spec.burst_headroom,
                            capacity_correction=spec.capacity_correction, forecast=spec.forecast,
                            forecast_error_z=spec.forecast_error_z,
                            scale_down_stabilization=spec.scale_down_stabilization,
                            swap_break_even=spec.swap_break_even, name=plan.label)
    raise TypeError(f"unknown policy spec {type(spec).__name__}")


def run_one(prep: Prepared, plan: RunPlan) -> RunOutcome:
    if plan.model is not None:
        prep = prep.alone(plan.model)
    policy = build_policy(prep, plan)
    router = make_router(plan.spec.router)
    result = ClusterSimulator(prep.problem, prep.trace, policy, router, prep.scenario.cluster).run()
    slos = {s.model: s for s in prep.problem.slos}
    return RunOutcome(plan, summarize(result, slos), result.timeline_s, result.timeline)


_WORKER_PREP: Prepared | None = None


def _init_worker(prep: Prepared) -> None:
    global _WORKER_PREP
    _WORKER_PREP = prep


def _run_in_worker(plan: RunPlan) -> RunOutcome:
    assert _WORKER_PREP is not None
    return run_one(_WORKER_PREP, plan)


def compare(prep: Prepared, *, jobs: int | None = None,
            on_done: Callable[[RunOutcome], None] | None = None) -> Comparison:
    """Run every planned policy; `on_done` is called as each finishes (for a progress bar).

    A combined per-model HPA run starts as soon as the tuning runs of its spec are done.
    """
    plans = plan_runs(prep)
    specs_tuned = list({id(p.spec): p.spec for p in plans if p.role == "tuning"}.values())
    waiting = {id(spec): [p for p in plans if p.role == "tuning" and p.spec is spec] for spec in specs_tuned}
    done: dict[tuple, RunOutcome] = {}
    combined: list[RunPlan] = []

    def ready_combined() -> list[RunPlan]:
        out = []
        for spec in specs_tuned:
            todo = waiting[id(spec)]
            if todo and all(_key(p) in done for p in todo):
                out.extend(combined_plans(prep, spec, [done[_key(p)] for p in todo]))
                waiting[id(spec)] = []
        combined.extend(out)
        return out

    def finish(out: RunOutcome) -> None:
        done[_key(out.plan)] = out
        if on_done:
            on_done(out)

    jobs = max(1, min(jobs or os.cpu_count() or 1, len(plans)))
    if jobs == 1:
        for plan in plans:
            finish(run_one(prep, plan))
            for extra in ready_combined():
                finish(run_one(prep, extra))
    else:
        # The slowest runs first, so the pool does not end waiting on one long run.
        order = sorted(plans, key=lambda p: not isinstance(p.spec, OursSpec))
        with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(prep,)) as pool:
            pending = {pool.submit(_run_in_worker, plan) for plan in order}
            for _ in range(len(plans) + 2 * len(specs_tuned) + 1):
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    finish(fut.result())
                for extra in ready_combined():
                    pending.add(pool.submit(_run_in_worker, extra))
    reported = [p for p in plans if p.role == "run"]
    first_hpa = next((k for k, p in enumerate(reported) if isinstance(p.spec, HpaSpec)), 0)
    ordered = reported[:first_hpa] + combined + reported[first_hpa:]
    comparison = Comparison(prep, [done[_key(p)] for p in ordered],
                            tuning=[done[_key(p)] for p in plans if p.role == "tuning"])
    score(comparison)
    return comparison


def _key(plan: RunPlan) -> tuple:
    return plan.role, plan.model, plan.label


def expected_runs(prep: Prepared) -> int:
    """How many runs `compare` does in all (tuning and combined included), for a progress bar."""
    plans = plan_runs(prep)
    return len(plans) + 2 * len({id(p.spec) for p in plans if p.role == "tuning"})


def latency_of(metrics: RunMetrics, which: str) -> float:
    return {"ttft": metrics.ttft_s, "itl": metrics.itl_s, "e2e": metrics.e2e_s}[which].p90


def score(comparison: Comparison) -> None:
    """Pareto front of ours over service levels, and hypervolumes against shared references."""
    spec = comparison.prepared.scenario.pareto
    if spec is None:
        return
    points = {o.plan.label: (o.metrics.cost, latency_of(o.metrics, spec.latency)) for o in comparison.outcomes}
    finite = [p for p in points.values() if math.isfinite(p[1])]
    cost_ref = spec.cost_reference or max((c for c, _ in finite), default=1.0) or 1.0
    lat_ref = spec.latency_reference or max((lat for _, lat in finite), default=1.0) or 1.0
    comparison.references = (cost_ref, lat_ref)
    ours = [points[o.plan.label] for o in comparison.outcomes if o.plan.pareto and math.isfinite(points[o.plan.label][1])]
    comparison.front = pareto_front(ours)
    comparison.hypervolume["ours (front)"] = normalized_hypervolume(ours, cost_ref, lat_ref)
    for o in comparison.outcomes:
        c, lat = points[o.plan.label]
        if not o.plan.pareto and math.isfinite(lat):
            comparison.hypervolume[o.plan.label] = normalized_hypervolume([(c, lat)], cost_ref, lat_ref)
    at_target = {o.plan.label for o in comparison.outcomes if meets_target(o.metrics)}
    ours_ok = [points[o.plan.label] for o in comparison.outcomes
               if o.plan.pareto and o.plan.label in at_target and math.isfinite(points[o.plan.label][1])]
    comparison.hypervolume_at_target["ours (front)"] = normalized_hypervolume(ours_ok, cost_ref, lat_ref) \
        if ours_ok else 0.0
    for o in comparison.outcomes:
        c, lat = points[o.plan.label]
        if not o.plan.pareto and math.isfinite(lat):
            comparison.hypervolume_at_target[o.plan.label] = normalized_hypervolume([(c, lat)], cost_ref, lat_ref) \
                if o.plan.label in at_target else 0.0


def best_homogeneous_hpa(comparison: Comparison, attainment: float = ATTAINMENT_TARGET) -> RunOutcome | None:
    """The HPA baseline ours is judged against.

    One model: the cheapest HPA run that reaches `attainment`, else the one with the highest
    attainment. Several models: the per-model HPAs tuned alone and run together (the combined run).
    """
    combined = [o for o in comparison.outcomes if o.plan.role == "combined"]
    if combined:
        return pick_tuned(combined, attainment)
    hpas = [o for o in comparison.outcomes if isinstance(o.plan.spec, HpaSpec)]
    if not hpas:
        return None
    return pick_tuned(hpas, attainment)
