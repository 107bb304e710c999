"""The decision: one `Problem` (every model's demand, every variant, the inventory) in, one `Decision` out.

What it decides: replicas per variant, routing weights, cost per hour and unmet demand, by
`capacity_table` + `allocate` (with every variant at its minimum when there is no demand at all); and
the single-accelerator baseline a mixed fleet is compared with on /metrics.

What it may not touch: Kubernetes, Prometheus, HTTP, the exporter or the controller's memory between
cycles. It is a pure function of the `Problem` the cycle built (the holds are already in it as pinned
bounds, see `holds`) and of the warm start the controller hands it (the previous decision's
`warm_start`, which only makes the solve faster: the plan and its proven bound are valid whatever it
holds), so the simulator and the benchmarks can call the same thing.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from optimizer.capacity import CapacityEstimate, capacity_table
from optimizer.fleet import Variant
from optimizer.problem import Problem

log = logging.getLogger("variant_autoscaler.decision")


class FrozenModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Decision(FrozenModel):
    """What the controller needs from the optimizer, whatever its internal result type."""

    replicas: dict[str, int]
    routing: dict[tuple[str, str, str], float] = Field(default_factory=dict, description="(model, bucket, variant).")
    cost_per_hour: float = 0.0
    unmet_demand_rps: dict[str, float] = Field(default_factory=dict)
    status: str = "optimal"
    message: str = ""
    capacity_s: float = 0.0
    solver_s: float = 0.0
    gap: float = Field(default=0.0, description="Proven optimality gap of the allocation, (cost - bound) / cost.")
    warm_started: bool = Field(default=False, description="The allocation started from the previous decision's.")
    warm_start: Any = Field(default=None, exclude=True, repr=False,
                            description="optimizer.allocation_warm.WarmStart for the next cycle's decide().")


def homogeneous_baseline(problem: Problem, capacity: dict[tuple[str, str], CapacityEstimate]
                         ) -> tuple[float, str] | None:
    """(cost per hour, accelerator) of the cheapest way to serve all the demand with aggregated variants
    of ONE accelerator type, inventory ignored: the baseline a mixed fleet is compared with.

    Per model, the cheapest of its variants on that type, with ceil(sum over buckets of rate / capacity)
    replicas; a type that cannot serve some model at its SLO is no baseline.
    """
    if not problem.workloads:
        return None
    by_pair: dict[tuple[str, str], list[Variant]] = {}
    for v in problem.variants:
        if v.role.value == "PD":
            by_pair.setdefault((v.model, v.accelerator), []).append(v)
    rates_of = {w.model: w.bucket_rates_rps() for w in problem.workloads}
    best: tuple[float, str] | None = None
    for acc in problem.accelerators:
        total = 0.0
        for w in problem.workloads:
            rates = rates_of[w.model]
            costs = []
            for v in by_pair.get((w.model, acc.name), ()):
                caps = [capacity.get((v.name, label)) for label in rates]
                if any(c is None or c.max_rate_rps <= 0 for c in caps):
                    continue
                replicas = math.ceil(sum(r / c.max_rate_rps for r, c in zip(rates.values(), caps, strict=True)) - 1e-9)
                costs.append(max(replicas, v.min_replicas) * problem.variant_cost_per_hour(v))
            if not costs:
                break
            total += min(costs)
        else:
            if best is None or total < best[0]:
                best = (total, acc.name)
    return best


def decide(problem: Problem, warm_start: Any = None) -> tuple[Decision, dict[tuple[str, str], CapacityEstimate]]:
    """capacity_table + allocate, mapped to a `Decision`. No demand anywhere: every variant at its minimum.

    `warm_start`: the previous decision's `warm_start` (None: a cold start)."""
    if not problem.workloads:
        replicas = {v.name: v.min_replicas for v in problem.variants}
        cost = sum(problem.variant_cost_per_hour(v) * replicas[v.name] for v in problem.variants)
        return Decision(replicas=replicas, cost_per_hour=cost, message="no demand to size for"), {}
    from optimizer.allocation import allocate

    t0 = time.perf_counter()
    capacity = capacity_table(problem)
    t1 = time.perf_counter()
    rates = {k: e.max_rate_rps for k, e in capacity.items()}
    try:
        result = allocate(problem, rates, warm_start=warm_start)
    except Exception:
        if warm_start is None:
            raise
        # the warm start only saves time: should it ever break the solve, the cycle still gets its plan
        log.warning("warm-started allocation failed; solving cold", exc_info=True)
        result = allocate(problem, rates)
    decision = _decision_of(result, problem)
    return decision.model_copy(update={"capacity_s": t1 - t0, "solver_s": time.perf_counter() - t1}), capacity


def _decision_of(result, problem: Problem) -> Decision:
    """An `optimizer.allocation.Allocation` as the controller's `Decision` ("infeasible" = demand left unmet)."""
    routing: dict[tuple[str, str, str], float] = {}
    for r in result.routing:
        key = (r.model, r.bucket, r.variant)
        routing[key] = routing.get(key, 0.0) + float(r.weight)
    unmet = {m: float(x) for m, x in result.unmet_demand_rps.items()}
    status = "infeasible" if any(x > 1e-6 for x in unmet.values()) else str(result.status)
    message = "; ".join([*result.binding_constraints, *result.notes])
    return Decision(replicas={k: int(v) for k, v in result.replicas.items()}, routing=routing,
                    cost_per_hour=float(result.cost_per_hour), unmet_demand_rps=unmet, status=status,
                    message=message, gap=float(result.gap), warm_started=bool(result.warm_started),
                    warm_start=result.warm_start)
