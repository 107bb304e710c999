"""Max-flow analysis of a prefill -> decode flow graph.

Reads {source, sink, edges: [{u, v, capacity}]} (YAML or JSON; capacity null = unlimited) and shows
the max throughput, the saturated minimum cut and the bottleneck stage, the KV transfer split per
P->D pair, spare capacity per edge, and which added capacity would or would not raise throughput.
"""

from __future__ import annotations

import sys

from rich import box
from rich.console import Console

from optimizer.pd_flow import FlowAnalysis, GraphFieldError, analyze, load_flow_graph, resource_name
from optimizer.problem import InputError
from variant_autoscaler.tables import print_table

NAME = "flow"
HELP = "max flow, bottleneck stage, KV split and what to scale in a prefill -> decode graph"


def add_arguments(parser) -> None:
    parser.add_argument("file", help="flow graph, YAML or JSON: {source, sink, edges: [{u, v, capacity}]}")
    parser.add_argument("--json", action="store_true", help="print the analysis as JSON instead of tables")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="also draw the graph: capacities and flow / capacity panels, saturated edges red")


def run(args) -> int:
    graph = load_flow_graph(args.file)
    try:
        analysis = analyze(graph)
    except GraphFieldError as err:
        raise InputError(args.file, err.field, err.reason) from None
    if args.plot:
        from variant_autoscaler.flow_figure import draw_flow

        try:
            draw_flow(analysis, args.plot)
        except (OSError, ValueError) as exc:
            raise InputError(args.plot, "--plot", f"cannot write the figure ({exc})") from None
    if args.json:
        print(analysis.model_dump_json(indent=2))
    else:
        show(analysis, Console(width=max(100, Console().width)))
        if args.plot:
            print(f"figure written to {args.plot}")
    if args.plot and args.json:
        print(f"figure written to {args.plot}", file=sys.stderr)
    return 0


def _num(x: float | None) -> str:
    return "∞" if x is None else f"{x:.6g}"


def show(a: FlowAnalysis, console: Console) -> None:
    """The analysis as rich tables: summary, edges, KV split, what to do."""
    console.print(f"[bold]Max flow {_num(a.max_flow)}[/bold] from {a.source} to {a.sink} "
                  f"({a.layout} graph, {a.algorithm}); bottleneck: [bold]{a.bottleneck}[/bold]; "
                  f"minimum cut capacity {_num(a.min_cut_capacity)}"
                  + ("" if a.min_cut_unique else " (several minimum cuts)"))
    in_cut = {(e.u, e.v) for e in a.min_cut}
    rows, styles = [], []
    for e in a.edges:
        use = "" if e.capacity in (None, 0) else f"{100 * e.flow / e.capacity:.1f}"
        marks = " ".join(m for m, on in (("saturated", e.saturated), ("min-cut", (e.u, e.v) in in_cut),
                                         ("can-shift", e.flow_can_vary)) if on)
        rows.append([f"{e.u} → {e.v}", e.stage, _num(e.capacity), _num(e.flow), _num(e.spare), use, marks])
        styles.append("red" if e.saturated else None)
    print_table(console, "Edges", [(col, "left" if col in ("edge", "stage", "") else "right")
                                   for col in ("edge", "stage", "capacity", "flow", "spare", "use %", "")],
                rows, styles, table_box=box.SIMPLE_HEAD)
    if a.kv_schedule:
        print_table(console, "KV transfer schedule (share of max flow)",
                    [("prefill", "left"), ("decode", "left"), ("flow", "right"), ("share %", "right")],
                    [[s.prefill, s.decode, _num(s.flow), f"{100 * s.share:.1f}"] for s in a.kv_schedule],
                    table_box=box.SIMPLE_HEAD)
    if a.scale_options:
        print_table(console, "Scale options (edges on every minimum cut)",
                    [("resource", "left"), ("max flow if unlimited", "right"), ("gain", "right")],
                    [[resource_name(a, o.u, o.v, o.stage), _num(o.max_flow_if_unlimited), _num(o.gain_if_unlimited)]
                     for o in a.scale_options], table_box=box.SIMPLE_HEAD)
    console.print("[bold]Recommendations[/bold]")
    for line in a.recommendations:
        console.print(f"  • {line}", highlight=False)
