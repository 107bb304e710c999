"""The report of a comparison: a JSON summary, a plain-text table and PNG plots.

Plots: the arrival rate of the trace; replicas over time per variant for each policy (stacked,
so heterogeneous fleets read at a glance); P50/P90/P99 of TTFT, ITL and E2E per policy; and the
latency-cost Pareto front of ours against every other policy's point. Matplotlib runs headless
(Agg) so the report renders on a server without a display.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from optimizer.simulation.evaluation import Comparison, best_homogeneous_hpa, latency_of

TABLE_COLUMNS = ("policy", "cost $", "$/h", "SLO %", "TTFT p90", "ITL p90", "E2E p90", "E2E p99",
                 "changes", "dropped", "peak repl")


def table_rows(comparison: Comparison) -> list[tuple[str, ...]]:
    rows = []
    for o in comparison.outcomes:
        m = o.metrics
        rows.append((
            o.plan.label, f"{m.cost:.2f}", f"{m.cost_per_hour:.2f}", f"{100 * m.slo_attainment:.2f}",
            f"{m.ttft_s.p90:.3f}", f"{1000 * m.itl_s.p90:.1f}ms", f"{m.e2e_s.p90:.2f}", f"{m.e2e_s.p99:.2f}",
            str(m.replica_changes), str(m.dropped), str(m.peak_replicas),
        ))
    return rows


def format_table(comparison: Comparison) -> str:
    rows = [TABLE_COLUMNS, *table_rows(comparison)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(comparison: Comparison) -> dict:
    prep = comparison.prepared
    best = best_homogeneous_hpa(comparison)
    ours = next((o for o in comparison.outcomes if o.plan.label == "ours"), None)
    verdict = None
    if best is not None and ours is not None:
        verdict = {
            "best_homogeneous_hpa": best.plan.label,
            "ours_cost_saving_vs_best_hpa": 1 - ours.metrics.cost / best.metrics.cost if best.metrics.cost else None,
            "ours_attainment": ours.metrics.slo_attainment,
            "best_hpa_attainment": best.metrics.slo_attainment,
        }
    return {
        "scenario": prep.scenario.name,
        "model": prep.scenario.model,
        "trace": {"name": prep.trace.name, "requests": len(prep.trace), "duration_s": prep.trace.duration_s,
                  "peak_rps_60s": prep.peak_rps, "mean_rps": prep.mix.arrival_rate_rps},
        "length_mix": [b.model_dump() for b in prep.mix.buckets],
        "slo": prep.problem.slos[0].model_dump(),
        "per_replica_capacity_rps": prep.mix_capacity_rps,
        "runs": [
            {"label": o.plan.label, "router": o.metrics.router, **o.metrics.model_dump(exclude={"router"})}
            for o in comparison.outcomes
        ],
        "pareto": {
            "latency": prep.scenario.pareto.latency if prep.scenario.pareto else None,
            "references": {"cost": comparison.references[0], "latency_s": comparison.references[1]},
            "front": [{"cost": c, "latency_p90_s": lat} for c, lat in comparison.front],
            "hypervolume": comparison.hypervolume,
        },
        "verdict": verdict,
    }


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(comparison: Comparison, folder: Path) -> list[Path]:
    """Write summary.json, table.txt and the PNG plots; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    path = folder / "summary.json"
    path.write_text(json.dumps(_json_safe(summary(comparison)), indent=2) + "\n")
    written.append(path)
    path = folder / "table.txt"
    path.write_text(format_table(comparison) + "\n")
    written.append(path)
    for name, draw in (("arrival_rate.png", _plot_arrivals), ("replicas.png", _plot_replicas),
                       ("latency.png", _plot_latency), ("pareto.png", _plot_pareto)):
        fig = draw(comparison, plt)
        if fig is None:
            continue
        path = folder / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _plot_arrivals(comparison: Comparison, plt):
    tr = comparison.prepared.trace
    fig, ax = plt.subplots(figsize=(9, 3))
    edges = np.arange(0.0, tr.duration_s + 30.0, 30.0)
    counts, _ = np.histogram(tr.arrival_s, bins=edges)
    ax.step(edges[:-1] / 60, counts / 30.0, where="post", label="requests/s (30 s bins)")
    warm = comparison.prepared.scenario.cluster.warmup_s
    if warm > 0:
        ax.axvspan(0, warm / 60, color="grey", alpha=0.2, label="warm-up (not scored)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("requests/s")
    ax.set_title(f"Arrival rate: {tr.name} ({len(tr)} requests)")
    ax.legend(loc="upper right")
    return fig


def _plot_replicas(comparison: Comparison, plt):
    outs = comparison.outcomes
    variants = sorted({v for o in outs for v, series in o.timeline.items() if any(sum(x) for x in series)})
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    fig, axes = plt.subplots(len(outs), 1, figsize=(9, 1.6 * len(outs) + 0.6), sharex=True, squeeze=False)
    for ax, o in zip(axes[:, 0], outs, strict=True):
        t = np.asarray(o.timeline_s) / 60
        stack = [np.array([r + s for r, s, _ in o.timeline.get(v, [])] or [0] * len(t)) for v in variants]
        ax.stackplot(t, *stack, step="post", colors=[colors[v] for v in variants], labels=variants)
        ax.set_ylabel("replicas", fontsize=7)
        ax.set_title(f"{o.plan.label}: ${o.metrics.cost:.2f}, SLO {100 * o.metrics.slo_attainment:.1f} %",
                     fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("minutes")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(4, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def _plot_latency(comparison: Comparison, plt):
    outs = comparison.outcomes
    slo = comparison.prepared.problem.slos[0]
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.35 * len(outs) + 1.5), sharey=True)
    y = np.arange(len(outs))
    for ax, (which, target) in zip(axes, (("ttft", slo.ttft_s), ("itl", slo.itl_s), ("e2e", slo.e2e_s)), strict=True):
        stats = [getattr(o.metrics, f"{which}_s") for o in outs]
        for k, (pct, shade) in enumerate((("p50", 0.9), ("p90", 0.6), ("p99", 0.3))):
            vals = [getattr(s, pct) for s in stats]
            ax.barh(y + (k - 1) * 0.27, vals, height=0.27, color=plt.cm.viridis(shade), label=pct.upper())
        if target is not None:
            ax.axvline(target, color="red", lw=1, ls="--", label="SLO")
        ax.set_title(f"{which.upper()} (s)", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(y, [o.plan.label for o in outs])
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_pareto(comparison: Comparison, plt):
    spec = comparison.prepared.scenario.pareto
    if spec is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ours = [o for o in comparison.outcomes if o.plan.pareto]
    pts = sorted((o.metrics.cost, latency_of(o.metrics, spec.latency), o.plan.service_level) for o in ours)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", label="ours (service levels)")
        for c, lat, lvl in pts:
            ax.annotate(f"{lvl:g}", (c, lat), textcoords="offset points", xytext=(4, 4), fontsize=7)
    markers = "sD^vP*Xh<>"
    for k, o in enumerate(o for o in comparison.outcomes if not o.plan.pareto):
        lat = latency_of(o.metrics, spec.latency)
        if math.isfinite(lat):
            ax.scatter([o.metrics.cost], [lat], marker=markers[k % len(markers)], s=30,
                       label=f"{o.plan.label} ({100 * o.metrics.slo_attainment:.1f} % SLO)")
    hv = comparison.hypervolume.get("ours (front)")
    ax.set_yscale("log")
    ax.set_xlabel("cost ($ over the scored period)")
    ax.set_ylabel(f"P90 {spec.latency.upper()} (s, log scale)")
    ax.set_title(f"Latency-cost front (normalized hypervolume of ours: {hv:.3f})" if hv is not None else "Latency-cost")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig
