"""Routing shares that leave every replica the same headroom, for a fleet whose size is decided.

The allocation MILP fixes how many replicas of each variant run; any routing that keeps each
variant within its capacity is then equally cheap, and the solver returns a vertex of that set:
whole prompt-length buckets on one variant, flipping from one cycle to the next. At p99 that
is the wrong choice among equals: a replica planned at 95 % of its SLO capacity while its
neighbours idle at 10 % misses the tail the moment traffic is burstier than planned (on the
8B Azure hour at 4x, one H100 got a whole bucket, ran 254 requests while four A100s ran 4
each, and missed 12 % of its requests). So, for the fleet the allocation chose, this module
finds the shares that minimise the highest utilisation of any variant -- a small LP:

    minimise U  s.t.  sum_v y[v,b] = 1 for every bucket b,
                      sum_b rate[b] * y[v,b] / (replicas[v] * capacity[v,b]) <= U for every variant v,

with y >= 0 only where the variant can serve the bucket. Buckets nobody can serve are left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.optimize import linprog


def balanced_shares(rates_rps: Mapping[str, float], replicas: Mapping[str, int],
                    capacity_rps: Mapping[tuple[str, str], float]) -> tuple[dict[str, dict[str, float]], float] | None:
    """Per bucket, the share of its requests each variant takes, and the highest utilisation U.

    `capacity_rps[(variant, bucket)]` is what one replica sustains for that bucket alone. Returns
    None when no bucket with traffic can be served by the given replicas.
    """
    variants = sorted(v for v, n in replicas.items() if n > 0)
    buckets = [b for b, r in rates_rps.items() if r > 0 and any(capacity_rps.get((v, b), 0) > 0 for v in variants)]
    cells = [(v, b) for b in buckets for v in variants if capacity_rps.get((v, b), 0.0) > 0]
    if not cells:
        return None
    n = len(cells) + 1  # shares, then U
    a_eq = np.zeros((len(buckets), n))
    a_ub = np.zeros((len(variants), n))
    row_b = {b: k for k, b in enumerate(buckets)}
    row_v = {v: k for k, v in enumerate(variants)}
    for j, (v, b) in enumerate(cells):
        a_eq[row_b[b], j] = 1.0
        a_ub[row_v[v], j] = rates_rps[b] / (replicas[v] * capacity_rps[(v, b)])
    a_ub[:, -1] = -1.0
    cost = np.zeros(n)
    cost[-1] = 1.0
    res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(len(variants)), A_eq=a_eq, b_eq=np.ones(len(buckets)),
                  bounds=[(0, None)] * n, method="highs")
    if res.status != 0:
        return None
    shares: dict[str, dict[str, float]] = {}
    for (v, b), y in zip(cells, res.x[:-1], strict=True):
        if y > 1e-9:
            shares.setdefault(b, {})[v] = float(y)
    return shares, float(res.x[-1])
