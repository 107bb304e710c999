"""The token flow graph of a layer placement, built the way Helix builds it, and its max flow.

Each node becomes a chain ``in -> start -> end -> out``: the in/out edges carry its NIC
bandwidth divided by the bytes of one token on the wire (the token id alone when the only peer is
the coordinator, token + activation otherwise), ``start -> end`` its inference throughput with its
layers (``throughput.NodeThroughputModel``). A link ``i.out -> j.in`` exists when j can continue
where i stops and carries link bandwidth / (token + activation) tokens/s; coordinator links carry
tokens only. The coordinator is both ends: ``source -> coordinator.out`` and ``coordinator.in ->
sink`` carry its NIC bandwidth / token bytes.

Which links exist follows Helix's two rules: *exact* (j starts where i ends; what Helix's
published single-cluster graph uses) and *partial* (j holds the layer after i's last one,
``start_j <= end_i < end_j``; j then skips the layers it already holds).
"""

from __future__ import annotations

from collections import defaultdict

import networkx as nx
from networkx.algorithms.flow import edmonds_karp
from pydantic import BaseModel, ConfigDict, Field, model_validator

from optimizer.placement.cluster import Cluster, ModelDescription
from optimizer.placement.throughput import NodeThroughputModel

SOURCE, SINK = "source", "sink"
COORD_OUT, COORD_IN = "coordinator.out", "coordinator.in"


class NodeRange(BaseModel):
    """Layers [start, start + layers) held by one node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: str = Field(min_length=1)
    start: int = Field(ge=0)
    layers: int = Field(gt=0)

    @property
    def end(self) -> int:
        return self.start + self.layers


class LayerPlacement(BaseModel):
    """Contiguous layer ranges on some nodes of a cluster (unlisted nodes hold nothing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    num_layers: int = Field(gt=0)
    ranges: list[NodeRange]

    @model_validator(mode="after")
    def _valid(self) -> LayerPlacement:
        names = [r.node for r in self.ranges]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"ranges: node(s) {dupes} listed more than once")
        for i, r in enumerate(self.ranges):
            if r.end > self.num_layers:
                raise ValueError(f"ranges[{i}]: layers [{r.start}, {r.end}) exceed the model's {self.num_layers}")
        return self

    def uncovered_layers(self) -> list[int]:
        covered = [False] * self.num_layers
        for r in self.ranges:
            for layer in range(r.start, r.end):
                covered[layer] = True
        return [i for i, c in enumerate(covered) if not c]

    def sorted(self) -> LayerPlacement:
        return self.model_copy(update={"ranges": sorted(self.ranges, key=lambda r: (r.start, r.end, r.node))})


def link_exists(a: NodeRange, b: NodeRange, partial: bool) -> bool:
    """Can a token leave node a and continue on node b?"""
    if partial:
        return b.start <= a.end < b.end
    return a.end == b.start


def build_layer_graph(cluster: Cluster, model: ModelDescription, placement: LayerPlacement,
                      throughput: NodeThroughputModel, *, partial: bool = False) -> nx.DiGraph:
    """The Helix-style flow graph of a placement (capacities in tokens/s)."""
    ranges = {r.node: r for r in placement.ranges}
    nodes = {name: cluster.node(name) for name in ranges}
    token, act = model.token_bytes, model.activation_bytes_per_token
    coord = cluster.coordinator_link().bytes_per_s
    net = cluster.spec.network
    g = nx.DiGraph()
    g.add_edge(SOURCE, COORD_OUT, capacity=net.coordinator_nic.bytes_per_s / token, kind="coordinator-nic")
    g.add_edge(COORD_IN, SINK, capacity=net.coordinator_nic.bytes_per_s / token, kind="coordinator-nic")
    succ: dict[str, list[str]] = defaultdict(list)
    pred: dict[str, list[str]] = defaultdict(list)
    order = sorted(ranges, key=lambda n: (ranges[n].start, ranges[n].end, n))
    for a in order:
        for b in order:
            if a != b and link_exists(ranges[a], ranges[b], partial):
                succ[a].append(b)
                pred[b].append(a)
    for name in order:
        r, node = ranges[name], nodes[name]
        nic = node.machine.nic.bytes_per_s
        from_coord = r.start == 0
        to_coord = r.end == model.num_layers
        in_size = token if from_coord and not pred[name] else token + act
        out_size = token if to_coord and not succ[name] else token + act
        g.add_edge(f"{name}.in", f"{name}.start", capacity=nic / in_size, kind="nic")
        g.add_edge(f"{name}.start", f"{name}.end", capacity=throughput.throughput(node.machine.name, r.layers),
                   kind="compute")
        g.add_edge(f"{name}.end", f"{name}.out", capacity=nic / out_size, kind="nic")
        if from_coord:
            g.add_edge(COORD_OUT, f"{name}.in", capacity=coord / token, kind="coordinator-link")
        if to_coord:
            g.add_edge(f"{name}.out", COORD_IN, capacity=coord / token, kind="coordinator-link")
        for b in succ[name]:
            bw = cluster.link(node, nodes[b]).bytes_per_s
            g.add_edge(f"{name}.out", f"{b}.in", capacity=bw / (token + act), kind="link")
    return g


class CutEdge(BaseModel):
    model_config = ConfigDict(frozen=True)

    u: str
    v: str
    capacity: float
    kind: str


class FlowResult(BaseModel):
    """Max flow of a placement graph, the flow on every edge and a minimum cut."""

    model_config = ConfigDict(frozen=True)

    max_flow: float
    edges: list[dict] = Field(description="{u, v, capacity, flow, kind} per edge, the shared JSON format.")
    min_cut: list[CutEdge]

    def bottleneck_summary(self) -> str:
        kinds: dict[str, float] = defaultdict(float)
        for e in self.min_cut:
            kinds[e.kind] += e.capacity
        parts = [f"{kind} ({cap:.1f} tokens/s over {sum(1 for e in self.min_cut if e.kind == kind)} edges)"
                 for kind, cap in sorted(kinds.items(), key=lambda kv: -kv[1])]
        return "; ".join(parts) if parts else "none"


def max_flow_value(g: nx.DiGraph) -> float:
    """The max flow alone (the local search calls this thousands of times)."""
    if SOURCE not in g or SINK not in g:
        return 0.0
    return float(nx.maximum_flow_value(g, SOURCE, SINK, flow_func=edmonds_karp))


def solve_flow(g: nx.DiGraph) -> FlowResult:
    """Max flow with its per-edge flows and the minimum cut nearest the source."""
    value, flow = nx.maximum_flow(g, SOURCE, SINK, flow_func=edmonds_karp)
    residual = nx.DiGraph()
    for u, v, d in g.edges(data=True):
        f = flow[u][v]
        if d["capacity"] - f > 1e-9 * max(1.0, d["capacity"]):
            residual.add_edge(u, v)
        if f > 1e-12:
            residual.add_edge(v, u)
    reach = nx.descendants(residual, SOURCE) | {SOURCE} if SOURCE in residual else {SOURCE}
    cut = [CutEdge(u=u, v=v, capacity=d["capacity"], kind=d.get("kind", "edge"))
           for u, v, d in g.edges(data=True) if u in reach and v not in reach]
    edges = [{"u": u, "v": v, "capacity": d["capacity"], "flow": float(flow[u][v]), "kind": d.get("kind", "edge")}
             for u, v, d in g.edges(data=True)]
    return FlowResult(max_flow=float(value), edges=edges, min_cut=cut)
