"""Sparse MILPs and LPs of the allocation, solved with OR-Tools (HiGHS for MILPs, GLOP for dual prices).

Why this shape: every solve in the allocation starts from a SciPy sparse matrix with row and column
bounds. OR-Tools' model-builder helper loads such data in one C++ call
(`fill_model_from_sparse_data`), so building a model never costs Python time per nonzero, and a
model built once can be re-solved after changing only objective coefficients (the Lagrangian
prices). Backends, chosen by benchmark on the allocation instances:

* MILPs: HiGHS (bundled with OR-Tools). SCIP was ~10x slower on the per-model problems, and CP-SAT
  rounds the continuous routing shares to its integer scaling, so its optimum was off by 2 %.
* LPs whose duals are needed: GLOP. OR-Tools' HiGHS wrapper reports row activities where the duals
  should be, so its duals cannot price inventory.

Every solve is single-threaded with HiGHS's fixed default seed and its console output off: results do
not depend on the machine's load, and the CLI's JSON on stdout stays clean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from ortools.linear_solver.python import model_builder_helper as mbh

_OPTIMAL = mbh.SolveStatus.OPTIMAL
_FEASIBLE = mbh.SolveStatus.FEASIBLE
# HiGHS options for the small per-model MILPs (see SparseProgram.solve_milp)
SMALL_PARAMS = [
    "presolve = off", "mip_heuristic_effort = 0", "mip_heuristic_run_root_reduced_cost = false",
    "mip_heuristic_run_zi_round = false", "mip_heuristic_run_shifting = false", "mip_heuristic_run_rins = false",
    "mip_heuristic_run_rens = false", "mip_heuristic_run_feasibility_jump = false",
]


@dataclass
class Answer:
    """What one solve returned. `x` is None when no feasible point was found."""

    x: np.ndarray | None
    objective: float
    bound: float  # proven lower bound (the MILP's best bound; the objective for an LP)
    optimal: bool  # solved to the requested gap, not stopped by a limit
    duals: np.ndarray | None  # per row, LPs only (GLOP sign: <= rows of a minimisation are <= 0)
    message: str


class SparseProgram:
    """One MILP or LP in OR-Tools, built once from sparse arrays; its objective may change between solves."""

    def __init__(self, cost: np.ndarray, col_lb: np.ndarray, col_ub: np.ndarray, integrality: np.ndarray | None,
                 matrix: sp.spmatrix, row_lb: np.ndarray, row_ub: np.ndarray):
        self._model = mbh.ModelBuilderHelper()
        self._model.fill_model_from_sparse_data(
            np.asarray(col_lb, dtype=float), np.asarray(col_ub, dtype=float), np.asarray(cost, dtype=float),
            np.asarray(row_lb, dtype=float), np.asarray(row_ub, dtype=float), sp.csr_matrix(matrix, dtype=float))
        self.integer = False
        if integrality is not None:
            for j in np.nonzero(integrality)[0]:
                self._model.set_var_integrality(int(j), True)
                self.integer = True
        self.n_cols = len(cost)

    def set_cost(self, columns: np.ndarray, values: np.ndarray) -> None:
        """Change the objective coefficients of `columns` only; everything else stays as built."""
        self._model.set_objective_coefficients([int(j) for j in columns], [float(v) for v in values])

    def solve_milp(self, relative_gap: float, *, time_limit_s: float | None = None,
                   node_limit: int | None = None, small: bool = False, cutoff: float | None = None) -> Answer:
        """HiGHS branch-and-bound to `relative_gap`, stopped by a node count and/or a clock.

        `small`: skip presolve and every primal heuristic. The per-model MILPs mostly close at the
        root, where these cost more than they save: presolve and the heuristic effort cost about 17 %
        of the CPU time on the benchmark's models, and the heuristics that `mip_heuristic_effort = 0`
        leaves on (root reduced cost, RINS, RENS, shifting, zero-one rounding, feasibility jump)
        another 40 % of what is left, for the same bounds (54 fractional blocks of the 100-model
        instance at LP prices: 3.4 s -> 2.05 s CPU). Should that find no integer point within the
        node limit, the solve is repeated with the heuristics on, so the caller still gets one.

        `cutoff`: the objective of a known feasible point (a rounding). HiGHS prunes every node whose
        bound reaches it from the start, as it would with that point as incumbent (a MIP start through
        `add_hint` crashes HiGHS); the bound stays valid, as pruned nodes cannot hold anything cheaper.
        Same answers, 16 % less CPU on those 54 blocks (2.03 -> 1.71 s). Should nothing beat the cutoff,
        the solve is repeated without it: also when HiGHS returns a point above the cutoff, which it does,
        with status OPTIMAL and a bound above the true optimum, when the cutoff is below the optimum (a
        test pins this), so a wrong cutoff costs a second solve, never a wrong bound.
        """
        limit = cutoff * (1 + 1e-9) + 1e-9 if cutoff is not None and math.isfinite(cutoff) else None
        extra = [f"objective_bound = {limit!r}"] if limit is not None else []
        answer = self._solve_milp(relative_gap, time_limit_s, node_limit, (SMALL_PARAMS if small else []) + extra)
        if limit is not None and (answer.x is None or not answer.objective <= limit):
            answer = self._solve_milp(relative_gap, time_limit_s, node_limit, SMALL_PARAMS if small else [])
        if small and answer.x is None:
            answer = self._solve_milp(relative_gap, time_limit_s, node_limit, ["presolve = off"])
        return answer

    def _solve_milp(self, relative_gap: float, time_limit_s: float | None, node_limit: int | None,
                    extra: list[str]) -> Answer:
        params = ["output_flag = false", "threads = 1", f"mip_rel_gap = {max(relative_gap, 0.0)!r}", "mip_abs_gap = 0"]
        params += extra
        if node_limit is not None:
            params.append(f"mip_max_nodes = {int(node_limit)}")
        solver = mbh.ModelSolverHelper("highs")
        solver.enable_output(False)
        solver.set_solver_specific_parameters("\n".join(params))
        if time_limit_s is not None:
            solver.set_time_limit_in_seconds(max(float(time_limit_s), 0.01))
        solver.solve(self._model)
        status = solver.status()
        if status not in (_OPTIMAL, _FEASIBLE) or not solver.has_solution():
            return Answer(None, math.inf, -math.inf, False, None, solver.status_string() or str(status))
        objective = float(solver.objective_value())
        bound = float(solver.best_objective_bound()) if self.integer else objective
        if not math.isfinite(bound):
            bound = -math.inf
        if self.integer and status == _OPTIMAL:
            # Stopped on the gap, OR-Tools reports the objective itself as the best bound (a block MILP
            # said 7592.48 with bound 7592.48; its optimum is 7589.27): only HiGHS's own stopping rule,
            # the relative gap (absolute gap off), is a proof: bound = objective - gap x max(|objective|, 1).
            bound = min(bound, objective - max(relative_gap, 0.0) * max(abs(objective), 1.0))
        return Answer(np.asarray(solver.variable_values(), dtype=float), objective, min(bound, objective),
                      status == _OPTIMAL, None, str(status))

    def solve_lp_with_duals(self) -> Answer:
        """GLOP's dual simplex to optimality (about 40 % less CPU than its primal default on the
        allocation's LP relaxation); the row duals come back with the solution."""
        solver = mbh.ModelSolverHelper("glop")
        solver.enable_output(False)
        solver.set_solver_specific_parameters("use_dual_simplex: true")
        solver.solve(self._model)
        status = solver.status()
        if status != _OPTIMAL:
            return Answer(None, math.inf, -math.inf, False, None, solver.status_string() or str(status))
        objective = float(solver.objective_value())
        return Answer(np.asarray(solver.variable_values(), dtype=float), objective, objective, True,
                      np.asarray(solver.dual_values(), dtype=float), str(status))
