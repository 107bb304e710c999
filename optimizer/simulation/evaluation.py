"""Compare policies on one scenario: build each from its spec, run them (in parallel), score them.

Every policy replays the same trace on the same fleet; the runs are independent, so they go to a
process pool (one process per core) and come back as `RunMetrics` plus the replica timeline the
report plots. Ours also runs at each service level of the scenario's Pareto spec; those runs
trace its latency-cost front, scored by normalized hypervolume against every other policy's
single point on the same references.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from optimizer.fleet import Role
from optimizer.simulation.cluster import ClusterSimulator
from optimizer.simulation.hypervolume import normalized_hypervolume, pareto_front
from optimizer.simulation.metrics import RunMetrics, summarize
from optimizer.simulation.policies.hpa import HpaLikePolicy
from optimizer.simulation.policies.inferline import InferLinePolicy
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


@dataclass(frozen=True)
class RunPlan:
    """One run to do: a label, the spec, and the concrete choices filled in from the scenario."""

    label: str
    spec: object
    variant: str | None = None
    service_level: float | None = None
    pareto: bool = False


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
    front: list[tuple[float, float]] = field(default_factory=list)
    hypervolume: dict[str, float] = field(default_factory=dict)
    references: tuple[float, float] = (1.0, 1.0)


def _pd_variants(prep: Prepared) -> list[str]:
    return [v.name for v in prep.problem.variants if v.role is Role.BOTH and prep.mix_capacity_rps[v.name] > 0]


def _cheapest_for(prep: Prepared, rate: float) -> str:
    costs = {v.name: prep.problem.variant_cost_per_hour(v) for v in prep.problem.variants}
    options = _pd_variants(prep)
    if not options:
        raise ValueError(f"no PD variant of {prep.scenario.model} can meet its SLO for the trace's mix")
    return min(options, key=lambda v: (math.ceil(rate / prep.mix_capacity_rps[v]) * costs[v], v))


def plan_runs(prep: Prepared) -> list[RunPlan]:
    plans: list[RunPlan] = []
    for spec in prep.scenario.policies:
        if isinstance(spec, HpaSpec) and spec.variant is None:
            for v in _pd_variants(prep):
                plans.append(RunPlan(spec.name and f"{spec.name}[{v}]" or f"hpa[{v}]", spec, variant=v))
        elif isinstance(spec, StaticPeakSpec):
            v = spec.variant or _cheapest_for(prep, prep.peak_rps)
            plans.append(RunPlan(spec.name or f"static-peak[{v}]", spec, variant=v))
        elif isinstance(spec, HpaSpec):
            plans.append(RunPlan(spec.name or f"hpa[{spec.variant}]", spec, variant=spec.variant))
        elif isinstance(spec, InferLineSpec):
            v = spec.variant or _cheapest_for(prep, prep.mix.arrival_rate_rps * 20)
            plans.append(RunPlan(spec.name or f"inferline[{v}]", spec, variant=v))
        elif isinstance(spec, SaturationSpec):
            plans.append(RunPlan(spec.name or "wva-saturation", spec))
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
    labels = [p.label for p in plans]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"two policies share the name(s) {dupes}: give them distinct `name`s")
    return plans


def build_policy(prep: Prepared, plan: RunPlan):
    spec = plan.spec
    model = prep.scenario.model
    if isinstance(spec, StaticPeakSpec):
        n = spec.replicas or max(1, math.ceil(prep.peak_rps / prep.mix_capacity_rps[plan.variant]))
        return StaticPeakPolicy({plan.variant: n}, name=plan.label)
    if isinstance(spec, HpaSpec):
        target = spec.target
        if target is None:
            if spec.metric != "concurrency":
                raise ValueError(f"{plan.label}: metric {spec.metric} needs an explicit target")
            target = max(1.0, spec.target_fraction * prep.mix_concurrency[plan.variant])
        return HpaLikePolicy(plan.variant, target, metric=spec.metric, interval_s=spec.interval_s,
                             stabilization_s=spec.stabilization_s, name=plan.label)
    if isinstance(spec, InferLineSpec):
        tokens = sum(b.share * (b.input_tokens + b.output_tokens) for b in prep.mix.buckets)
        return InferLinePolicy(plan.variant, model, initial_throughput_tps=prep.mix_capacity_rps[plan.variant] * tokens,
                               base_window_s=spec.base_window_s, horizon_s=spec.horizon_s,
                               interval_s=spec.interval_s, name=plan.label)
    if isinstance(spec, SaturationSpec):
        costs = {v.name: prep.problem.variant_cost_per_hour(v) for v in prep.problem.variants
                 if v.role is Role.BOTH}
        return SaturationPolicy(model, costs, interval_s=spec.interval_s, name=plan.label)
    if isinstance(spec, OursSpec):
        from optimizer.simulation.policies.engine import EnginePolicy

        lead = spec.lead_time_s if spec.lead_time_s is not None else max(prep.cold_start_s.values())
        penalty = spec.change_penalty
        if penalty is None:
            # A change costs about one cold start of a replica and pays only if its saving lasts well
            # beyond that; on the quality benchmark a tenth of the mean price churned and a half held
            # capacity too long.
            prices = [prep.problem.variant_cost_per_hour(v) for v in prep.problem.variants]
            penalty = 0.25 * sum(prices) / len(prices)
        return EnginePolicy(prep.problem, service_level=plan.service_level or spec.service_level,
                            change_penalty=penalty, interval_s=spec.interval_s,
                            scale_down_delay_s=spec.scale_down_delay_s,
                            scale_down_window_s=spec.scale_down_window_s, lead_time_s=lead,
                            input_edges=tuple(prep.scenario.input_edges),
                            rate_windows_s=tuple(spec.rate_windows_s), name=plan.label)
    raise TypeError(f"unknown policy spec {type(spec).__name__}")


def run_one(prep: Prepared, plan: RunPlan) -> RunOutcome:
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
    """Run every planned policy; `on_done` is called as each finishes (for a progress bar)."""
    plans = plan_runs(prep)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(plans)))
    outcomes: dict[str, RunOutcome] = {}
    if jobs == 1:
        for plan in plans:
            out = run_one(prep, plan)
            outcomes[plan.label] = out
            if on_done:
                on_done(out)
    else:
        # The slowest runs first, so the pool does not end waiting on one long run.
        order = sorted(plans, key=lambda p: not isinstance(p.spec, OursSpec))
        with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(prep,)) as pool:
            futures = {pool.submit(_run_in_worker, plan): plan for plan in order}
            for fut in as_completed(futures):
                out = fut.result()
                outcomes[out.plan.label] = out
                if on_done:
                    on_done(out)
    comparison = Comparison(prep, [outcomes[p.label] for p in plans])
    score(comparison)
    return comparison


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


def best_homogeneous_hpa(comparison: Comparison, attainment: float = 0.99) -> RunOutcome | None:
    """The cheapest HPA run that reaches `attainment`, else the one with the highest attainment."""
    hpas = [o for o in comparison.outcomes if isinstance(o.plan.spec, HpaSpec)]
    if not hpas:
        return None
    good = [o for o in hpas if o.metrics.slo_attainment >= attainment]
    if good:
        return min(good, key=lambda o: o.metrics.cost)
    return max(hpas, key=lambda o: (o.metrics.slo_attainment, -o.metrics.cost))
