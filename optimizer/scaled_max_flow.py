"""Exact max flow of a real-capacity graph on scipy's compiled integer Dinic, with a certified error.

`scipy.sparse.csgraph.maximum_flow` takes integer capacities and computes in 32-bit integers (it
silently wraps larger values), so real capacities are expressed in units of a resolution ``q``:

* ``q`` is the smallest power of two with ``bound / q <= 2**30``, where ``bound`` is the capacity of
  a finite source-sink cut (an upper bound on the max flow). Every arc is clipped at ``2**30 + 1``
  units, which no flow of value ``<= 2**30`` units needs; unlimited edges get that clip too.
  Integer capacities below 2**30 therefore use ``q <= 1`` and are solved exactly in one phase.
* Capacities are rounded **down** to whole units, so the integer flow is a feasible flow of the
  real graph: the reported value never exceeds the true maximum.
* The rounding is then checked, not assumed: the saturated cut of the integer residual graph has
  a real capacity ``C``, and the true maximum lies in ``[value, C]``. While ``C - value`` exceeds
  ``GAP_REL`` of the value, another phase solves the real residual graph (forward spare and
  cancellable flow, clipped at twice the gap) at a resolution ~2**30 times finer and adds its flow.
  One phase shrinks the gap by about ``2**29 / (edges in the cut)``; two are usual for real-valued
  capacities, and the gap that remains is reported (``MaxFlow.gap``).
* A refining phase adds at most the gap, so without antiparallel edges it runs on a small graph:
  the nodes the source reaches (that reach the sink) over residual arcs wider than twice the gap are
  merged into the source (the sink), and the flow is routed through them afterwards along a
  breadth-first tree of those arcs (``_refine_contracted``). On a 100k-edge P/D graph that is a few
  hundred arcs instead of 200k; with antiparallel edges, or under NEAR_CUT_MIN_EDGES edges (where
  building the small graph costs more than it saves), the phase solves the whole residual graph.

Edges u->v and v->u share the two arcs of one node pair: their net flow is what the solver sees,
and it is returned on the edge in its direction (the 2-cycle is cancelled, which changes no value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from ortools.graph.python import max_flow as ortools_max_flow
from scipy.sparse import csr_array
from scipy.sparse.csgraph import breadth_first_order, maximum_flow

UNIT_LIMIT = 2**30
ARC_CLIP_UNITS = UNIT_LIMIT + 1
GAP_REL = 1e-12
MAX_PHASES = 6
# below this many edges a refining phase on the whole residual graph is cheaper than building the
# small one (scipy's fixed per-call costs dominate); measured crossover ~30k edges on P/D graphs
NEAR_CUT_MIN_EDGES = 30_000
# From this many edges (without twins) the first phase runs on OR-Tools' push-relabel in 64-bit
# integers, at a resolution 2**22 times finer than scipy's 32-bit units: one phase then certifies
# real-valued capacities (gap ~1e-13 of the value at 100k edges) where scipy needs a second, and on
# 100k-edge P/D graphs it takes ~1.2-1.4x one scipy call against ~2.5x for scipy plus the refining
# phase. Below it scipy's Dinic stays the engine (its split is the one the small-graph tests pin).
INT64_MIN_EDGES = 30_000
# units of the 64-bit phase stay below 2**52, so units * q is exact in float64
INT64_UNIT_LIMIT = 2**52


class UnboundedFlow(ValueError):
    """Some source-sink path has only unlimited edges."""


@dataclass(frozen=True)
class ArcLayout:
    """CSR structure holding every edge's arc and its reverse arc, built once per graph.

    ``pos_fwd[i]`` / ``pos_bwd[i]`` index edge i's u->v / v->u arc in ``indices``;
    ``to_transposed`` reorders arcs into the transposed structure (``t_indptr``, ``t_indices``).
    Index arrays that numpy gathers with are ``intp`` (an int32 index array is converted on every
    gather, which doubles its cost); ``tail32`` / ``head32`` are the int32 copies scipy and OR-Tools take.
    """

    n_nodes: int
    tail: np.ndarray
    head: np.ndarray
    tail32: np.ndarray
    head32: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    pos_fwd: np.ndarray
    pos_bwd: np.ndarray
    to_transposed: np.ndarray
    t_indptr: np.ndarray
    t_indices: np.ndarray
    has_twins: bool  # some u->v and v->u edges both exist (they share arcs)
    # edges sorted by (tail, head): their u->v arcs alone form a CSR (``fwd_indptr``), from which
    # scipy adds the reverse arcs itself, so the first phase hands over half the arcs; None otherwise
    fwd_indptr: np.ndarray | None
    ones: np.ndarray  # float64 ones, one per arc: the data of subgraphs (scipy's traversals want float64)
    arc_keys: np.ndarray  # per structural arc, sorted: row * n_nodes + column (finds the arc of a node pair)
    from_edges: np.ndarray  # without twins: arc -> index into (forward values..., backward values...)

    @classmethod
    def from_edges(cls, n_nodes: int, tail: np.ndarray, head: np.ndarray) -> ArcLayout:
        tail, head = np.asarray(tail, dtype=np.int64), np.asarray(head, dtype=np.int64)
        keys = np.concatenate([tail * n_nodes + head, head * n_nodes + tail])
        unique, where = np.unique(keys, return_inverse=True)
        rows, cols = unique // n_nodes, unique % n_nodes
        to_transposed = np.lexsort((rows, cols)).astype(np.intp)
        m = len(tail)
        has_twins = len(unique) < 2 * m
        from_edges = np.empty(len(unique), dtype=np.intp)  # without twins, each arc is one edge direction
        if not has_twins:
            from_edges[where] = np.arange(2 * m, dtype=np.intp)
        in_order = bool(np.all(keys[1:m] > keys[:m - 1]))
        return cls(n_nodes=n_nodes, tail=tail.astype(np.intp), head=head.astype(np.intp),
                   tail32=tail.astype(np.int32), head32=head.astype(np.int32),
                   indptr=_indptr(rows, n_nodes), indices=cols.astype(np.int32),
                   pos_fwd=where[:m].astype(np.intp), pos_bwd=where[m:].astype(np.intp),
                   to_transposed=to_transposed, t_indptr=_indptr(cols, n_nodes),
                   t_indices=rows[to_transposed].astype(np.int32), has_twins=has_twins, from_edges=from_edges,
                   fwd_indptr=_indptr(tail, n_nodes) if in_order else None, ones=_read_only(np.ones(len(unique))),
                   arc_keys=unique)

    def out_edges(self, node: int) -> np.ndarray:
        """Indices of the edges leaving ``node``."""
        if self.fwd_indptr is not None:  # edges sorted by tail
            return np.arange(self.fwd_indptr[node], self.fwd_indptr[node + 1])
        return np.flatnonzero(self.tail == node)

    def in_edges(self, node: int) -> np.ndarray:
        """Indices of the edges entering ``node`` (from an index by head built on first use)."""
        order, indptr = self._by_head
        return order[indptr[node]:indptr[node + 1]]

    @cached_property
    def _by_head(self) -> tuple[np.ndarray, np.ndarray]:
        return np.argsort(self.head, kind="stable").astype(np.intp), _indptr(self.head, self.n_nodes)

    @cached_property
    def _degrees(self) -> tuple[np.ndarray, np.ndarray]:
        """Per node: edges leaving it, edges entering it."""
        return np.bincount(self.tail, minlength=self.n_nodes), np.bincount(self.head, minlength=self.n_nodes)

    def edges_between(self, tails: np.ndarray, heads: np.ndarray) -> np.ndarray:
        """Indices, ascending, of the edges whose tail is in ``tails`` and head in ``heads`` (node masks).

        A cut touches few nodes on one side (a P/D graph's source side is often the source alone), so
        the edges at the side with fewer of them are listed and filtered; only where both sides
        hold a large share of the edges are all edges tested."""
        out_degree, in_degree = self._degrees
        from_tails, into_heads = int(out_degree[tails].sum()), int(in_degree[heads].sum())
        m = len(self.tail)
        if min(from_tails, into_heads) * 4 > m:
            return np.flatnonzero(np.take(tails, self.tail) & np.take(heads, self.head))
        if from_tails <= into_heads and self.fwd_indptr is not None:  # edges sorted by tail: ranges
            nodes = np.flatnonzero(tails)
            edges = _ranges(self.fwd_indptr[nodes], self.fwd_indptr[nodes + 1])
            return edges[np.take(heads, np.take(self.head, edges))]
        order, indptr = self._by_head
        nodes = np.flatnonzero(heads)
        edges = np.take(order, _ranges(indptr[nodes], indptr[nodes + 1]))
        return np.sort(edges[np.take(tails, np.take(self.tail, edges))])

    def reach(self, arc_exists: np.ndarray, start: int, *, backward: bool = False) -> np.ndarray:
        """Nodes reachable from ``start`` over the structural arcs flagged in ``arc_exists``
        (with ``backward``: the nodes that reach ``start``). Returns a boolean mask per node."""
        return self.reach_in(self.subgraph(arc_exists, transposed=backward), start)

    def reach_in(self, graph: csr_array, start: int) -> np.ndarray:
        """Nodes reachable from ``start`` in ``graph`` (a ``subgraph``), as a boolean mask per node."""
        mask = np.zeros(self.n_nodes, dtype=bool)
        mask[breadth_first_order(graph, start, directed=True, return_predecessors=False)] = True
        return mask

    def subgraph(self, arc_exists: np.ndarray, *, transposed: bool = False,
                 root_of: np.ndarray | None = None) -> csr_array:
        """The flagged structural arcs as a CSR graph (scipy's traversals take explicit zeros as arcs).

        ``root_of``: also a virtual node ``n_nodes`` with an arc to each of these nodes, so that one
        traversal from it covers every part they lie in.
        """
        if transposed:
            arc_exists = arc_exists[self.to_transposed]
            indptr, indices = self.t_indptr, self.t_indices
        else:
            indptr, indices = self.indptr, self.indices
        kept_before = np.zeros(len(arc_exists) + 1, dtype=np.int32)
        np.cumsum(arc_exists, out=kept_before[1:])
        kept, ptr, n = np.compress(arc_exists, indices), kept_before[indptr], self.n_nodes
        if root_of is not None:
            kept = np.concatenate([kept, root_of.astype(np.int32)])
            ptr = np.append(ptr, np.int32(len(kept)))
            n += 1
        ones = self.ones if len(kept) <= len(self.ones) else np.ones(len(kept))
        return csr_array((ones[:len(kept)], kept, ptr), shape=(n, n))

    def per_arc(self, forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
        """Per structural arc: the sum of edge values on it (``forward`` on u->v, ``backward`` on v->u)."""
        if self.has_twins:
            total = np.bincount(self.pos_fwd, weights=forward, minlength=len(self.indices))
            return total + np.bincount(self.pos_bwd, weights=backward, minlength=len(self.indices))
        return np.concatenate([forward, backward])[self.from_edges]

    def arcs(self, forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
        """Structural arcs present when edge i offers its u->v arc (``forward``) / v->u (``backward``).

        Each position appears once in ``pos_fwd`` and once in ``pos_bwd`` (twice only when edges
        u->v and v->u both exist), so plain scatters suffice.
        """
        if not self.has_twins:
            return np.concatenate([forward, backward])[self.from_edges]
        exists = np.zeros(len(self.indices), dtype=bool)
        exists[self.pos_fwd] = forward
        exists[self.pos_bwd] |= backward
        return exists


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The integers of the ranges [starts[i], ends[i]) one after another."""
    lengths = ends - starts
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.intp)
    offsets = np.repeat(starts.astype(np.intp) - np.cumsum(lengths) + lengths, lengths)
    return offsets + np.arange(total, dtype=np.intp)


def _indptr(rows: np.ndarray, n_nodes: int) -> np.ndarray:
    indptr = np.zeros(n_nodes + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n_nodes), out=indptr[1:])
    return indptr


@dataclass(frozen=True)
class MaxFlow:
    """A maximum flow (within ``gap``) and the residual graph it leaves, per edge and per node.

    The residual graph as arcs and as a CSR graph, and the sink side, are built on first use (the
    64-bit phase finds its cut without them; a caller after the value alone never needs them;
    the analysis reads the sink side off flow_residual's contracted graph instead)."""

    value: float
    flow: np.ndarray  # per edge, 0 <= flow <= capacity
    forward: np.ndarray  # per edge: residual u->v arc (spare of at least one unit)
    backward: np.ndarray  # per edge: residual v->u arc (flow of at least one unit)
    source_side: np.ndarray  # per node: reached from the source in the residual graph
    resolution: float  # q of the last phase; 0 when no flow was possible
    phases: int
    near_cut_phases: int  # of those, phases solved on the residual graph near the cut alone
    gap: float  # the true max flow lies in [value, value + gap]
    layout: ArcLayout = field(repr=False)
    sink: int = field(repr=False)
    engine: str = "scipy_dinic"  # the first phase's: scipy_dinic or ortools_push_relabel (int64)

    @cached_property
    def arcs(self) -> np.ndarray:
        """Per structural arc: present in the residual graph (ArcLayout.arcs)."""
        return self.layout.arcs(self.forward, self.backward)

    @cached_property
    def residual_graph(self) -> csr_array:
        """The residual arcs as a graph (ArcLayout.subgraph), for further traversals."""
        return self.layout.subgraph(self.arcs)

    @cached_property
    def sink_side(self) -> np.ndarray:
        """Per node: reaches the sink in the residual graph."""
        return self.layout.reach(self.arcs, self.sink, backward=True)

    def known(self, **values) -> MaxFlow:
        """Seeds the lazily built parts the solver has already (arcs, residual_graph)."""
        self.__dict__.update((k, v) for k, v in values.items() if v is not None)
        return self


def solve(layout: ArcLayout, capacity: np.ndarray, source: int, sink: int, *,
          near_cut_min_edges: int = NEAR_CUT_MIN_EDGES, int64_min_edges: int = INT64_MIN_EDGES) -> MaxFlow:
    """Max flow from ``source`` to ``sink``; ``capacity`` per edge, ``inf`` = unlimited.

    ``near_cut_min_edges``: refine near the cut alone on graphs with at least this many edges.
    ``int64_min_edges``: solve the first phase on OR-Tools in 64-bit units from this many edges
    (graphs without twin edges).
    """
    cap = np.asarray(capacity, dtype=np.float64)
    unlimited = np.isinf(cap)
    out_of_source, into_source = layout.out_edges(source), layout.in_edges(source)
    if unlimited.any():
        free = layout.arcs(unlimited, np.zeros_like(unlimited))
        on_source_side = layout.reach(free, source)
        if on_source_side[sink]:
            raise UnboundedFlow("some source-to-sink path has only unlimited edges")
        on_sink_side = layout.reach(free, sink, backward=True)
        bound = min(_cut_capacity(layout, cap, on_source_side), _cut_capacity(layout, cap, ~on_sink_side))
    else:
        bound = min(float(cap[out_of_source].sum()), float(cap[layout.in_edges(sink)].sum()))
    flow = np.zeros(len(cap))
    upper, q, phases, value, gap = bound, 0.0, 0, 0.0, math.inf
    near_cut = 0
    engine = "ortools_push_relabel" if not layout.has_twins and len(cap) >= int64_min_edges else "scipy_dinic"
    arcs = residual_graph = None  # the last phase's residual graph, once there is one
    side = int64 = forward = backward = None  # int64: the OR-Tools solver, while its phase is the last one
    while upper > 0 and phases < MAX_PHASES:
        # after the first phase the true maximum is within ``gap``: refine near the cut alone when the
        # residual graph allows it (no twin edges), else on the whole residual structure
        near = phases and not layout.has_twins and math.isfinite(gap) and len(cap) >= near_cut_min_edges
        if near and residual_graph is None:  # the 64-bit phase found its cut without the graph
            arcs = layout.arcs(forward, backward)
            residual_graph = layout.subgraph(arcs)
        refined = _refine_contracted(layout, cap, flow, source, sink, gap, arcs, residual_graph) if near else None
        int64 = None
        if refined is not None:
            flow, q = refined
            near_cut += 1
            forward, backward = _residual(cap, flow, q, unlimited)
        elif not phases and engine == "ortools_push_relabel":
            flow, q, forward, backward, int64 = _int64_phase(layout, cap, source, sink, upper)
        else:
            flow, q, forward, backward = _full_phase(layout, cap, flow, unlimited, source, sink, upper, phases)
        phases += 1
        value = float(flow[out_of_source].sum() - flow[into_source].sum())
        if int64 is not None:  # OR-Tools' own traversal of the same residual arcs (whole units)
            side = np.zeros(layout.n_nodes, dtype=bool)
            side[int64.get_source_side_min_cut()] = True
            arcs = residual_graph = None
        else:
            arcs = layout.arcs(forward, backward)
            residual_graph = layout.subgraph(arcs)
            side = layout.reach_in(residual_graph, source)
        if side[sink]:  # float round-off let a unit slip: one more phase finds it
            gap = math.inf
            continue
        upper = gap = max(_cut_capacity(layout, cap, side) - value, 0.0)
        if upper <= GAP_REL * max(1.0, value):
            break
    if side is None:  # a cut of zero capacity: no flow at all, and the residual graph is the graph
        forward, backward = _residual(cap, flow, q, unlimited)
        arcs = layout.arcs(forward, backward)
        residual_graph = layout.subgraph(arcs)
        side = layout.reach_in(residual_graph, source)
        gap = max(_cut_capacity(layout, cap, side) - value, 0.0)
    result = MaxFlow(value=value, flow=flow, forward=forward, backward=backward, source_side=side, resolution=q,
                     phases=phases, near_cut_phases=near_cut, gap=gap, layout=layout, sink=sink,
                     engine=engine if phases else "scipy_dinic")
    return result.known(arcs=arcs, residual_graph=residual_graph)


def _int64_phase(layout: ArcLayout, cap: np.ndarray, source: int, sink: int, upper: float):
    """The first phase on OR-Tools' push-relabel (64-bit flows) at resolution ``upper / 2**52``;
    returns the flow, the resolution and the residual arcs per edge, as ``_full_phase`` does, and
    the solver (it traverses its residual graph for the cuts).

    Capacities are rounded down to whole units as in the 32-bit phase, so the flow is feasible;
    OR-Tools keeps each edge an arc of its own, hence no twin edges here (their flows would not be
    netted as the shared-arc layout does)."""
    q = 2.0 ** math.ceil(math.log2(upper / INT64_UNIT_LIMIT))
    units = np.floor(cap * (1.0 / q))
    np.minimum(units, INT64_UNIT_LIMIT + 1, out=units)
    units = units.astype(np.int64)
    engine = ortools_max_flow.SimpleMaxFlow()
    arcs = engine.add_arcs_with_capacity(layout.tail32, layout.head32, units)
    status = engine.solve(source, sink)
    if status != engine.OPTIMAL:  # no flow of 2**52 units can overflow 64 bits: not expected
        raise RuntimeError(f"OR-Tools max flow ended with status {status}")
    moved = engine.flows(arcs)
    # whole units below 2**53 times a power of two: exact; residual arcs in units, no float test
    return moved * q, q, moved < units, moved > 0, engine


def _full_phase(layout: ArcLayout, cap: np.ndarray, flow: np.ndarray, unlimited: np.ndarray, source: int,
                sink: int, upper: float, phases: int) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """One phase on the whole residual structure at the resolution ``upper`` allows; returns the new
    flow, the resolution and the residual arcs per edge (forward, backward)."""
    q = 2.0 ** math.ceil(math.log2(upper / UNIT_LIMIT))
    spare_units = _units(cap - flow if phases else cap, 1.0 / q)
    cancel_units = _units(flow, 1.0 / q) if phases else None
    result = maximum_flow(_unit_matrix(layout, spare_units, cancel_units), source, sink, method="dinic").flow
    if not np.array_equal(result.indices, layout.indices):
        raise RuntimeError("scipy's maximum_flow returned an unexpected arc structure")
    if layout.has_twins:  # the net flow of a pair moves; it goes on the edge in its direction
        net = layout.per_arc(flow, -flow) + result.data * q
        flow = np.clip(net[layout.pos_fwd], 0.0, cap)
        forward, backward = _residual(cap, flow, q, unlimited)
    else:
        moved = result.data[layout.pos_fwd]  # this phase's net flow per edge, in units
        # at most the rounded-down spare: within capacity, except for round-off when adding on
        flow = np.clip(flow + moved * q, 0.0, cap) if phases else moved * q
        # the residual arcs as the solver left them, in whole units: exact, no float comparison
        forward = moved < spare_units
        backward = moved > 0 if cancel_units is None else moved > -cancel_units
    return flow, q, forward, backward


def _refine_contracted(layout: ArcLayout, cap: np.ndarray, flow: np.ndarray, source: int, sink: int,
                       gap: float, arcs: np.ndarray, residual_graph: csr_array) -> tuple[np.ndarray, float] | None:
    """One refining phase on the residual graph near the cut alone; None where it cannot apply.

    The flow still missing is at most ``gap``, so no arc carries more than ``gap`` of it. Nodes the
    source reaches over *wide* residual arcs (more than twice the gap) are merged into the source,
    nodes that reach the sink over wide arcs into the sink: whatever the small problem between them
    sends out of a merged node is routed to it down the breadth-first tree of wide arcs (each tree
    arc carries at most the phase's whole flow, less than its residual), likewise into the sink.
    What is left to solve is the arcs near the cut, a few hundred instead of the whole graph.
    Needs one edge per node pair (no twins), so that a node pair names one edge.

    ``arcs`` / ``residual_graph``: the previous phase's residual graph. Its breadth-first trees from
    the source and into the sink serve as the trees, cut below any arc not wide enough, which
    spares building the graph of wide arcs.
    """
    n, m = layout.n_nodes, len(cap)
    tail, head = layout.tail, layout.head
    width = 2.0 * gap
    spare = cap - flow
    reached, pred_source = breadth_first_order(residual_graph, source, directed=True, return_predecessors=True)
    from_source = _wide_part(layout, reached, pred_source, source, spare, flow, width, downward=True)
    reached, pred_sink = breadth_first_order(layout.subgraph(arcs, transposed=True), sink, directed=True,
                                             return_predecessors=True)
    to_sink = _wide_part(layout, reached, pred_sink, sink, spare, flow, width, downward=False)
    group = np.arange(n)
    group[from_source] = source
    if np.any(group[to_sink] == source):  # a wide source-sink path: the first phase left a unit
        return None
    group[to_sink] = sink
    g_tail, g_head = group[tail], group[head]
    apart = g_tail != g_head
    # residual arcs of the small problem: u->v with spare, v->u with flow; none into the source or
    # out of the sink (a maximum flow needs neither)
    fwd = np.flatnonzero(apart & (spare > 0) & (g_head != source) & (g_tail != sink))
    bwd = np.flatnonzero(apart & (flow > 0) & (g_tail != source) & (g_head != sink))
    a_from = np.concatenate([g_tail[fwd], g_head[bwd]])
    a_to = np.concatenate([g_head[fwd], g_tail[bwd]])
    if not len(a_from):
        return None
    q = 2.0 ** math.ceil(math.log2(width / UNIT_LIMIT))
    units = _units(np.minimum(np.concatenate([spare[fwd], flow[bwd]]), width), 1.0 / q)
    nodes, compact = np.unique(np.concatenate([a_from, a_to, [source, sink]]), return_inverse=True)
    k, n_arcs = len(nodes), len(a_from)
    r, c = compact[:n_arcs], compact[n_arcs:2 * n_arcs]
    pair = r.astype(np.int64) * k + c
    keys, pair_of = np.unique(pair, return_inverse=True)  # parallel arcs (merged nodes) become one
    pair_units = np.minimum(np.bincount(pair_of, weights=units), ARC_CLIP_UNITS).astype(np.int32)
    matrix = csr_array((pair_units, (keys // k, keys % k)), shape=(k, k))
    s_c, t_c = compact[-2], compact[-1]
    solved = maximum_flow(matrix, int(s_c), int(t_c), method="dinic").flow.tocoo()
    solved_keys = solved.row.astype(np.int64) * k + solved.col
    order = np.argsort(solved_keys)
    pair_flow = solved.data[order][np.searchsorted(solved_keys[order], keys)]
    # each pair's flow fills its parallel arcs in turn (whole units, exact)
    by_pair = np.argsort(pair_of, kind="stable")
    filled_before = np.cumsum(units[by_pair]) - units[by_pair]
    first_of_pair = np.searchsorted(pair_of[by_pair], np.arange(len(keys)))
    filled_before -= filled_before[first_of_pair][pair_of[by_pair]]
    moved = np.empty(n_arcs)
    moved[by_pair] = np.clip(np.maximum(pair_flow, 0)[pair_of[by_pair]] - filled_before, 0.0, units[by_pair])
    moved *= q
    change = np.zeros(m)
    np.add.at(change, fwd, moved[:len(fwd)])
    np.add.at(change, bwd, -moved[len(fwd):])
    # route what leaves merged source nodes from the source, what enters merged sink nodes to the sink
    real_from = np.concatenate([tail[fwd], head[bwd]])
    real_to = np.concatenate([head[fwd], tail[bwd]])
    out_of = np.bincount(real_from, weights=moved, minlength=n) * (group == source)
    into = np.bincount(real_to, weights=moved, minlength=n) * (group == sink)
    for pred, root, demand, downward in ((pred_source, source, out_of, True), (pred_sink, sink, into, False)):
        carried = _tree_loads(pred, root, demand)
        x = np.flatnonzero(carried)
        parent = pred[x]
        a, b = (parent, x) if downward else (x, parent)  # the tree arc a -> b carries the load
        edge, forward = _edge_of_arc(layout, a, b)
        np.add.at(change, edge, np.where(forward, carried[x], -carried[x]))
    return np.clip(flow + change, 0.0, cap), q


def _edge_of_arc(layout: ArcLayout, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For residual arcs a -> b (no twins): the edge each belongs to, and whether it is the edge's
    forward arc (a -> b is the edge) rather than its backward one."""
    m = len(layout.tail)
    code = layout.from_edges[np.searchsorted(layout.arc_keys, a.astype(np.int64) * layout.n_nodes + b)]
    return np.where(code < m, code, code - m), code < m


def _wide_part(layout: ArcLayout, reached: np.ndarray, pred: np.ndarray, root: int, spare: np.ndarray,
               flow: np.ndarray, width: float, *, downward: bool) -> np.ndarray:
    """The nodes of a breadth-first tree (``reached``, ``pred``) whose path to ``root`` has only arcs
    of residual above ``width``; tree arcs run parent -> child when ``downward``, else child -> parent.
    Pushes the verdict one level down per step, so at most depth-of-tree steps."""
    n = layout.n_nodes
    x = reached[reached != root]
    a, b = (pred[x], x) if downward else (x, pred[x])
    edge, forward = _edge_of_arc(layout, a, b)
    ok_arc = np.zeros(n, dtype=bool)
    ok_arc[x] = np.where(forward, spare[edge], flow[edge]) > width
    ok_arc[root] = True
    parent = np.where(pred < 0, root, pred)
    ok = ok_arc
    for _ in range(n):
        deeper = ok_arc & ok[parent]
        if np.array_equal(deeper, ok):
            break
        ok = deeper
    return np.flatnonzero(ok)


def _tree_loads(pred: np.ndarray, root: int, demand: np.ndarray) -> np.ndarray:
    """Per node x of a tree (``pred``: parent, root's negative): the load on the arc between x and
    its parent when every node's ``demand`` travels between it and the root. Moves all loads up one
    level per step, so at most depth-of-tree steps."""
    n = len(pred)
    carried = np.zeros(n)
    load = demand.copy()
    load[root] = 0.0
    for _ in range(n):
        live = np.flatnonzero(load)
        if not len(live):
            break
        carried[live] += load[live]
        load = np.bincount(pred[live], weights=load[live], minlength=n)
        load[root] = 0.0
    return carried


def _unit_matrix(layout: ArcLayout, spare_units: np.ndarray, cancel_units: np.ndarray | None) -> csr_array:
    """The int32 capacity matrix of one phase: ``spare_units`` on u->v, ``cancel_units`` on v->u.

    With no flow yet (``cancel_units`` None) and edges in CSR order, only the u->v arcs are handed
    over: scipy adds the reverse arcs itself, so building the full structure here would be wasted.
    """
    shape = (layout.n_nodes,) * 2
    if cancel_units is None and layout.fwd_indptr is not None:
        matrix = csr_array((spare_units.astype(np.int32), layout.head32, layout.fwd_indptr), shape=shape)
    else:
        units = layout.per_arc(spare_units, np.zeros_like(spare_units) if cancel_units is None else cancel_units)
        if layout.has_twins:  # two edges' units on one arc: clip the sum again to stay in int32
            np.minimum(units, ARC_CLIP_UNITS, out=units)
        matrix = csr_array((units.astype(np.int32), layout.indices, layout.indptr), shape=shape)
    # both structures are sorted by row, then column, without repeats: spare scipy the check
    matrix.has_canonical_format = True
    return matrix


def _units(amount: np.ndarray, per_unit: float) -> np.ndarray:
    """Whole units (rounded down, clipped at ARC_CLIP_UNITS); ``per_unit`` = 1 / q, a power of two,
    so the product is exact."""
    units = amount * per_unit
    np.floor(units, out=units)
    return np.minimum(units, ARC_CLIP_UNITS, out=units)


def _residual(cap, flow, q, unlimited) -> tuple[np.ndarray, np.ndarray]:
    if q > 0:
        return unlimited | (cap - flow >= q), flow >= q
    return unlimited | (cap > flow), flow > 0


def _cut_capacity(layout: ArcLayout, cap: np.ndarray, inside: np.ndarray) -> float:
    return float(cap[layout.edges_between(inside, ~inside)].sum())


def _read_only(array: np.ndarray) -> np.ndarray:
    """Shared by every subgraph a layout hands out, so no holder may write to it."""
    array.flags.writeable = False
    return array
