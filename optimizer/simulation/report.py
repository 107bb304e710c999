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

from optimizer.simulation.evaluation import Comparison, latency_of
from optimizer.simulation.verdict import verdict

TABLE_COLUMNS = ("policy", "cost $", "$/h", "SLO %", "TTFT p90", "ITL p90", "E2E p90", "E2E p99",
                 "changes", "dropped", "pending s", "peak repl")
MODEL_COLUMNS = ("policy", "model", "cost $", "SLO %", "TTFT p99", "ITL p99", "changes", "dropped",
                 "pending s", "GPU-h by type")
TUNING_COLUMNS = ("model", "HPA run (model alone)", "cost $", "SLO %", "chosen")


def table_rows(comparison: Comparison) -> list[tuple[str, ...]]:
    rows = []
    for o in comparison.outcomes:
        m = o.metrics
        rows.append((
            o.plan.label, f"{m.cost:.2f}", f"{m.cost_per_hour:.2f}", f"{100 * m.slo_attainment:.2f}",
            f"{m.ttft_s.p90:.3f}", f"{1000 * m.itl_s.p90:.1f}ms", f"{m.e2e_s.p90:.2f}", f"{m.e2e_s.p99:.2f}",
            str(m.replica_changes), str(m.dropped), f"{m.pending_replica_s:.0f}", str(m.peak_replicas),
        ))
    return rows


def model_rows(comparison: Comparison) -> list[tuple[str, ...]]:
    """Per model of every multi-model run: what it cost, what it met, how long it waited for GPUs."""
    rows = []
    for o in comparison.outcomes:
        for m in o.metrics.per_model:
            gpus = " ".join(f"{k} {v:.1f}" for k, v in m.accelerator_hours.items() if v > 0)
            rows.append((o.plan.label, m.model, f"{m.cost:.2f}", f"{100 * m.slo_attainment:.2f}",
                         f"{m.ttft_s.p99:.3f}", f"{1000 * m.itl_s.p99:.1f}ms", str(m.replica_changes),
                         str(m.dropped), f"{m.pending_replica_s:.0f}", gpus))
    return rows


def tuning_rows(comparison: Comparison) -> list[tuple[str, ...]]:
    chosen = {(m, v, f) for o in comparison.outcomes for m, v, f in o.plan.choices}
    return [(o.plan.model, o.plan.label, f"{o.metrics.cost:.2f}", f"{100 * o.metrics.slo_attainment:.2f}",
             "*" if (o.plan.model, o.plan.variant, o.plan.target_fraction) in chosen else "")
            for o in comparison.tuning]


def _plain(columns: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    rows = [columns, *body]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(comparison: Comparison) -> str:
    parts = [_plain(TABLE_COLUMNS, table_rows(comparison))]
    if comparison.prepared.scenario.multi_model:
        parts += ["", "per model:", _plain(MODEL_COLUMNS, model_rows(comparison))]
    if comparison.tuning:
        parts += ["", "HPA tuning (each model alone on the fleet; * = chosen):",
                  _plain(TUNING_COLUMNS, tuning_rows(comparison))]
    lines = verdict(comparison).lines
    if lines:
        parts += ["", *lines]
    return "\n".join(parts)


def summary(comparison: Comparison) -> dict:
    prep = comparison.prepared
    v = verdict(comparison)
    return {
        "scenario": prep.scenario.name,
        "models": [
            {"model": m.model,
             "trace": {"name": m.trace.name, "requests": len(m.trace), "duration_s": m.trace.duration_s,
                       "peak_rps_60s": m.peak_rps, "mean_rps": m.mix.arrival_rate_rps},
             "length_mix": [b.model_dump() for b in m.mix.buckets],
             "slo": m.slo.model_dump(),
             "per_replica_capacity_rps": {x.name: prep.mix_capacity_rps[x.name] for x in prep.variants_of(m.model)}}
            for m in prep.per_model
        ],
        "inventory": {a.name: a.available for a in prep.problem.accelerators},
        "runs": [
            {"label": o.plan.label, "role": o.plan.role, "router": o.metrics.router,
             **o.metrics.model_dump(exclude={"router"})}
            for o in comparison.outcomes
        ],
        "hpa_tuning": [
            {"model": o.plan.model, "label": o.plan.label, "variant": o.plan.variant,
             "target_fraction": o.plan.target_fraction, "cost": o.metrics.cost,
             "slo_attainment": o.metrics.slo_attainment}
            for o in comparison.tuning
        ],
        "pareto": {
            "latency": prep.scenario.pareto.latency if prep.scenario.pareto else None,
            "references": {"cost": comparison.references[0], "latency_s": comparison.references[1]},
            "front": [{"cost": c, "latency_p90_s": lat} for c, lat in comparison.front],
            "hypervolume": comparison.hypervolume,
            "hypervolume_at_target": comparison.hypervolume_at_target,
        },
        "verdict": None if v.baseline is None else {
            "baseline": v.baseline, "comparable": v.comparable, "ours_cost_saving": v.saving, "lines": v.lines,
        },
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
    for name, fig in report_figures(comparison, plt).items():
        path = folder / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def report_figures(comparison: Comparison, plt) -> dict:
    """The report's figures by file name (the Pareto one only when the scenario has a front), open
    so that callers can save them or inspect their axes."""
    figures = {}
    for name, draw in (("arrival_rate.png", _plot_arrivals), ("replicas.png", _plot_replicas),
                       ("latency.png", _plot_latency), ("pareto.png", _plot_pareto)):
        fig = draw(comparison, plt)
        if fig is not None:
            figures[name] = fig
    return figures


def _plot_arrivals(comparison: Comparison, plt):
    tr = comparison.prepared.trace
    fig, ax = plt.subplots(figsize=(9, 3))
    edges = np.arange(0.0, tr.duration_s + 30.0, 30.0)
    for m in comparison.prepared.per_model:
        counts, _ = np.histogram(m.trace.arrival_s, bins=edges)
        ax.step(edges[:-1] / 60, counts / 30.0, where="post", label=f"{m.model} requests/s (30 s bins)")
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
    from matplotlib import ticker

    outs = comparison.outcomes
    slos = comparison.prepared.problem.slos
    slo = slos[0]
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.35 * len(outs) + 1.5), sharey=True)
    y = np.arange(len(outs))
    for ax, (which, target) in zip(axes, (("ttft", slo.ttft_s), ("itl", slo.itl_s), ("e2e", slo.e2e_s)), strict=True):
        stats = [getattr(o.metrics, f"{which}_s") for o in outs]
        for k, (pct, shade) in enumerate((("p50", 0.9), ("p90", 0.6), ("p99", 0.3))):
            vals = [getattr(s, pct) for s in stats]
            ax.barh(y + (k - 1) * 0.27, vals, height=0.27, color=plt.cm.viridis(shade), label=pct.upper())
        if target is not None and len(slos) == 1:
            ax.axvline(target, color="red", lw=1, ls="--", label="SLO")
        # log scale: one policy's queueing (a TTFT of minutes) would otherwise flatten every other bar
        ax.set_xscale("log")
        # 1-2-5 ticks in plain numbers: the default minor labels (2x10^-2, 3x10^-2, ...) overlap
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("seconds (log scale)", fontsize=7)
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
    ax.set_title(f"Latency-cost front (normalized hypervolume of ours: {hv:.3f}; higher is better, 1 = ideal)"
                 if hv is not None else "Latency-cost front (lower-left is better)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig
