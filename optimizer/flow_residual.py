"""What the residual graph of a maximum flow says, per edge, in linear time (compiled traversals).

* Which edges' flow can change without changing the max flow: exactly those on a residual cycle.
  An edge with one residual arc (saturated, or carrying nothing) is on one iff its ends share a
  strongly connected component. An edge with both arcs always forms the trivial 2-cycle; another
  cycle through it exists iff, inside its component, it is not a bridge of the undirected graph of
  the component's residual arcs (removing it would leave no path between its ends in either
  direction, and a non-bridge leaves one). Components come from scipy's strong-components pass and
  bridges from one depth-first tree: a tree edge is a bridge iff no non-tree link leaves its subtree.
* How much more flow an edge on every minimum cut could pass if it were unlimited, bounded above by
  the residual capacity into its tail from the source side and out of its head into the sink side.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import connected_components, depth_first_order

from optimizer.scaled_max_flow import ArcLayout


def flow_can_vary(layout: ArcLayout, forward: np.ndarray, backward: np.ndarray,
                  residual_graph: csr_array | None = None) -> np.ndarray:
    """Per edge: some other maximum flow puts a different flow on it (a residual cycle through it).

    ``residual_graph``: ``layout.subgraph(layout.arcs(forward, backward))`` when the caller has it
    already (the solver does).
    """
    if residual_graph is None:
        residual_graph = layout.subgraph(layout.arcs(forward, backward))
    _, label = connected_components(residual_graph, directed=True, connection="strong")
    inside = label[layout.tail] == label[layout.head]
    both = forward & backward
    varies = inside & (forward ^ backward)
    if both.any():
        varies[both] = ~_bridges(layout, label, inside & (forward | backward), np.flatnonzero(both))
    return varies


def _bridges(layout: ArcLayout, label: np.ndarray, link: np.ndarray, asked: np.ndarray) -> np.ndarray:
    """For the ``asked`` edges: is each a bridge of the undirected graph of the ``link`` edges (the
    edges with a residual arc inside their component)?

    One depth-first search from a virtual root joined to one node of every component covers them
    all; each non-tree link of an undirected DFS joins a node to an ancestor, so a tree edge is a
    bridge iff no non-tree link leaves the subtree below it.
    """
    n = layout.n_nodes
    tail, head = layout.tail, layout.head
    links = np.flatnonzero(link)
    a, b = tail[links], head[links]
    _, one_node = np.unique(label, return_index=True)  # per component: one of its nodes (over nodes, not links)
    rooted = layout.subgraph(layout.arcs(link, link), root_of=one_node)
    order, pred = depth_first_order(rooted, n, directed=True, return_predecessors=True)
    u, v = tail[asked], head[asked]
    child = np.where(pred[u] == v, u, np.where(pred[v] == u, v, -1))  # the lower end of a tree edge
    if not np.any(child >= 0):  # every asked edge closes a cycle of the tree: none is a bridge
        return np.zeros(len(asked), dtype=bool)
    disc = np.zeros(n + 1, dtype=np.int32)
    disc[order] = np.arange(len(order), dtype=np.int32)
    deeper = np.where(disc[a] > disc[b], a, b)
    # +1 at the deeper end, -1 at the higher end of every link; then take the tree links back out.
    # Without twins every link is one arc in each end's row, so the higher ends are degree - deeper.
    cover = 2 * np.bincount(deeper, minlength=n + 1)
    if layout.has_twins:
        cover -= np.bincount(a, minlength=n + 1) + np.bincount(b, minlength=n + 1)
    else:
        cover[:n] -= np.diff(rooted.indptr[:n + 1])
    children = order[1:][pred[order[1:]] != n]
    cover[children] -= 1
    cover += np.bincount(pred[children], minlength=n + 1)
    sums, parent = cover.tolist(), pred.tolist()
    for x in reversed(order[1:].tolist()):  # subtree sums, children before parents
        if parent[x] >= 0:
            sums[parent[x]] += sums[x]
    crossing = np.asarray(sums)
    return (child >= 0) & (crossing[child] == 0)


def gain_upper_bounds(layout: ArcLayout, capacity: np.ndarray, flow: np.ndarray, forward: np.ndarray,
                      backward: np.ndarray, source_ends: tuple[np.ndarray, np.ndarray],
                      sink_ends: tuple[np.ndarray, np.ndarray], candidates: np.ndarray,
                      source: int, sink: int) -> np.ndarray:
    """For each candidate edge u->v (u on the source side, v on the sink side): an upper bound on
    the max-flow gain if it were unlimited, ``inf`` where the residual around it is unlimited.

    ``source_ends`` / ``sink_ends``: per edge, whether its tail and its head are on the source
    side / the sink side (the caller has them from the cuts). All extra flow would cross the edge,
    arriving at u over residual arcs from the source side and leaving v over residual arcs into
    the sink side, so it is at most either sum.
    """
    n = layout.n_nodes
    tail, head = layout.tail, layout.head
    u, v = tail[candidates], head[candidates]
    spare = np.where(forward, capacity - flow, 0.0)
    back = np.where(backward, flow, 0.0)
    # residual arcs x -> y: forward (tail -> head, spare) and backward (head -> tail, flow)
    into = np.full(n, np.inf)
    if np.any(u != source):
        tail_in, head_in = source_ends
        into = np.bincount(head, weights=np.where(tail_in, spare, 0.0), minlength=n)
        into += np.bincount(tail, weights=np.where(head_in, back, 0.0), minlength=n)
        into[source] = np.inf
    out = np.full(n, np.inf)
    if np.any(v != sink):
        tail_in, head_in = sink_ends
        out = np.bincount(tail, weights=np.where(head_in, spare, 0.0), minlength=n)
        out += np.bincount(head, weights=np.where(tail_in, back, 0.0), minlength=n)
        out[sink] = np.inf
    return np.minimum(into[u], out[v])
