"""Max-flow analysis of prefill -> decode serving: what the P/D groups and KV links can carry together.

Disaggregated serving sends every request through a prefill group, a KV-cache transfer and a decode
group. As a flow network (source -> P -> D -> sink, capacities in requests/s) the max flow is the
throughput the fleet sustains, a saturated minimum cut is the set of resources that caps it, and the
flow on each P->D edge is how KV transfers should be split. Capacity added off a minimum cut cannot
raise throughput; the recommendations say so in words, because that is the costly mistake to avoid.

The same analysis runs on any directed source-sink graph (e.g. the Helix placement graphs in
../shared/data/maxflow); there an edge's stage is named by its position between source and sink.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Literal

import networkx as nx
import numpy as np
from networkx.algorithms import flow as nx_flow
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from optimizer.problem import InputError, format_validation_error, read_document
from optimizer.scaled_max_flow import ArcLayout, MaxFlow, UnboundedFlow, solve

Stage = Literal["prefill", "kv_links", "decode", "off_path"]
Bottleneck = Literal["prefill", "kv_links", "decode", "mixed"]
Layout = Literal["prefill-decode", "generic"]

# The engine behind every analysis: scipy's compiled Dinic on integer units, refined until the
# rounding is certified negligible (optimizer.scaled_max_flow). Nodes are numbered in a canonical
# order (hops from the source, then name), so the split depends on the graph, not on the file's
# edge order; on the seed example it equals networkx's Edmonds-Karp split (tests/test_pd_flow.py).
ENGINE = "scipy_dinic"
# networkx's algorithms, kept for drawing and for small-graph cross-checks (max_flow_value).
ALGORITHMS = {
    "edmonds_karp": nx_flow.edmonds_karp,
    "preflow_push": nx_flow.preflow_push,
    "shortest_augmenting_path": nx_flow.shortest_augmenting_path,
    "boykov_kolmogorov": nx_flow.boykov_kolmogorov,
    "dinitz": nx_flow.dinitz,
}
_STAGE_ORDER: tuple[Stage, ...] = ("prefill", "kv_links", "decode")
_STAGE_WORDS = {
    "prefill-decode": {"prefill": "prefill", "kv_links": "KV link", "decode": "decode"},
    "generic": {"prefill": "source-side", "kv_links": "mid-graph", "decode": "sink-side"},
}


class GraphFieldError(ValueError):
    """A flow graph that cannot be analysed, naming the field at fault (e.g. ``edges[3].u``)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}")


class Edge(BaseModel):
    """One directed edge; ``capacity`` null (or .inf) means unlimited, as in networkx."""

    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)

    u: str = Field(min_length=1, description="Tail node.")
    v: str = Field(min_length=1, description="Head node.")
    capacity: float | None = Field(ge=0, description="Units per second (requests/s for P/D); null = unlimited.")

    @field_validator("capacity")
    @classmethod
    def _unlimited_as_none(cls, c: float | None) -> float | None:
        return None if c is None or math.isinf(c) else c


class FlowGraph(BaseModel):
    """A source-sink flow network, the JSON/YAML format of `variant-autoscaler flow`.

    Extra keys (a recorded ``max_flow``, per-edge ``flow``) are ignored, so solver outputs can be
    re-analysed as they are.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)

    source: str = Field(min_length=1)
    sink: str = Field(min_length=1)
    nodes: list[str] | None = Field(default=None, description="Optional: every edge endpoint must be listed.")
    edges: list[Edge] = Field(min_length=1)
    # The arrays the engine reads, built once by validation (build a new FlowGraph to change edges).
    _compiled: CompiledGraph = PrivateAttr()

    @model_validator(mode="after")
    def _consistent(self) -> FlowGraph:
        if self.source == self.sink:
            raise GraphFieldError("sink", f"must differ from source ({self.source!r})")
        known = set(self.nodes) if self.nodes is not None else None
        seen: dict[tuple[str, str], int] = {}
        for i, e in enumerate(self.edges):
            for end in ("u", "v"):
                name = getattr(e, end)
                if known is not None and name not in known:
                    raise GraphFieldError(f"edges[{i}].{end}", f"unknown node {name!r} (not listed in nodes)")
            if e.u == e.v:
                raise GraphFieldError(f"edges[{i}]", f"self-loop on {e.u!r}")
            if (e.u, e.v) in seen:
                raise GraphFieldError(f"edges[{i}]", f"duplicate edge {e.u} -> {e.v} (also edges[{seen[e.u, e.v]}])")
            seen[e.u, e.v] = i
        if self.source not in {e.u for e in self.edges}:
            raise GraphFieldError("source", f"{self.source!r} is not the start of any edge")
        if self.sink not in {e.v for e in self.edges}:
            raise GraphFieldError("sink", f"{self.sink!r} is not the end of any edge")
        hops = _hops_from(self.source, self._successors())
        if self.sink not in hops:
            raise GraphFieldError("sink", f"{self.sink!r} cannot be reached from source {self.source!r}")
        self._compiled = CompiledGraph.of(self, hops)
        return self

    def _successors(self) -> dict[str, list[str]]:
        succ: dict[str, list[str]] = {}
        for e in self.edges:
            succ.setdefault(e.u, []).append(e.v)
        return succ

    def _predecessors(self) -> dict[str, list[str]]:
        pred: dict[str, list[str]] = {}
        for e in self.edges:
            pred.setdefault(e.v, []).append(e.u)
        return pred

    def to_networkx(self) -> nx.DiGraph:
        """DiGraph in the canonical order (nodes by hops from source, then name; edges by tail then
        head), for drawing and for cross-checks with networkx's algorithms."""
        c = self._compiled
        g = nx.DiGraph()
        g.add_nodes_from(c.names)
        for (u, v), cap in zip(c.ends, c.capacities, strict=True):
            g.add_edge(u, v, **({} if cap is None else {"capacity": cap}))
        return g


class CompiledGraph:
    """A validated graph as arrays: nodes in canonical order (hops from the source, then name),
    edges sorted by tail then head, capacities with ``inf`` for unlimited, and the arc layout."""

    def __init__(self, names: list[str], ends: list[tuple[str, str]], capacities: list[float | None],
                 tail: np.ndarray, head: np.ndarray, source: int, sink: int):
        self.names, self.ends, self.capacities = names, ends, capacities
        self.source, self.sink = source, sink
        self.capacity = np.array([np.inf if c is None else c for c in capacities], dtype=np.float64)
        self.layout = ArcLayout.from_edges(len(names), tail, head)

    @classmethod
    def of(cls, graph: FlowGraph, hops: dict[str, int]) -> CompiledGraph:
        far = len(hops) + 1
        names = sorted({e.u for e in graph.edges} | {e.v for e in graph.edges},
                       key=lambda n: (hops.get(n, far), n))
        index = {n: i for i, n in enumerate(names)}
        edges = sorted(graph.edges, key=lambda e: (index[e.u], index[e.v]))
        tail = np.fromiter((index[e.u] for e in edges), dtype=np.int64, count=len(edges))
        head = np.fromiter((index[e.v] for e in edges), dtype=np.int64, count=len(edges))
        return cls(names, [(e.u, e.v) for e in edges], [e.capacity for e in edges], tail, head,
                   index[graph.source], index[graph.sink])

    def solve(self, capacity: np.ndarray | None = None) -> MaxFlow:
        try:
            return solve(self.layout, self.capacity if capacity is None else capacity, self.source, self.sink)
        except UnboundedFlow:
            raise _unbounded() from None


def load_flow_graph(path: str | Path) -> FlowGraph:
    """Read a YAML or JSON flow graph; any problem becomes one InputError naming file and field."""
    try:
        data = read_document(path)
    except InputError as err:
        raise InputError(err.source, err.field, _one_line(err.reason)) from None
    try:
        return FlowGraph.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, GraphFieldError):
            raise InputError(str(path), cause.field, cause.reason) from None
        field, reason = format_validation_error(err)[0]
        raise InputError(str(path), field, reason) from None


def _one_line(reason: str) -> str:
    """A parser message on one line: YAML errors quote the offending text and a caret below it."""
    kept = [ln.strip() for ln in reason.splitlines() if ln.strip() and not ln.startswith("    ")]
    return " ".join(ln for ln in kept if set(ln) != {"^"})


def build_pd_graph(
    prefill: dict[str, float],
    decode: dict[str, float],
    kv_links: dict[tuple[str, str], float] | None,
    kv_bytes_per_request: float,
) -> FlowGraph:
    """The P/D flow graph: source -> prefill group -> decode group -> sink, capacities in requests/s.

    ``prefill``/``decode`` map each group to the request rate it sustains (from the capacity model);
    a KV link of ``bandwidth`` bytes/s carries ``bandwidth / kv_bytes_per_request`` requests/s. With
    no ``kv_links`` every P group reaches every D group over an unlimited link (shared fabric).
    """
    if not prefill:
        raise GraphFieldError("prefill", "at least one prefill group is needed")
    if not decode:
        raise GraphFieldError("decode", "at least one decode group is needed")
    if not (kv_bytes_per_request > 0 and math.isfinite(kv_bytes_per_request)):
        raise GraphFieldError("kv_bytes_per_request", f"must be a positive number, got {kv_bytes_per_request!r}")
    source, sink = "source", "sink"
    for field, groups in (("prefill", prefill), ("decode", decode)):
        for name, rate in groups.items():
            if name in (source, sink):
                raise GraphFieldError(f"{field}[{name!r}]", f"{name!r} is reserved for the graph's {name}")
            if not (rate >= 0 and math.isfinite(rate)):
                raise GraphFieldError(f"{field}[{name!r}]", f"rate must be a finite number >= 0, got {rate!r}")
    both = sorted(set(prefill) & set(decode))
    if both:
        raise GraphFieldError("decode", f"group name(s) {both} also used for prefill groups")
    edges = [Edge(u=source, v=p, capacity=rate) for p, rate in prefill.items()]
    if kv_links is None:
        edges += [Edge(u=p, v=d, capacity=None) for p in prefill for d in decode]
    else:
        for (p, d), bandwidth in kv_links.items():
            where = f"kv_links[{(p, d)!r}]"
            if p not in prefill:
                raise GraphFieldError(where, f"unknown prefill group {p!r} (known: {sorted(prefill)})")
            if d not in decode:
                raise GraphFieldError(where, f"unknown decode group {d!r} (known: {sorted(decode)})")
            if not bandwidth >= 0:
                raise GraphFieldError(where, f"bandwidth must be >= 0 bytes/s, got {bandwidth!r}")
            edges.append(Edge(u=p, v=d, capacity=bandwidth / kv_bytes_per_request))
    edges += [Edge(u=d, v=sink, capacity=rate) for d, rate in decode.items()]
    return FlowGraph(source=source, sink=sink, edges=edges)


class EdgeFlow(BaseModel):
    """One edge of the analysed graph with its flow in the reported maximum flow."""

    model_config = ConfigDict(frozen=True)

    u: str
    v: str
    capacity: float | None = Field(description="None = unlimited.")
    flow: float
    spare: float | None = Field(description="capacity - flow; None for unlimited edges.")
    saturated: bool
    stage: Stage
    position: float | None = Field(description="0 at the source .. 1 at the sink; None off every source-sink path.")
    flow_can_vary: bool = Field(description="Another maximum flow puts a different flow on this edge.")


class CutEdge(BaseModel):
    model_config = ConfigDict(frozen=True)

    u: str
    v: str
    capacity: float
    stage: Stage


class KVShare(BaseModel):
    """Share of the throughput that one prefill group hands to one decode group."""

    model_config = ConfigDict(frozen=True)

    prefill: str
    decode: str
    flow: float
    share: float = Field(description="Fraction of the max flow, 0..1.")


class ScaleOption(BaseModel):
    """An edge on every minimum cut: raising its capacity alone raises throughput."""

    model_config = ConfigDict(frozen=True)

    u: str
    v: str
    stage: Stage
    max_flow_if_unlimited: float | None = Field(description="Max flow with this edge unlimited; None = unbounded.")
    gain_if_unlimited: float | None = Field(description="The rise in max flow that buys; None = unbounded.")


class FlowAnalysis(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    sink: str
    layout: Layout = Field(description="prefill-decode when every edge is source->P, P->D or D->sink.")
    algorithm: str = ENGINE
    max_flow: float
    max_flow_gap: float = Field(0.0, description=(
        "Certified rounding bound: the true max flow lies in [max_flow, max_flow + max_flow_gap] "
        "(the engine works in integer units; see optimizer.scaled_max_flow)."))
    edges: list[EdgeFlow]
    min_cut: list[CutEdge] = Field(description="Saturated edges leaving the nodes the source still reaches.")
    min_cut_capacity: float
    sink_side_min_cut: list[CutEdge] = Field(description="Saturated edges entering the nodes that still reach the sink.")
    min_cut_unique: bool
    bottleneck: Bottleneck
    kv_schedule: list[KVShare] = Field(description="Flow share per P->D pair; empty for generic graphs.")
    scale_options: list[ScaleOption]
    several_optimal_splits: bool = Field(description="Other maximum flows exist; the split is the engine's (Dinic, "
                                                     "BFS levels over the canonical node order).")
    recommendations: list[str]


def max_flow_value(graph: FlowGraph, algorithm: str = ENGINE) -> float:
    """The max-flow value alone: the compiled engine by default, or a networkx algorithm by name."""
    if algorithm == ENGINE:
        return graph._compiled.solve().value
    if algorithm not in ALGORITHMS:
        known = sorted([ENGINE, *ALGORITHMS])
        raise GraphFieldError("algorithm", f"unknown algorithm {algorithm!r} (known: {known})")
    try:
        return float(nx.maximum_flow_value(graph.to_networkx(), graph.source, graph.sink,
                                           flow_func=ALGORITHMS[algorithm]))
    except nx.NetworkXUnbounded:
        raise _unbounded() from None


def analyze(graph: FlowGraph) -> FlowAnalysis:
    """Max flow, its split, the saturated cuts, the bottleneck stage and what to scale."""
    compiled = graph._compiled
    s, t = graph.source, graph.sink
    result = compiled.solve()
    value = result.value
    caps, ends = compiled.capacities, compiled.ends
    flows = result.flow.tolist()
    forward, backward = result.forward.tolist(), result.backward.tolist()
    arcs = _residual_arcs(ends, forward, backward)
    source_side = _reach(s, arcs["out"])
    sink_side = _reach(t, arcs["in"])
    stages, positions, layout = _stages(graph, ends)
    on_path = [st != "off_path" for st in stages]

    def cut(inside, outside) -> list[CutEdge]:
        return [
            CutEdge(u=u, v=v, capacity=caps[i], stage=stages[i])
            for i, (u, v) in enumerate(ends)
            if on_path[i] and inside(u) and outside(v)
        ]

    src_cut = cut(lambda n: n in source_side, lambda n: n not in source_side)
    snk_cut = cut(lambda n: n not in sink_side, lambda n: n in sink_side)
    varies = [_flow_can_vary(i, ends[i], forward[i], backward[i], arcs) for i in range(len(ends))]
    edges = [
        EdgeFlow(
            u=u, v=v, capacity=caps[i], flow=flows[i],
            spare=None if caps[i] is None else max(caps[i] - flows[i], 0.0),
            saturated=not forward[i], stage=stages[i], position=positions[i], flow_can_vary=varies[i],
        )
        for i, (u, v) in enumerate(ends)
    ]
    cut_stages = {e.stage for e in src_cut + snk_cut}
    bottleneck: Bottleneck = cut_stages.pop() if len(cut_stages) == 1 else "mixed"
    options = _scale_options(compiled, stages, on_path, source_side, sink_side, value)
    schedule = []
    if layout == "prefill-decode":
        schedule = [
            KVShare(prefill=e.u, decode=e.v, flow=e.flow, share=e.flow / value if value > 0 else 0.0)
            for e in edges if e.stage == "kv_links"
        ]
    analysis = FlowAnalysis(
        source=s, sink=t, layout=layout, max_flow=value, max_flow_gap=result.gap, edges=edges,
        min_cut=src_cut, min_cut_capacity=math.fsum(e.capacity for e in src_cut),
        sink_side_min_cut=snk_cut,
        min_cut_unique={(e.u, e.v) for e in src_cut} == {(e.u, e.v) for e in snk_cut},
        bottleneck=bottleneck, kv_schedule=schedule, scale_options=options,
        several_optimal_splits=any(varies), recommendations=[],
    )
    return analysis.model_copy(update={"recommendations": _recommendations(analysis)})


def _unbounded() -> GraphFieldError:
    return GraphFieldError("edges", "some source-to-sink path has only unlimited edges: the max flow is infinite")


def _hops_from(start: str, neighbours: dict[str, list[str]]) -> dict[str, int]:
    hops = {start: 0}
    queue = deque([start])
    while queue:
        n = queue.popleft()
        for m in neighbours.get(n, ()):
            if m not in hops:
                hops[m] = hops[n] + 1
                queue.append(m)
    return hops


def _residual_arcs(ends, forward, backward) -> dict[str, dict[str, list[tuple[str, int]]]]:
    """Residual arcs tagged with their edge index, as out- and in-adjacency lists."""
    out: dict[str, list[tuple[str, int]]] = {}
    inn: dict[str, list[tuple[str, int]]] = {}
    for i, (u, v) in enumerate(ends):
        for ok, a, b in ((forward[i], u, v), (backward[i], v, u)):
            if ok:
                out.setdefault(a, []).append((b, i))
                inn.setdefault(b, []).append((a, i))
    return {"out": out, "in": inn}


def _reach(start: str, adjacency, skip_edge: int | None = None) -> set[str]:
    seen = {start}
    queue = deque([start])
    while queue:
        n = queue.popleft()
        for m, i in adjacency.get(n, ()):
            if i != skip_edge and m not in seen:
                seen.add(m)
                queue.append(m)
    return seen


def _flow_can_vary(i: int, end: tuple[str, str], forward: bool, backward: bool, arcs) -> bool:
    """True when a residual cycle through edge i exists, i.e. another max flow moves its flow.

    Raising the flow on u->v needs spare capacity and a residual path v ~> u; lowering it needs
    flow on it and a path u ~> v. Either path must avoid edge i's own arcs (that is no cycle).
    """
    u, v = end
    if forward and u in _reach(v, arcs["out"], skip_edge=i):
        return True
    return backward and v in _reach(u, arcs["out"], skip_edge=i)


def _stages(graph: FlowGraph, ends) -> tuple[list[Stage], list[float | None], Layout]:
    """Stage of each edge from its position between source (0) and sink (1), in hops.

    On a P/D graph this is exact: source->P sits at 0, P->D at 1/2, D->sink at 1.
    """
    from_source = _hops_from(graph.source, graph._successors())
    to_sink = _hops_from(graph.sink, graph._predecessors())
    stages: list[Stage] = []
    positions: list[float | None] = []
    for u, v in ends:
        if u not in from_source or v not in to_sink:
            stages.append("off_path")
            positions.append(None)
            continue
        a, b = from_source[u], to_sink[v]
        pos = 0.5 if a + b == 0 else a / (a + b)
        positions.append(pos)
        stages.append("prefill" if pos < 1 / 3 else "decode" if pos > 2 / 3 else "kv_links")
    s, t = graph.source, graph.sink
    firsts = {v for u, v in ends if u == s}
    lasts = {u for u, v in ends if v == t}
    pd = not (firsts & lasts) and t not in firsts and all(
        (u == s and v in firsts) or (u in firsts and v in lasts) or (u in lasts and v == t) for u, v in ends
    )
    return stages, positions, "prefill-decode" if pd else "generic"


def _scale_options(compiled, stages, on_path, source_side, sink_side, value) -> list[ScaleOption]:
    """Edges on every minimum cut (tail reached from the source, head reaching the sink).

    Each is probed by making it unlimited and solving again: the gain it can buy before another
    resource limits the flow.
    """
    options = []
    for i, (u, v) in enumerate(compiled.ends):
        if not (on_path[i] and u in source_side and v in sink_side):
            continue
        relaxed = compiled.capacity.copy()
        relaxed[i] = np.inf
        try:
            new = compiled.solve(relaxed).value
        except GraphFieldError:
            new = None
        options.append(ScaleOption(
            u=u, v=v, stage=stages[i], max_flow_if_unlimited=new,
            gain_if_unlimited=None if new is None else max(new - value, 0.0),
        ))
    options.sort(key=lambda o: (-(math.inf if o.gain_if_unlimited is None else o.gain_if_unlimited), o.u, o.v))
    return options


def _num(x: float) -> str:
    return f"{x:.6g}"


def resource_name(analysis: FlowAnalysis, u: str, v: str, stage: Stage) -> str:
    """How a person calls an edge: 'decode group D1' on a P/D graph, 'edge a -> b' otherwise."""
    if analysis.layout == "prefill-decode":
        if stage == "prefill":
            return f"prefill group {v}"
        if stage == "decode":
            return f"decode group {u}"
        return f"KV link {u} -> {v}"
    return f"edge {u} -> {v}"


def _cut_phrase(analysis: FlowAnalysis, cut: list[CutEdge]) -> str:
    stages = {e.stage for e in cut}
    names = ", ".join(f"{e.u} -> {e.v}" for e in cut)
    if len(stages) == 1:
        stage = next(iter(stages))
        all_of_stage = {(e.u, e.v) for e in analysis.edges if e.stage == stage}
        if all_of_stage == {(e.u, e.v) for e in cut}:
            return f"all {_STAGE_WORDS[analysis.layout][stage]} edges are saturated ({names})"
    return f"every source-to-sink path crosses a saturated edge among {names}"


def _recommendations(a: FlowAnalysis) -> list[str]:
    words = _STAGE_WORDS[a.layout]
    out = []
    total = _num(a.min_cut_capacity)
    if a.bottleneck == "mixed":
        spans = sorted({e.stage for e in a.min_cut + a.sink_side_min_cut}, key=_STAGE_ORDER.index)
        out.append(f"Max flow {_num(a.max_flow)} is limited by several stages at once "
                   f"({', '.join(words[s] for s in spans)}): {_cut_phrase(a, a.min_cut)}.")
    else:
        out.append(f"Max flow {_num(a.max_flow)} is limited by {words[a.bottleneck]}: "
                   f"{_cut_phrase(a, a.min_cut)}, {total} in total.")
    for o in a.scale_options:
        what = resource_name(a, o.u, o.v, o.stage)
        if o.gain_if_unlimited is None:
            out.append(f"Scale {what}: it is on every minimum cut, and with it unlimited the flow is unbounded.")
        else:
            out.append(f"Scale {what}: it is on every minimum cut; unlimited, it raises the max flow by "
                       f"{_num(o.gain_if_unlimited)} (to {_num(o.max_flow_if_unlimited)}) before another "
                       f"resource limits it.")
    if not a.scale_options:
        near_source = ", ".join(f"{e.u} -> {e.v}" for e in a.min_cut)
        near_sink = ", ".join(f"{e.u} -> {e.v}" for e in a.sink_side_min_cut)
        out.append(f"No single resource raises throughput on its own: the cut nearest the source "
                   f"({near_source}) and the cut nearest the sink ({near_sink}) are both saturated; "
                   f"scale them together.")
    present = {e.stage for e in a.edges if e.stage != "off_path" and e.capacity is not None}
    for stage in _STAGE_ORDER:
        if stage not in present:
            continue
        for cut in (a.min_cut, a.sink_side_min_cut):
            if all(e.stage != stage for e in cut):
                out.append(f"Adding {words[stage]} capacity will not raise throughput: {_cut_phrase(a, cut)}.")
                break
    if a.layout == "prefill-decode":
        spare = [e for e in a.edges if e.spare is not None and not e.saturated and e.stage != "kv_links"]
        if spare:
            out.append("Spare capacity: " + ", ".join(
                f"{resource_name(a, e.u, e.v, e.stage)} {_num(e.spare)}" for e in spare) + ".")
    if a.several_optimal_splits:
        moving = [f"{e.u} -> {e.v}" for e in a.edges if e.flow_can_vary]
        out.append("This split is one of several optimal ones (Dinic, breadth-first levels in canonical node order); "
                   f"flow can shift on {', '.join(moving)} without changing the max flow.")
    return out
