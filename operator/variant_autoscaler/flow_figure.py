"""The textbook picture of a max-flow analysis: capacities on one panel, flow / capacity on the other.

Nodes sit in layers left to right (source, prefill groups, decode groups, sink; or hops from the
source on a generic graph) so the direction of traffic reads at a glance. Minimum-cut edges (left)
and saturated edges (right) are red because they are where added capacity can matter.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
from matplotlib.figure import Figure

from optimizer.pd_flow import FlowAnalysis

SATURATED = "#d62728"
CARRYING = "#1f77b4"
IDLE = "#b0b0b0"
MAX_LABELLED_EDGES = 40


def _layers(analysis: FlowAnalysis) -> dict[str, int]:
    """Layer of each node, the sink alone in the last one.

    On an acyclic graph the topological generations, so every edge points right; otherwise hops
    from the source, with nodes the source cannot reach placed after the sink.
    """
    g = nx.DiGraph((e.u, e.v) for e in analysis.edges)
    if nx.is_directed_acyclic_graph(g):
        layer = {n: depth for depth, gen in enumerate(nx.topological_generations(g)) for n in gen}
    else:
        layer = nx.single_source_shortest_path_length(g, analysis.source)
    layer.pop(analysis.sink, None)
    layer[analysis.sink] = max(layer.values()) + 1
    for n in g:
        layer.setdefault(n, layer[analysis.sink] + 1)
    return layer


def _label(x: float | None) -> str:
    return "∞" if x is None else f"{x:.4g}"


def draw_flow(analysis: FlowAnalysis, path: str | Path) -> Path:
    """Write the two-panel figure to ``path`` (format from its suffix) and return the path."""
    layer = _layers(analysis)
    g = nx.DiGraph()
    for n in sorted(layer, key=lambda n: (layer[n], n)):
        g.add_node(n, layer=layer[n])
    for e in analysis.edges:
        g.add_edge(e.u, e.v)
    pos = {n: (x, -y) for n, (x, y) in nx.multipartite_layout(g, subset_key="layer", align="vertical").items()}
    depth = max(layer.values()) + 1
    widest = max(sum(1 for n in layer if layer[n] == d) for d in range(depth))
    side_by_side = depth <= 6
    panel_w, panel_h = min(max(6.0, 1.6 * depth), 40.0), min(max(4.0, 0.9 * widest), 16.0)
    fig = Figure(figsize=(2 * panel_w, panel_h) if side_by_side else (panel_w, 2 * panel_h), layout="constrained")
    axes = fig.subplots(1, 2) if side_by_side else fig.subplots(2, 1)
    labelled = len(analysis.edges) <= MAX_LABELLED_EDGES
    font = 9 if len(layer) <= 30 else 5
    edge_list = [(e.u, e.v) for e in analysis.edges]
    in_cut = {(c.u, c.v) for c in analysis.min_cut}
    for ax, title in zip(axes, ("capacities", "flow / capacity"), strict=True):
        flow_panel = title != "capacities"
        if flow_panel:
            colours = [SATURATED if e.saturated else CARRYING if e.flow > 0 else IDLE for e in analysis.edges]
            widths = [3.0 if e.saturated else 1.5 if e.flow > 0 else 0.8 for e in analysis.edges]
        else:
            colours = [SATURATED if (e.u, e.v) in in_cut else "#404040" for e in analysis.edges]
            widths = [1.5] * len(analysis.edges)
        nx.draw_networkx_nodes(g, pos, ax=ax, node_color="#f2f2f2", edgecolors="#404040",
                               node_size=900 if font > 5 else 120)
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=font)
        nx.draw_networkx_edges(g, pos, ax=ax, edgelist=edge_list, edge_color=colours, width=widths,
                               arrows=True, arrowsize=14 if font > 5 else 6,
                               node_size=900 if font > 5 else 120)
        if labelled:
            text = {
                (e.u, e.v): f"{e.flow:.4g}/{_label(e.capacity)}" if flow_panel else _label(e.capacity)
                for e in analysis.edges
            }
            nx.draw_networkx_edge_labels(g, pos, edge_labels=text, ax=ax, font_size=font, label_pos=0.35,
                                         bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"})
        heading = (f"flow / capacity (max flow {analysis.max_flow:.6g}; red = saturated)" if flow_panel
                   else "capacities (red = minimum cut)")
        ax.set_title(heading)
        ax.set_axis_off()
    fig.suptitle(f"{analysis.source} → {analysis.sink}: bottleneck {analysis.bottleneck}")
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out
