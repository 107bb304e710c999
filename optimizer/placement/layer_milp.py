"""A bounded MILP that proves (or improves) layer placements, one target flow at a time.

Helix's own MILP (a binary per node and layer count, big-M link switches) has a weak LP
relaxation: Gurobi needed ~1 h on 10 nodes and open solvers stall. Two changes make it usable here:

* Aggregation: nodes of one machine type (and region) are interchangeable, so the variables are
  n[c, s, k] = how many class-c nodes hold layers [s, s + k) (integer) and x[c, s, k] their flow.
  Balance at every layer boundary b says: the flow of ranges ending at b equals the flow of ranges
  starting at b (exact adjacency, links and NICs left out -- a relaxation, so bounds stay valid).
* A fixed target F: a slot never carries more than the whole flow, so x <= min(T(k), F) * n holds
  for every integer solution that reaches F. Without F fixed the LP lets a fraction of a fast node
  serve one layer at its one-layer speed; with it the LP is at least as tight as
  ``bounds.layer_capacity_bound``.

``prove_or_improve`` bisects on F between the best placement known and an upper bound: an
infeasible target (proven by SCIP within its time limit) lowers the bound, a feasible one is a
better placement. Timeouts leave the interval where it was; the result reports what was proven.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ortools.linear_solver import pywraplp

from optimizer.placement.stage_chain import NodeClass

FEASIBLE, INFEASIBLE, UNKNOWN = "feasible", "infeasible", "unknown"


@dataclass(frozen=True)
class Slot:
    cls: int
    start: int
    layers: int


@dataclass
class TargetOutcome:
    status: str
    slots: dict[Slot, int] = field(default_factory=dict)


def solve_target(classes: list[NodeClass], table: dict[str, tuple[float, ...]], num_layers: int,
                 target: float, time_limit_s: float) -> TargetOutcome:
    """Is there a placement whose (link-free, exact-adjacency) max flow reaches `target`?"""
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:
        return TargetOutcome(UNKNOWN)
    n: dict[Slot, pywraplp.Variable] = {}
    x: dict[Slot, pywraplp.Variable] = {}
    starts: dict[int, list] = {b: [] for b in range(num_layers + 1)}
    ends: dict[int, list] = {b: [] for b in range(num_layers + 1)}
    for ci, c in enumerate(classes):
        row = table[c.machine]
        per_class = []
        for k in range(1, min(len(row) - 1, num_layers) + 1):
            cap = min(row[k], target)
            if cap <= 0:
                continue
            for s in range(0, num_layers - k + 1):
                slot = Slot(ci, s, k)
                n[slot] = solver.IntVar(0, c.count, "")
                x[slot] = solver.NumVar(0, cap * c.count, "")
                solver.Add(x[slot] <= cap * n[slot])
                per_class.append(n[slot])
                starts[s].append(x[slot])
                ends[s + k].append(x[slot])
        if per_class:
            solver.Add(solver.Sum(per_class) <= c.count)
    if not starts[0] or not ends[num_layers]:
        return TargetOutcome(INFEASIBLE)
    for b in range(1, num_layers):
        solver.Add(solver.Sum(ends[b]) == solver.Sum(starts[b]))
    solver.Add(solver.Sum(starts[0]) >= target)
    solver.Maximize(solver.Sum(starts[0]))
    solver.SetTimeLimit(max(1, int(time_limit_s * 1000)))
    status = solver.Solve()
    if status in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        chosen = {slot: round(var.solution_value()) for slot, var in n.items() if var.solution_value() > 0.5}
        return TargetOutcome(FEASIBLE, chosen)
    if status == pywraplp.Solver.INFEASIBLE:
        return TargetOutcome(INFEASIBLE)
    return TargetOutcome(UNKNOWN)


@dataclass
class BisectionResult:
    upper_bound: float
    best_flow: float
    best_slots: dict[Slot, int] | None
    steps: list[tuple[float, str, float]] = field(default_factory=list)


def prove_or_improve(classes: list[NodeClass], table: dict[str, tuple[float, ...]], num_layers: int,
                     lower: float, upper: float, time_limit_s: float, *, rel_gap: float = 1e-4,
                     max_steps: int = 30) -> BisectionResult:
    """Narrow [lower, upper] by solving fixed-target MILPs until the gap or the time runs out."""
    deadline = time.monotonic() + time_limit_s
    result = BisectionResult(upper_bound=upper, best_flow=lower, best_slots=None)
    lo, hi = lower, upper
    for _ in range(max_steps):
        left = deadline - time.monotonic()
        if hi - lo <= rel_gap * max(hi, 1e-9) or left < 0.5:
            break
        target = (lo + hi) / 2 if lo > 0 else hi / 2
        began = time.monotonic()
        outcome = solve_target(classes, table, num_layers, target, min(left, max(2.0, left / 3)))
        result.steps.append((target, outcome.status, time.monotonic() - began))
        if outcome.status == INFEASIBLE:
            hi = result.upper_bound = target
        elif outcome.status == FEASIBLE:
            lo = target
            result.best_flow, result.best_slots = target, outcome.slots
        else:
            break
    return result
