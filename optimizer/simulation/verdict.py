"""The sentence a user reads first: does ours cost less than what they run today, at the same SLO?

A saving only counts when both sides reach the attainment target: a policy that misses the SLO
is cheaper because it under-provisions, not because it decides better. So the verdict compares
costs only between runs at the target and otherwise says plainly who missed it. Wording is
always "costs X % less" or "costs X % more", never a negative saving. With several models it
adds one line per model, and warns when a baseline's models waited for accelerators (pending
replicas), which is what sharing an inventory without a global view costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from optimizer.simulation.evaluation import ATTAINMENT_TARGET, Comparison, best_homogeneous_hpa, meets_target
from optimizer.simulation.metrics import ModelMetrics, RunMetrics


@dataclass(frozen=True)
class Verdict:
    baseline: str | None
    comparable: bool
    """Both ours and the baseline reach the attainment target, so their costs compare."""
    saving: float | None
    """1 - cost(ours) / cost(baseline) when comparable (negative: ours costs more)."""
    lines: list[str]


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def cost_sentence(who: str, ours_cost: float, other: str, other_cost: float) -> str:
    if other_cost <= 0:
        return f"{who} costs ${ours_cost:.2f}; {other} costs nothing"
    diff = 1 - ours_cost / other_cost
    if abs(diff) < 0.0005:
        return f"{who} costs the same as {other} (${ours_cost:.2f})"
    word = "less" if diff > 0 else "more"
    return f"{who} costs {100 * abs(diff):.1f} % {word} than {other} (${ours_cost:.2f} vs ${other_cost:.2f})"


def _at_target(m: RunMetrics | ModelMetrics, target: float) -> bool:
    return meets_target(m, target) if isinstance(m, RunMetrics) else m.slo_attainment >= target


def _worst(m: RunMetrics | ModelMetrics) -> str:
    models = getattr(m, "per_model", [])
    if not models:
        return ""
    worst = min(models, key=lambda x: x.slo_attainment)
    return f", {worst.model} {_pct(worst.slo_attainment)}"


def compare_runs(who: str, ours: RunMetrics | ModelMetrics, other: str, base: RunMetrics | ModelMetrics,
                 target: float = ATTAINMENT_TARGET) -> tuple[bool, str]:
    """(comparable, sentence) for two runs (or one model's share of two runs)."""
    ok_ours, ok_base = _at_target(ours, target), _at_target(base, target)
    att = f"SLO attainment {_pct(ours.slo_attainment)} vs {_pct(base.slo_attainment)}"
    if ok_ours and ok_base:
        return True, f"{cost_sentence(who, ours.cost, other, base.cost)}, {att}"
    if ok_ours:
        return False, (f"{other} misses the {_pct(target)} target ({_pct(base.slo_attainment)}"
                       f"{_worst(base)}); {who} reaches "
                       f"{_pct(ours.slo_attainment)} at ${ours.cost:.2f} (vs ${base.cost:.2f})")
    if ok_base:
        return False, (f"{who} misses the {_pct(target)} target ({_pct(ours.slo_attainment)}{_worst(ours)} vs "
                       f"{_pct(base.slo_attainment)} for {other}): no cost saving is claimed "
                       f"(${ours.cost:.2f} vs ${base.cost:.2f})")
    return False, (f"neither reaches the {_pct(target)} target ({who} {_pct(ours.slo_attainment)} at "
                   f"${ours.cost:.2f}, {other} {_pct(base.slo_attainment)} at ${base.cost:.2f})")


def verdict(comparison: Comparison, ours_label: str = "ours", target: float = ATTAINMENT_TARGET) -> Verdict:
    ours = next((o for o in comparison.outcomes if o.plan.label == ours_label), None)
    best = best_homogeneous_hpa(comparison, target)
    if ours is None or best is None:
        return Verdict(None, False, None, [])
    kind = "per-model HPAs" if best.plan.role == "combined" else "best homogeneous HPA"
    other = f"{kind} ({best.plan.label})"
    comparable, line = compare_runs(ours_label, ours.metrics, other, best.metrics, target)
    lines = [line]
    saving = 1 - ours.metrics.cost / best.metrics.cost if comparable and best.metrics.cost > 0 else None
    by_model = {m.model: m for m in best.metrics.per_model}
    for mine in ours.metrics.per_model:
        theirs = by_model.get(mine.model)
        if theirs is not None:
            lines.append(f"  {mine.model}: " + compare_runs("ours", mine, "its HPA", theirs, target)[1])
    if best.metrics.pending_replica_s > 0:
        waited = ", ".join(f"{m.model} {m.unmet_s:.0f} s" for m in best.metrics.per_model if m.unmet_s > 0)
        lines.append(f"warning: {best.plan.label} asked for replicas the inventory could not place "
                     f"({best.metrics.pending_replica_s:.0f} pending replica-seconds; short: {waited or 'n/a'})")
    capped = [o for o in comparison.outcomes if o is not best and o.metrics.pending_replica_s > 0]
    if capped:
        lines.append("warning: the inventory capped " + ", ".join(
            f"{o.plan.label} ({o.metrics.pending_replica_s:.0f} pending replica-s)" for o in capped)
            + ": these runs asked for replicas that did not fit, so their rows show the fleet, not the policy")
    for run in (o for o in comparison.outcomes if o.plan.role == "combined"):
        picks = ", ".join(f"{m} on {v} at {f:g}x" for m, v, f in run.plan.choices)
        lines.append(f"  ({run.plan.label}: {picks}; ${run.metrics.cost:.2f}, "
                     f"SLO {_pct(run.metrics.slo_attainment)})")
    return Verdict(best.plan.label, comparable, saving, lines)


__all__ = ["Verdict", "compare_runs", "cost_sentence", "meets_target", "verdict"]
