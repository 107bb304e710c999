"""What the residual graph of a maximum flow says, per edge, in linear time (compiled traversals).

* Which edges' flow can change without changing the max flow: exactly those on a residual cycle.
  An edge with one residual arc (saturated, or carrying nothing) is on one iff its ends share a
  strongly connected component. An edge with both arcs always forms the trivial 2-cycle; another
  cycle through it exists iff, inside its component, it is not a bridge of the undirected graph of
  the component's residual arcs (removing it would leave no path between its ends in either
  direction, and a non-bridge leaves one). Components come from scipy's strong-components passes
  (flow_can_vary says which), and a depth-first tree finds the bridges among the few partly used
  edges they leave open: a tree edge is a bridge iff no non-tree link leaves its subtree.
* How much more flow an edge on every minimum cut could pass if it were unlimited, bounded above by
  the residual capacity into its tail from the source side and out of its head into the sink side.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import breadth_first_order, connected_components, depth_first_order

from optimizer.scaled_max_flow import ArcLayout


def flow_can_vary(layout: ArcLayout, forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Per edge: some other maximum flow puts a different flow on it (a residual cycle through it)."""
    return flow_can_vary_and_reach(layout, forward, backward)[0]


def flow_can_vary_and_reach(layout: ArcLayout, forward: np.ndarray, backward: np.ndarray,
                            sink: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """flow_can_vary, and with ``sink`` the nodes that reach it in the residual graph (a mask), read
    off the same contracted graph: the nodes of one component of G1 reach each other, so a node
    reaches the sink iff its component does, a search over a few dozen nodes on a P/D graph.

    Two strong-components passes, the second on a small graph: first over the residual arcs of
    the edges with one arc (G1), then over G1's components contracted, with every residual arc
    between them (that gives the residual graph's own components). A partly used edge inside one
    component of G1 has a way back that avoids its own arcs, so it varies; for the rest (few on a
    P/D graph) the bridge test runs on G1's components, joined by the one-arc edges inside
    residual components (the component's undirected graph, contracted).
    """
    tail, head = layout.tail, layout.head
    one = forward ^ backward
    both = forward & backward
    g1 = layout.subgraph(layout.arcs(forward & ~backward, backward & ~forward))
    k1, label1 = connected_components(g1, directed=True, connection="strong")
    at_tail, at_head = np.take(label1, tail), np.take(label1, head)
    cross = np.flatnonzero(at_tail != at_head)  # edges between components of G1
    x, y = at_tail[cross], at_head[cross]
    fwd, bwd = forward[cross], backward[cross]
    rows, cols = np.concatenate([x[fwd], y[bwd]]), np.concatenate([y[fwd], x[bwd]])
    reach = None
    if sink is not None:
        classes = np.zeros(k1, dtype=bool)
        classes[breadth_first_order(_graph(k1, cols, rows), label1[sink], directed=True,
                                    return_predecessors=False)] = True
        reach = np.take(classes, label1)
    if len(rows) and k1 > 1:
        _, label2 = connected_components(_graph(k1, rows, cols), directed=True, connection="strong")
        inside = label2[x] == label2[y]  # per cross edge: both ends in one residual component
    else:
        inside = np.ones(len(cross), dtype=bool)
    varies = forward | backward  # inside one component of G1: a cycle avoids the edge's own arcs
    varies[cross] &= inside
    open_both = both[cross]  # partly used edges between G1's components: the bridge test
    if open_both.any():
        joins = one[cross] & inside
        _, part = _parts(k1, x[joins], y[joins])
        asked = np.flatnonzero(open_both)
        a, b = part[x[asked]], part[y[asked]]
        apart = a != b
        settled = np.ones(len(asked), dtype=bool)
        if apart.any():
            settled[apart] = ~_bridges_of_multigraph(a[apart], b[apart])
        varies[cross[asked]] = settled
    return varies, reach


def _bridges_of_multigraph(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per undirected edge a[i] - b[i] (no self-loops, parallel edges allowed): is it a bridge?

    A parallel edge never is; for the others one depth-first search from a virtual root joined to
    every node covers all connected parts. Each non-tree link of an undirected DFS
    joins a node to an ancestor, so a tree edge is a bridge iff no non-tree link leaves the
    subtree below it.
    """
    nodes, ends = np.unique(np.concatenate([a, b]), return_inverse=True)
    k, m = len(nodes), len(a)
    lo, hi = np.minimum(ends[:m], ends[m:]), np.maximum(ends[:m], ends[m:])
    pairs, which, count = np.unique(lo * k + hi, return_inverse=True, return_counts=True)
    x, y = pairs // k, pairs % k  # one link per node pair
    rows, cols = np.concatenate([x, y]), np.concatenate([y, x])
    # the virtual root k has an arc to every node: each one it reaches unvisited starts the tree of a
    # new connected part, the others are no links (only x, y count below)
    rooted = _graph(k + 1, np.concatenate([rows, np.full(k, k)]), np.concatenate([cols, np.arange(k)]))
    order, pred = depth_first_order(rooted, k, directed=True, return_predecessors=True)
    order, pred = order.astype(np.intp), pred.astype(np.intp)
    child = np.where(pred[x] == y, x, np.where(pred[y] == x, y, -1))  # the lower end of a tree link
    if not np.any(child >= 0):
        return np.zeros(m, dtype=bool)
    disc = np.zeros(k + 1, dtype=np.intp)
    disc[order] = np.arange(len(order))
    deeper = np.where(disc[x] > disc[y], x, y)
    # +1 at the deeper end, -1 at the higher end of every link; then take the tree links back out
    cover = 2 * np.bincount(deeper, minlength=k + 1) - np.bincount(rows, minlength=k + 1)
    children = order[1:][pred[order[1:]] != k]
    cover[children] -= 1
    cover += np.bincount(pred[children], minlength=k + 1)
    sums, parent = cover.tolist(), pred.tolist()
    for node in reversed(order[1:].tolist()):  # subtree sums, children before parents
        if parent[node] >= 0:
            sums[parent[node]] += sums[node]
    crossing = np.asarray(sums)
    bridge = (child >= 0) & (crossing[np.maximum(child, 0)] == 0)
    return bridge[which] & (count[which] == 1)


def _graph(k: int, rows: np.ndarray, cols: np.ndarray) -> csr_array:
    """A k-node graph of the arcs rows[i] -> cols[i], each arc once, built straight as CSR (scipy's
    conversion from coordinates costs more than the search on a small graph). Repeats are merged:
    scipy's strong-components pass never returns on a CSR that holds an arc twice (scipy 1.17)."""
    keys = np.unique(np.asarray(rows, dtype=np.int64) * k + cols)
    indptr = np.zeros(k + 1, dtype=np.int32)
    np.cumsum(np.bincount(keys // k, minlength=k), out=indptr[1:])
    return csr_array((np.ones(len(keys)), (keys % k).astype(np.int32), indptr), shape=(k, k))


def _parts(k: int, a: np.ndarray, b: np.ndarray) -> tuple[int, np.ndarray]:
    """Connected parts of the undirected graph of edges a[i] - b[i] on k nodes: strong components
    of its symmetric digraph (no transpose, unlike scipy's undirected pass)."""
    return connected_components(_graph(k, np.concatenate([a, b]), np.concatenate([b, a])), directed=True,
                                connection="strong")


def gain_upper_bounds(layout: ArcLayout, capacity: np.ndarray, flow: np.ndarray, forward: np.ndarray,
                      backward: np.ndarray, source_side: np.ndarray, sink_side: np.ndarray,
                      candidates: np.ndarray, source: int, sink: int) -> np.ndarray:
    """For each candidate edge u->v (u on the source side, v on the sink side): an upper bound on
    the max-flow gain if it were unlimited, ``inf`` where the residual around it is unlimited.

    ``source_side`` / ``sink_side``: per node, reached from the source / reaching the sink in the
    residual graph. All extra flow would cross the edge, arriving at u over residual arcs from the
    source side and leaving v over residual arcs into the sink side, so it is at most either sum.
    """
    n = layout.n_nodes
    tail, head = layout.tail, layout.head
    u, v = np.take(tail, candidates), np.take(head, candidates)
    # residual arcs x -> y: forward (tail -> head, spare) and backward (head -> tail, flow)
    into = np.full(n, np.inf)
    if np.any(u != source):
        into = _residual_sums(layout, capacity, flow, forward & np.take(source_side, tail),
                              backward & np.take(source_side, head), toward_head=True)
        into[source] = np.inf
    out = np.full(n, np.inf)
    if np.any(v != sink):
        out = _residual_sums(layout, capacity, flow, forward & np.take(sink_side, head),
                             backward & np.take(sink_side, tail), toward_head=False)
        out[sink] = np.inf
    return np.minimum(into[u], out[v])


def _residual_sums(layout: ArcLayout, capacity: np.ndarray, flow: np.ndarray, spare_arcs: np.ndarray,
                   flow_arcs: np.ndarray, *, toward_head: bool) -> np.ndarray:
    """Per node, the residual capacity of the flagged arcs into it (``toward_head``) or out of it:
    the spare of flagged forward arcs plus the flow of flagged backward arcs."""
    n = layout.n_nodes
    ends, other = (layout.head, layout.tail) if toward_head else (layout.tail, layout.head)
    total = np.bincount(np.compress(spare_arcs, ends), weights=np.compress(spare_arcs, capacity)
                        - np.compress(spare_arcs, flow), minlength=n)
    return total + np.bincount(np.compress(flow_arcs, other), weights=np.compress(flow_arcs, flow), minlength=n)
