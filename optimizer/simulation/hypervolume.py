"""Latency-cost Pareto front and its normalized hypervolume (the Vidur autoscaling lab's score).

One number to compare autoscalers that each trace a front over their service-level knob: normalize
cost and latency by reference values (a budget and a latency nobody would accept) and clip at 1,
so points worse than the reference add nothing; sort the front by cost; then

    HV = (1 - C_n)(1 - L_n) + sum_{i<n} (C_{i+1} - C_i)(1 - L_i)

is the area of the unit square dominated by the front (lower cost and lower latency are better).
1 is perfect (free and instant), 0 means nothing better than the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, latency) points no other point beats on both, sorted by cost."""
    front: list[tuple[float, float]] = []
    best_latency = np.inf
    for cost, latency in sorted(points, key=lambda p: (p[0], p[1])):
        if latency < best_latency:
            front.append((cost, latency))
            best_latency = latency
    return front


def normalized_hypervolume(
    points: Sequence[tuple[float, float]], cost_reference: float, latency_reference: float
) -> float:
    """Hypervolume of the (cost, latency) front after normalizing by the references and clipping at 1."""
    if cost_reference <= 0 or latency_reference <= 0:
        raise ValueError("reference cost and latency must be > 0")
    if not points:
        return 0.0
    normalized = [
        (min(c / cost_reference, 1.0), min(lat / latency_reference, 1.0)) for c, lat in points
    ]
    front = pareto_front(normalized)
    c = [p[0] for p in front]
    lat = [p[1] for p in front]
    n = len(front) - 1
    hv = (1 - c[n]) * (1 - lat[n])
    for i in range(n):
        hv += (c[i + 1] - c[i]) * (1 - lat[i])
    return float(hv)
