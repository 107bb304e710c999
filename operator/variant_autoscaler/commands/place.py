"""Plan placement on a concrete GPU cluster: HexGen-2-style prefill/decode groups (and the variants
they imply for `plan`), Helix-style layer placement with its max flow and proven bound, and the
ablations (grouping method; KV-link bandwidth from datacenter to cross-region).

Per-layer times come from each machine's inline `layer_profile` in the cluster file, or, with
--profiles ROOT, from measured tables in Helix's format (ROOT/<model profile_dir>/<machine
profile_dir>/{prompt,decode}_bs2time.csv). --output writes everything as JSON, including a plan
fragment (accelerators, models, variants) that `plan` input files can use.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from optimizer.fleet import Role
from optimizer.placement.ablation import bandwidth_sweep, format_rows, format_sweep, grouping_ablation
from optimizer.placement.cluster import Cluster, load_cluster
from optimizer.placement.grouping import GroupingResult, grouping_model, spectral_kl_grouping
from optimizer.placement.layers import LayerPlacementResult, place_layers
from optimizer.placement.throughput import NodeThroughputModel, layer_time_sources
from optimizer.problem import InputError

NAME = "place"
HELP = "plan P/D groups and layer placement on a concrete GPU cluster (max-flow, with ablations)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cluster", metavar="CLUSTER.yaml", help="cluster description (see examples/clusters)")
    parser.add_argument("--model", help="model of the cluster file to place (default: its first)")
    parser.add_argument("--mode", choices=("both", "groups", "layers"), default="both",
                        help="P/D grouping, layer placement or both (default both)")
    parser.add_argument("--profiles", metavar="ROOT", help="measured per-layer tables in Helix's format")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds for layer placement (default 30)")
    parser.add_argument("--group-time-limit", type=float, default=10.0, help="seconds for P/D grouping (default 10)")
    parser.add_argument("--partial-inference", action="store_true",
                        help="let a node continue a token part-way through its layers (Helix's partial rule)")
    parser.add_argument("--no-milp", action="store_true", help="skip the MILP step of layer placement")
    parser.add_argument("--ablation", action="store_true",
                        help="also compare grouping methods and sweep the KV-link bandwidth")
    parser.add_argument("--seeds", type=int, default=10, help="random groupings in the ablation (default 10)")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw the cluster graph with flows (and, with --ablation, FILE_bandwidth.png)")
    parser.add_argument("--output", metavar="FILE.json", help="write groups, layer map, flows, variants as JSON")


def run(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.cluster)
    try:
        model = cluster.model(args.model)
    except InputError as err:
        raise InputError(args.cluster, "--model", err.reason) from None
    if args.profiles is not None and not Path(args.profiles).is_dir():
        raise InputError(args.profiles, "", "--profiles must be a directory of Helix-format tables")
    times = layer_time_sources(cluster, model, args.profiles)
    report: dict = {"cluster": cluster.name, "model": model.name}
    print(f"cluster {cluster.name}: {len(cluster.nodes)} nodes, "
          f"{sum(n.machine.gpus for n in cluster.nodes)} GPUs; model {model.name} ({model.num_layers} layers)")

    grouping = layers = None
    if args.mode in ("both", "groups"):
        gm = grouping_model(cluster, model, times)
        grouping = spectral_kl_grouping(gm, time_limit_s=args.group_time_limit)
        print_grouping(grouping)
        report["grouping"] = grouping.model_dump(mode="json")
        report["plan_fragment"] = plan_fragment(cluster, grouping)
    if args.mode in ("both", "layers"):
        throughput = NodeThroughputModel(cluster, model, times)
        try:
            layers = place_layers(cluster, model, throughput, time_limit_s=args.time_limit,
                                  partial=args.partial_inference, use_milp=not args.no_milp)
        except ValueError as err:
            raise InputError(args.cluster, "nodes", str(err)) from None
        print_layers(layers, cluster)
        report["layer_placement"] = layers.model_dump(mode="json")
    sweep = None
    if args.ablation:
        rows, _ = grouping_ablation(cluster, model, times, seeds=args.seeds,
                                    time_limit_s=args.group_time_limit)
        print("\nP/D grouping ablation (same evaluator for every method):")
        print(format_rows(rows))
        sweep = bandwidth_sweep(cluster, model, times, time_limit_s=min(3.0, args.group_time_limit))
        print("\nKV-link bandwidth sweep (every inter-node link and NIC at the value):")
        print(format_sweep(sweep))
        report["ablation"] = [r.model_dump(mode="json") for r in rows]
        report["bandwidth_sweep"] = [p.model_dump(mode="json") for p in sweep]
    if args.plot:
        written = draw(args.plot, cluster, grouping, layers, sweep)
        print("\nplots: " + ", ".join(written))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, default=_jsonable))
        print(f"wrote {args.output}")
    return 0


def _jsonable(value):
    if isinstance(value, float) and math.isinf(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def plan_fragment(cluster: Cluster, grouping: GroupingResult) -> dict:
    """Accelerators, model and variants in the `plan` input format."""
    gpus: dict[str, int] = {}
    machines: dict[str, object] = {}
    for n in cluster.nodes:
        gpus[n.machine.accelerator] = gpus.get(n.machine.accelerator, 0) + n.machine.gpus
        machines.setdefault(n.machine.accelerator, n.machine)
    used = {v.accelerator for v in grouping.variants}
    model = cluster.model(grouping.model)
    return {
        "accelerators": [machines[a].accelerator_entry(available=gpus[a]).model_dump(mode="json", exclude_none=True)
                         for a in sorted(used)],
        "models": [model.model_spec().model_dump(mode="json", exclude_none=True)],
        "variants": [v.model_dump(mode="json", exclude_none=True) for v in grouping.variants],
    }


def print_grouping(r: GroupingResult) -> None:
    status = "" if r.status == "complete" else ", stopped by the time limit: best found so far"
    print(f"\nP/D groups ({r.method}{status}): max flow {r.max_flow_rps:.3f} requests/s = {r.tokens_per_s:.1f} tokens/s, "
          f"bottleneck: {r.bottleneck}, cost {r.cost_per_hour:.2f}/h")
    for g in r.groups:
        rate = g.prefill_rps if g.role == Role.PREFILL else g.decode_rps
        print(f"  {g.name:<22} {g.role.value:>2}  {len(g.gpus):>2} x {g.accelerator:<10} {rate:8.3f} req/s  "
              f"batch {g.decode_batch:>4}  [{', '.join(g.gpus[:4])}{', ...' if len(g.gpus) > 4 else ''}]")
    if r.idle_gpus:
        print(f"  idle (their type cannot hold the model): {len(r.idle_gpus)} GPUs")
    if r.min_cut:
        print(f"  minimum cut: {', '.join(r.min_cut)}")
    top = sorted(r.kv_schedule, key=lambda s: -s.requests_per_s)[:8]
    if top:
        print("  KV transfer schedule: " + "; ".join(f"{s.prefill}->{s.decode} {s.share:.0%}" for s in top if s.share > 0))
    for v in r.variants:
        print(f"  variant {v.name}: {v.accelerators_per_replica} x {v.accelerator}, role {v.role.value}, "
              f"replicas {v.current_replicas}, max batch {v.max_batch}")


def print_layers(r: LayerPlacementResult, cluster: Cluster) -> None:
    b = r.bound
    milp = f", MILP {b.milp_bound:.2f}" if b.milp_bound is not None else ""
    status = "" if r.status == "complete" else ", stopped by the time limit: best found so far"
    print(f"\nlayer placement ({r.method}, {r.elapsed_s:.1f} s{status}): max flow {r.max_flow:.2f} tokens/s; "
          f"upper bound {b.upper_bound:.2f} (capacity {b.capacity_bound:.2f}{milp}); gap {r.gap:.1%}")
    print(f"  bottleneck: {r.flow.bottleneck_summary()}")
    through = {e["u"].removesuffix(".start"): e["flow"] for e in r.flow.edges if e["kind"] == "compute"}
    for rng in r.placement.ranges:
        node = cluster.node(rng.node)
        print(f"  {rng.node:<12} {node.machine.name:<6} layers [{rng.start:>3}, {rng.end:>3})  "
              f"{r.node_throughput[rng.node]:9.1f} tokens/s  flow {through.get(rng.node, 0.0):9.1f}")


def draw(path: str, cluster: Cluster, grouping: GroupingResult | None, layers: LayerPlacementResult | None,
         sweep) -> list[str]:
    """The cluster graph with flows (layer map and/or P/D groups), and the bandwidth sweep plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    fig = placement_figure(plt, cluster, grouping, layers)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    written = [str(out)]
    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [p.bandwidth_gbps for p in sweep]
        ax.plot(xs, [p.spectral_kl_rps for p in sweep], "o-", label="spectral+KL")
        ax.plot(xs, [p.random_mean_rps for p in sweep], "s--", label="random (mean)")
        ax.plot(xs, [p.greedy_rps for p in sweep], "^:", label="greedy (fastest first)")
        ax.set_xscale("log")
        ax.set_xlabel("inter-node link and NIC bandwidth (Gbps)")
        ax.set_ylabel("max flow (requests/s)")
        ax.set_title(f"{cluster.name}: P/D throughput vs KV-link bandwidth")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        sweep_path = out.with_name(out.stem + "_bandwidth" + (out.suffix or ".png"))
        fig.tight_layout()
        fig.savefig(sweep_path, dpi=110)
        plt.close(fig)
        written.append(str(sweep_path))
    return written


def placement_figure(plt, cluster: Cluster, grouping: GroupingResult | None, layers: LayerPlacementResult | None):
    """The layer map and/or P/D group panels, each with axis labels, units and a legend saying
    which colour is which machine type (the picture is unreadable without it)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    palette = ["tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    colours = {m.name: palette[i % len(palette)] for i, m in enumerate(cluster.spec.machine_types)}
    panels = [p for p in (layers, grouping) if p is not None]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(8 * max(1, len(panels)), 7), squeeze=False)
    used = {n.machine.name for n in cluster.nodes}
    machines = [Patch(color=c, label=f"{name} nodes") for name, c in colours.items() if name in used]
    i = 0
    if layers is not None:
        _draw_layers(axes[0][i], layers, cluster, colours)
        axes[0][i].legend(handles=[*machines, Line2D([], [], color="black", lw=2,
                                                     label="activation link (width = flow)")],
                          title="colour = machine type; shade = share of peak flow", fontsize=7,
                          title_fontsize=7, loc="lower right")
        i += 1
    if grouping is not None:
        _draw_groups(axes[0][i], grouping, colours)
        axes[0][i].legend(handles=[*machines, Line2D([], [], color="tab:blue", lw=3,
                                                     label="KV transfer (width = requests/s)")],
                          title="colour = machine type; dot size = GPUs", fontsize=7, title_fontsize=7,
                          loc="lower center")
    fig.tight_layout()
    return fig


def _draw_layers(ax, r: LayerPlacementResult, cluster: Cluster, colours: dict[str, str]) -> None:
    ranges = sorted(r.placement.ranges, key=lambda x: (x.start, x.node))
    row = {rng.node: i for i, rng in enumerate(ranges)}
    flow_in = {e["u"].removesuffix(".start"): e["flow"] for e in r.flow.edges if e["kind"] == "compute"}
    peak = max(flow_in.values(), default=1.0) or 1.0
    for rng in ranges:
        y = row[rng.node]
        ax.barh(y, rng.layers, left=rng.start, color=colours[cluster.node(rng.node).machine.name],
                alpha=0.35 + 0.65 * flow_in.get(rng.node, 0.0) / peak)
        ax.text(rng.start + 0.2, y, f"{rng.node} {flow_in.get(rng.node, 0.0):.0f}", va="center", fontsize=7)
    for e in r.flow.edges:
        if e["kind"] == "link" and e["flow"] > 1e-9:
            a, b = e["u"].removesuffix(".out"), e["v"].removesuffix(".in")
            end = next(x.end for x in ranges if x.node == a)
            ax.plot([end, end], [row[a], row[b]], color="black", lw=0.5 + 3 * e["flow"] / peak, alpha=0.6)
    ax.set_xlabel("model layer index (each bar: the layers one node holds)")
    ax.set_ylabel("node (bar label: tokens/s through it)")
    ax.set_yticks([])
    ax.set_title(f"layer placement: {r.max_flow:.1f} tokens/s (bound {r.bound.upper_bound:.1f})")


def _draw_groups(ax, r: GroupingResult, colours: dict[str, str]) -> None:
    prefill = [g for g in r.groups if g.role == Role.PREFILL]
    decode = [g for g in r.groups if g.role == Role.DECODE]
    pos = {g.name: (0.0, i) for i, g in enumerate(prefill)}
    pos.update({g.name: (1.0, i * max(1, len(prefill)) / max(1, len(decode))) for i, g in enumerate(decode)})
    peak = max((s.requests_per_s for s in r.kv_schedule), default=1.0) or 1.0
    for s in r.kv_schedule:
        if s.requests_per_s > 0:
            (x0, y0), (x1, y1) = pos[s.prefill], pos[s.decode]
            ax.plot([x0, x1], [y0, y1], color="tab:blue", lw=0.5 + 5 * s.requests_per_s / peak, alpha=0.6)
    for g in r.groups:
        x, y = pos[g.name]
        ax.scatter([x], [y], s=200 + 40 * len(g.gpus), color=colours[g.machine], zorder=3)
        ax.text(x + (0.04 if x else -0.04), y, f"{g.name} ({len(g.gpus)} GPU)", ha="left" if x else "right",
                va="center", fontsize=8)
    ax.set_xlim(-0.6, 1.6)
    ax.set_xticks([0, 1], ["prefill", "decode"])
    ax.set_xlabel("group role (lines: KV cache from prefill to decode groups)")
    ax.set_ylabel("P/D group")
    ax.set_yticks([])
    ax.set_title(f"P/D groups: {r.max_flow_rps:.3f} requests/s, bottleneck {r.bottleneck}")

