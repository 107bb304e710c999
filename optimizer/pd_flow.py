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
from dataclasses import dataclass
from functools import cached_property
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
    computed_field,
    field_validator,
    model_validator,
)

from optimizer.flow_residual import flow_can_vary_and_reach, gain_upper_bounds
from optimizer.input_limits import MAX_EDGE_CAPACITY
from optimizer.problem import InputError, format_validation_error, read_document
from optimizer.scaled_max_flow import ArcLayout, MaxFlow, UnboundedFlow, solve

Stage = Literal["prefill", "kv_links", "decode", "off_path"]
Bottleneck = Literal["prefill", "kv_links", "decode", "mixed"]
Layout = Literal["prefill-decode", "generic"]

# The engine behind every analysis: scipy's compiled Dinic on integer units, refined until the
# rounding is certified negligible (optimizer.scaled_max_flow); from INT64_MIN_EDGES edges the
# first phase runs on OR-Tools' push-relabel in 64-bit units instead (FlowAnalysis.algorithm says
# which). Nodes are numbered in a canonical order (hops from the source, then name), so the split
# depends on the graph, not on the file's edge order; on the seed example it equals networkx's
# Edmonds-Karp split (tests/test_pd_flow.py).
ENGINE = "scipy_dinic"
_ENGINE_WORDS = {"scipy_dinic": "Dinic, breadth-first levels in canonical node order",
                 "ortools_push_relabel": "OR-Tools push-relabel over the canonical node order"}
# networkx's algorithms, kept for drawing and for small-graph cross-checks (max_flow_value).
ALGORITHMS = {
    "edmonds_karp": nx_flow.edmonds_karp,
    "preflow_push": nx_flow.preflow_push,
    "shortest_augmenting_path": nx_flow.shortest_augmenting_path,
    "boykov_kolmogorov": nx_flow.boykov_kolmogorov,
    "dinitz": nx_flow.dinitz,
}
_STAGES: tuple[Stage, ...] = ("prefill", "kv_links", "decode", "off_path")
_STAGE_CODE = {stage: code for code, stage in enumerate(_STAGES)}
MAX_LISTED = 10  # edges named in one sentence of the recommendations; the rest are counted
MAX_SCALE_OPTIONS = 20  # scale options kept in the analysis, best first
PROBE_EDGE_BUDGET = 10_000  # scale options re-solved while (probes x edges) stays within this
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
        if c is None or math.isinf(c):
            return None
        if c > MAX_EDGE_CAPACITY:
            raise ValueError(f"must be at most {MAX_EDGE_CAPACITY:g} (or null / .inf for unlimited), got {c:g}")
        return c


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

    def __init__(self, graph: FlowGraph, names: list[str], ends: list[tuple[str, str]],
                 capacities: list[float | None], tail: np.ndarray, head: np.ndarray):
        self.names, self.ends, self.capacities = names, ends, capacities
        self.source, self.sink = names.index(graph.source), names.index(graph.sink)
        self.capacity = np.array([np.inf if c is None else c for c in capacities], dtype=np.float64)
        self.layout = ArcLayout.from_edges(len(names), tail, head)
        self.stages, self.positions, self.layout_kind = _stages(graph, ends)
        self.stage_code = np.array([_STAGE_CODE[st] for st in self.stages], dtype=np.int8)
        self.on_path = self.stage_code != _STAGE_CODE["off_path"]
        # per-graph facts the recommendations read on every analysis, counted once here
        self.unlimited = np.isinf(self.capacity)
        self.stage_count = np.bincount(self.stage_code, minlength=len(_STAGES))
        self.finite_stages = np.bincount(self.stage_code[self.on_path & ~self.unlimited], minlength=len(_STAGES))
        self.finite_off_kv = np.flatnonzero(~self.unlimited & (self.stage_code != _STAGE_CODE["kv_links"]))

    @cached_property
    def unlimited_reach(self) -> tuple[np.ndarray, np.ndarray]:
        """Nodes the source reaches, and nodes that reach the sink, over unlimited edges alone."""
        free = self.layout.arcs(self.unlimited, np.zeros_like(self.unlimited))
        return self.layout.reach(free, self.source), self.layout.reach(free, self.sink, backward=True)

    @classmethod
    def of(cls, graph: FlowGraph, hops: dict[str, int]) -> CompiledGraph:
        far = len(hops) + 1
        names = sorted({e.u for e in graph.edges} | {e.v for e in graph.edges},
                       key=lambda n: (hops.get(n, far), n))
        index = {n: i for i, n in enumerate(names)}
        edges = sorted(graph.edges, key=lambda e: (index[e.u], index[e.v]))
        tail = np.fromiter((index[e.u] for e in edges), dtype=np.int64, count=len(edges))
        head = np.fromiter((index[e.v] for e in edges), dtype=np.int64, count=len(edges))
        return cls(graph, names, [(e.u, e.v) for e in edges], [e.capacity for e in edges], tail, head)

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
    edges = [Edge(u=source, v=p, capacity=_capped(rate)) for p, rate in prefill.items()]
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
            edges.append(Edge(u=p, v=d, capacity=_capped(bandwidth / kv_bytes_per_request)))
    edges += [Edge(u=d, v=sink, capacity=_capped(rate)) for d, rate in decode.items()]
    return FlowGraph(source=source, sink=sink, edges=edges)


def _capped(capacity: float) -> float | None:
    """A computed capacity above what any input may state is unlimited (None) for the flow."""
    return None if capacity > MAX_EDGE_CAPACITY else capacity


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
    max_flow_if_unlimited: float | None = Field(description="Max flow with this edge unlimited; None = unbounded "
                                                            "(no finite bound, when gain_is_bound).")
    gain_if_unlimited: float | None = Field(description="The rise in max flow that buys; None = unbounded.")
    gain_is_bound: bool = Field(False, description=(
        "Not re-solved (the probe budget, PROBE_EDGE_BUDGET edges solved in all, was spent): both figures "
        "are upper bounds from the residual capacity into the edge's tail and out of its head."))


class FlowAnalysis(BaseModel):
    """The analysis; per-edge lists (edges, cuts, KV schedule) are built from arrays on first use."""

    model_config = ConfigDict(frozen=True)

    source: str
    sink: str
    layout: Layout = Field(description="prefill-decode when every edge is source->P, P->D or D->sink.")
    algorithm: str = Field(ENGINE, description="The engine of the first phase: scipy_dinic, or "
                                               "ortools_push_relabel on large graphs.")
    max_flow: float
    max_flow_gap: float = Field(0.0, description=(
        "Certified rounding bound: the true max flow lies in [max_flow, max_flow + max_flow_gap] "
        "(the engine works in integer units; see optimizer.scaled_max_flow)."))
    min_cut_capacity: float
    min_cut_unique: bool
    bottleneck: Bottleneck
    scale_options: list[ScaleOption] = Field(description=f"Best first, at most {MAX_SCALE_OPTIONS}.")
    scale_options_total: int = Field(0, description="Edges on every minimum cut (scale_options lists the best).")
    several_optimal_splits: bool = Field(description="Other maximum flows exist; the split is the engine's (see "
                                                     "algorithm), over the canonical node order.")
    recommendations: list[str]
    _facts: _Facts = PrivateAttr()

    @computed_field(description="Every edge in canonical order (by tail, then head).")
    @cached_property
    def edges(self) -> list[EdgeFlow]:
        f = self._facts
        c = f.compiled
        flows, saturated, varies = f.flow.tolist(), f.saturated.tolist(), f.varies.tolist()
        return [
            EdgeFlow(u=u, v=v, capacity=cap, flow=flows[i],
                     spare=None if cap is None else 0.0 if saturated[i] else max(cap - flows[i], 0.0),
                     saturated=saturated[i], stage=c.stages[i], position=c.positions[i], flow_can_vary=varies[i])
            for i, ((u, v), cap) in enumerate(zip(c.ends, c.capacities, strict=True))
        ]

    @computed_field(description="Saturated edges leaving the nodes the source still reaches.")
    @cached_property
    def min_cut(self) -> list[CutEdge]:
        return self._facts.cut_edges(self._facts.source_cut)

    @computed_field(description="Saturated edges entering the nodes that still reach the sink.")
    @cached_property
    def sink_side_min_cut(self) -> list[CutEdge]:
        return self._facts.cut_edges(self._facts.sink_cut)

    @computed_field(description="Flow share per P->D pair; empty for generic graphs.")
    @cached_property
    def kv_schedule(self) -> list[KVShare]:
        f = self._facts
        if f.compiled.layout_kind != "prefill-decode":
            return []
        flows, value = f.flow.tolist(), self.max_flow
        return [
            KVShare(prefill=f.compiled.ends[i][0], decode=f.compiled.ends[i][1], flow=flows[i],
                    share=flows[i] / value if value > 0 else 0.0)
            for i in np.flatnonzero(f.compiled.stage_code == _STAGE_CODE["kv_links"]).tolist()
        ]


@dataclass(frozen=True)
class _Facts:
    """The analysed flow as arrays over the compiled graph's edges (canonical order)."""

    compiled: CompiledGraph
    value: float
    flow: np.ndarray
    saturated: np.ndarray
    varies: np.ndarray
    source_cut: np.ndarray  # edge indices
    sink_cut: np.ndarray

    def cut_edges(self, indices: np.ndarray) -> list[CutEdge]:
        c = self.compiled
        return [CutEdge(u=c.ends[i][0], v=c.ends[i][1], capacity=c.capacities[i], stage=c.stages[i])
                for i in indices.tolist()]

    def names(self, indices: np.ndarray) -> str:
        """``a -> b, c -> d`` for at most MAX_LISTED edges, then how many more."""
        return _listed([f"{self.compiled.ends[i][0]} -> {self.compiled.ends[i][1]}"
                        for i in indices[:MAX_LISTED].tolist()], len(indices))


def _listed(shown: list[str], total: int) -> str:
    more = total - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


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
    """Max flow, its split, the saturated cuts, the bottleneck stage and what to scale.

    One solve, then linear-time passes over its residual graph (compiled traversals): the nodes
    the source reaches and those that reach the sink give both saturated cuts and the edges on
    every minimum cut; one strong-components pass and one depth-first tree give which flows can
    shift. Only the scale options' gains re-solve, within PROBE_EDGE_BUDGET.
    """
    c = graph._compiled
    lay = c.layout
    result = c.solve()
    forward, backward = result.forward, result.backward
    source_side = result.source_side
    varies, sink_side = flow_can_vary_and_reach(lay, forward, backward, c.sink)
    source_cut = _on_path(c, lay.edges_between(source_side, ~source_side))
    sink_cut = _on_path(c, lay.edges_between(~sink_side, sink_side))
    facts = _Facts(compiled=c, value=result.value, flow=result.flow, saturated=~forward, varies=varies,
                   source_cut=source_cut, sink_cut=sink_cut)
    cut_stages = np.unique(c.stage_code[np.concatenate([source_cut, sink_cut])])
    bottleneck: Bottleneck = _STAGES[cut_stages[0]] if len(cut_stages) == 1 else "mixed"
    candidates = _on_path(c, lay.edges_between(source_side, sink_side))
    options, n_options = _scale_options(c, result, sink_side, candidates)
    analysis = FlowAnalysis(
        source=graph.source, sink=graph.sink, layout=c.layout_kind, algorithm=result.engine, max_flow=result.value,
        max_flow_gap=result.gap, min_cut_capacity=float(np.sum(c.capacity[source_cut])),
        min_cut_unique=np.array_equal(source_cut, sink_cut), bottleneck=bottleneck,
        scale_options=options, scale_options_total=n_options, several_optimal_splits=bool(varies.any()),
        recommendations=_recommendations(facts, bottleneck, options, n_options, result.engine),
    )
    analysis._facts = facts
    return analysis


def _on_path(c: CompiledGraph, edges: np.ndarray) -> np.ndarray:
    return edges[c.on_path[edges]]


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


def _scale_options(c: CompiledGraph, result: MaxFlow, sink_side: np.ndarray,
                   candidates: np.ndarray) -> tuple[list[ScaleOption], int]:
    """Edges on every minimum cut (tail reached from the source, head reaching the sink), best first.

    Unlimited, such an edge lets more flow through until another resource limits it. The gain is
    unbounded when the source reaches its tail, and its head the sink, over unlimited edges alone;
    otherwise the options with the highest upper bound (flow_residual.gain_upper_bounds) are
    re-solved with the edge unlimited while the probes stay within PROBE_EDGE_BUDGET edges in all,
    and the rest keep the bound (gain_is_bound). Returns the best MAX_SCALE_OPTIONS and how many
    edges are on every minimum cut.
    """
    if not len(candidates):
        return [], 0
    lay = c.layout
    if c.unlimited.any():
        from_source, to_sink = c.unlimited_reach
        unbounded = from_source[lay.tail[candidates]] & to_sink[lay.head[candidates]]
    else:
        unbounded = (lay.tail[candidates] == c.source) & (lay.head[candidates] == c.sink)
    bound = gain_upper_bounds(lay, c.capacity, result.flow, result.forward, result.backward,
                              result.source_side, sink_side, candidates, c.source, c.sink)
    probes = PROBE_EDGE_BUDGET // len(c.ends)
    order = np.argsort(-bound, kind="stable")  # candidate positions, highest bound first
    free = unbounded[order]
    rest = order[~free]
    bounded = rest[probes:].tolist()  # not re-solved: they keep the bound
    exact: list[tuple[float, str, str, int, float | None]] = [  # (-gain, u, v, edge, new max flow)
        (-math.inf, *c.ends[i], i, None) for i in candidates[order[free]].tolist()]
    for i in candidates[rest[:probes]].tolist():
        relaxed = c.capacity.copy()
        relaxed[i] = np.inf
        new = c.solve(relaxed).value
        exact.append((-max(new - result.value, 0.0), *c.ends[i], i, new))
    exact.sort()
    options = [_option(c, i, new, result.value, is_bound=False) for *_, i, new in exact[:MAX_SCALE_OPTIONS]]
    for k in bounded[:MAX_SCALE_OPTIONS - len(options)]:
        new = None if np.isinf(bound[k]) else result.value + float(bound[k])
        options.append(_option(c, int(candidates[k]), new, result.value, is_bound=True))
    return options, len(candidates)


def _option(c: CompiledGraph, i: int, new: float | None, value: float, *, is_bound: bool) -> ScaleOption:
    return ScaleOption(u=c.ends[i][0], v=c.ends[i][1], stage=c.stages[i], max_flow_if_unlimited=new,
                       gain_if_unlimited=None if new is None else max(new - value, 0.0), gain_is_bound=is_bound)


def _num(x: float) -> str:
    return f"{x:.6g}"


def resource_name(analysis: FlowAnalysis, u: str, v: str, stage: Stage) -> str:
    """How a person calls an edge: 'decode group D1' on a P/D graph, 'edge a -> b' otherwise."""
    return _resource_name(analysis.layout, u, v, stage)


def _resource_name(layout: Layout, u: str, v: str, stage: Stage) -> str:
    if layout == "prefill-decode":
        if stage == "prefill":
            return f"prefill group {v}"
        if stage == "decode":
            return f"decode group {u}"
        return f"KV link {u} -> {v}"
    return f"edge {u} -> {v}"


def _cut_phrase(f: _Facts, cut: np.ndarray) -> str:
    c = f.compiled
    stages = np.unique(c.stage_code[cut])
    if len(stages) == 1 and c.stage_count[stages[0]] == len(cut):
        return f"all {_STAGE_WORDS[c.layout_kind][_STAGES[stages[0]]]} edges are saturated ({f.names(cut)})"
    return f"every source-to-sink path crosses a saturated edge among {f.names(cut)}"


def _recommendations(f: _Facts, bottleneck: Bottleneck, options: list[ScaleOption], n_options: int,
                     engine: str) -> list[str]:
    c = f.compiled
    kind = c.layout_kind
    words = _STAGE_WORDS[kind]
    out = []
    value = _num(f.value)
    if bottleneck == "mixed":
        spans = np.unique(c.stage_code[np.concatenate([f.source_cut, f.sink_cut])])
        out.append(f"Max flow {value} is limited by several stages at once "
                   f"({', '.join(words[_STAGES[s]] for s in spans)}): {_cut_phrase(f, f.source_cut)}.")
    else:
        total = _num(float(np.sum(c.capacity[f.source_cut])))
        out.append(f"Max flow {value} is limited by {words[bottleneck]}: "
                   f"{_cut_phrase(f, f.source_cut)}, {total} in total.")
    for o in options[:MAX_LISTED]:
        what = _resource_name(kind, o.u, o.v, o.stage)
        if o.gain_if_unlimited is None and not o.gain_is_bound:
            out.append(f"Scale {what}: it is on every minimum cut, and with it unlimited the flow is unbounded.")
        elif o.gain_if_unlimited is None:
            out.append(f"Scale {what}: it is on every minimum cut (gain not re-solved on a graph this size).")
        else:
            out.append(f"Scale {what}: it is on every minimum cut; unlimited, it raises the max flow by "
                       f"{'at most ' if o.gain_is_bound else ''}{_num(o.gain_if_unlimited)} "
                       f"(to {_num(o.max_flow_if_unlimited)}) before another resource limits it.")
    if n_options > MAX_LISTED:
        out.append(f"{n_options - MAX_LISTED} more edges are on every minimum cut (scale_options lists "
                   f"the best {len(options)}).")
    if not options:
        out.append(f"No single resource raises throughput on its own: the cut nearest the source "
                   f"({f.names(f.source_cut)}) and the cut nearest the sink ({f.names(f.sink_cut)}) are both "
                   f"saturated; scale them together.")
    for code in np.flatnonzero(c.finite_stages).tolist():
        for cut in (f.source_cut, f.sink_cut):
            if not np.any(c.stage_code[cut] == code):
                out.append(f"Adding {words[_STAGES[code]]} capacity will not raise throughput: "
                           f"{_cut_phrase(f, cut)}.")
                break
    if kind == "prefill-decode":
        spare = c.finite_off_kv[~f.saturated[c.finite_off_kv]]
        if len(spare):
            shown = [f"{_resource_name(kind, *c.ends[i], c.stages[i])} {_num(c.capacity[i] - f.flow[i])}"
                     for i in spare[:MAX_LISTED].tolist()]
            out.append("Spare capacity: " + _listed(shown, len(spare)) + ".")
    moving = np.flatnonzero(f.varies)
    if len(moving):
        out.append(f"This split is one of several optimal ones ({_ENGINE_WORDS[engine]}); flow can shift on "
                   f"{f.names(moving)} without changing the max flow.")
    return out
