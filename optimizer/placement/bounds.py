"""A proven upper bound on the max flow of any layer placement, in closed form.

Every token must pass all L layers. A node holding k layers moves each token it serves forward by
at most k layers (fewer when it is entered part-way, under Helix's partial inference), and it
serves at most min(T(k), F) tokens/s when the total flow is F. So for any placement and any
link rule

    F * L  <=  sum over nodes of  k_i * min(T_i(k_i), F)  <=  sum over nodes of  max_k k * min(T(k), F).

The right side grows more slowly than F * L once F is large, so the largest F that satisfies it is
a bound no placement can beat. It ignores links and the coordinator, so it is loose where those
bind, but it is exact on Helix's single cluster (a chain of single-node stages reaches it).
"""

from __future__ import annotations

from optimizer.placement.throughput import NodeThroughputModel

_BISECTION_STEPS = 200


def layer_capacity_bound(throughput: NodeThroughputModel, counts: dict[str, int], num_layers: int) -> float:
    """Largest F with F * L <= sum_types count * max_k k * min(T(k), F)."""

    def enough(f: float) -> bool:
        return supply(f) >= f * num_layers * (1 - 1e-12)

    def supply(f: float) -> float:
        total = 0.0
        for machine, count in counts.items():
            row = throughput.table[machine]
            total += count * max((k * min(row[k], f) for k in range(1, len(row))), default=0.0)
        return total

    hi = max((max(row[1:], default=0.0) for row in throughput.table.values()), default=0.0)
    hi = max(hi * sum(counts.values()), 1e-9)
    lo = 0.0
    if enough(hi):
        return hi
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if enough(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * max(hi, 1.0):
            break
    return lo
