"""The per-model MILPs of the decomposition in HiGHS itself (SciPy's bundled bindings), not through OR-Tools.

Why: the per-model MILPs are most of the decomposition's CPU time, and two things cost there:

* OR-Tools, when HiGHS stops on the relative gap, reports the objective as the best bound, so
  `SparseProgram.solve_milp` has to claim only objective - gap x objective: on a block that closes
  at the root that throws away most of the bound the search proved. HiGHS's own `mip_dual_bound`
  is the proof itself.
* each OR-Tools solve converts the model to HiGHS again; here the model is passed once and only
  the replica costs change between solves.

On the 54 fractional blocks of the 100-model benchmark (seed 1, LP prices, per-model gap 0.25 %,
each block's rounding as cutoff): 1.58 vs 2.04 CPU-s, and the bounds gain 47.5 instead of 45.4 $/h
over the blocks' LP values, same solutions (priced 1163.41 $/h in both).

Same search as `SparseProgram.solve_milp(small=True, cutoff=...)`: presolve and primal heuristics
off, one thread, a node limit and no clock, so answers do not depend on load; each solve starts
from a cleared solver, so a block's answer does not depend on which worker solved what before. The
cutoff is checked as there: a point above it, or none at all, repeats the solve without it, and no
point with the heuristics off repeats it with them on. SciPy has shipped these bindings
(`scipy.optimize._highspy`, which `scipy.optimize.milp` runs on) since 1.15; without them
`available()` is False and the blocks go through OR-Tools as before.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from optimizer.allocation_ortools import Answer

try:  # SciPy's private HiGHS bindings: present from SciPy 1.15
    from scipy.optimize._highspy import _core as _hc
except ImportError:  # pragma: no cover - depends on the installed SciPy
    _hc = None

_SMALL = {
    "presolve": "off", "mip_heuristic_effort": 0.0, "mip_heuristic_run_root_reduced_cost": False,
    "mip_heuristic_run_zi_round": False, "mip_heuristic_run_shifting": False, "mip_heuristic_run_rins": False,
    "mip_heuristic_run_rens": False, "mip_heuristic_run_feasibility_jump": False,
}
_HEURISTICS_ON = {
    "presolve": "off", "mip_heuristic_effort": 0.05, "mip_heuristic_run_root_reduced_cost": True,
    "mip_heuristic_run_zi_round": True, "mip_heuristic_run_shifting": True, "mip_heuristic_run_rins": True,
    "mip_heuristic_run_rens": True, "mip_heuristic_run_feasibility_jump": True,
}
_FEASIBLE = 2  # HiGHS's kSolutionStatusFeasible


def available() -> bool:
    return _hc is not None


class HighsBlockProgram:
    """One small MILP passed to HiGHS once; `set_cost` re-prices columns, `solve_milp` solves from scratch."""

    def __init__(self, cost: np.ndarray, col_lb: np.ndarray, col_ub: np.ndarray, integrality: np.ndarray,
                 matrix: sp.spmatrix, row_lb: np.ndarray, row_ub: np.ndarray):
        if _hc is None:
            raise RuntimeError("SciPy's HiGHS bindings are not installed")
        lp = _model(cost, col_lb, col_ub, matrix, row_lb, row_ub)
        lp.integrality_ = [_hc.HighsVarType.kInteger if v else _hc.HighsVarType.kContinuous for v in integrality]
        self._highs = _quiet_highs()
        self._set({"mip_abs_gap": 0.0})
        status = self._highs.passModel(lp)
        if status == _hc.HighsStatus.kError:
            raise RuntimeError("HiGHS rejected the block model")
        self.n_cols = len(cost)

    def _set(self, options: dict) -> None:
        for name, value in options.items():
            self._highs.setOptionValue(name, value)

    def set_cost(self, columns: np.ndarray, values: np.ndarray) -> None:
        """Change the objective coefficients of `columns` only."""
        idx = np.asarray(columns, dtype=np.int32)
        self._highs.changeColsCost(len(idx), idx, np.asarray(values, dtype=float))

    def solve_milp(self, relative_gap: float, *, node_limit: int, cutoff: float | None = None) -> Answer:
        """Branch-and-bound to `relative_gap` within `node_limit` nodes; `cutoff` as in SparseProgram.solve_milp."""
        limit = cutoff * (1 + 1e-9) + 1e-9 if cutoff is not None and math.isfinite(cutoff) else None
        self._set({"mip_rel_gap": max(float(relative_gap), 0.0), "mip_max_nodes": int(node_limit),
                   "time_limit": math.inf})
        answer = self._run(_SMALL, limit)
        if limit is not None and (answer.x is None or not answer.objective <= limit):
            answer = self._run(_SMALL, None)
        if answer.x is None:
            answer = self._run(_HEURISTICS_ON, None)
        return answer

    def solve_below(self, relative_gap: float, cutoff: float, time_limit_s: float, node_limit: int,
                    start: np.ndarray | None = None) -> Answer:
        """HiGHS's full search (presolve, heuristics) for a point cheaper than `cutoff`, the cost of a known one.

        One solve, no repeat: the answer's `x` is None when none was found in time, and its `bound`
        is then still HiGHS's proven bound (a valid bound on the optimum, which is at most `cutoff`
        as a point of that cost exists; -inf if the root was not done). `start`: that known point, as
        HiGHS's first incumbent (its improvement heuristics start from it); HiGHS checks it and drops
        it if it is not feasible.
        """
        self._set({"mip_rel_gap": max(float(relative_gap), 0.0), "mip_max_nodes": int(node_limit),
                   "time_limit": max(float(time_limit_s), 0.01), "presolve": "choose"})
        limit = cutoff * (1 + 1e-9) + 1e-9
        answer = self._run(_HEURISTICS_ON | {"presolve": "choose"}, limit, start)
        if answer.x is not None and answer.objective <= limit:
            return answer
        if answer.x is not None:  # above the cutoff: HiGHS's bound is then not to be trusted (see SparseProgram)
            return Answer(None, math.inf, -math.inf, False, None, answer.message)
        bound = float(self._highs.getInfo().mip_dual_bound)
        bound = min(bound, cutoff) if math.isfinite(bound) else -math.inf
        return Answer(None, math.inf, bound, False, None, answer.message)

    def _run(self, options: dict, limit: float | None, start: np.ndarray | None = None) -> Answer:
        self._set({**options, "objective_bound": math.inf if limit is None else float(limit)})
        self._highs.clearSolver()
        if start is not None:
            solution = _hc.HighsSolution()
            solution.col_value = np.asarray(start, dtype=float)
            solution.value_valid = True
            self._highs.setSolution(solution)
        self._highs.run()
        info = self._highs.getInfo()
        status = self._highs.getModelStatus()
        if info.primal_solution_status != _FEASIBLE:
            return Answer(None, math.inf, -math.inf, False, None, self._highs.modelStatusToString(status))
        x = np.asarray(self._highs.getSolution().col_value, dtype=float)
        objective = float(info.objective_function_value)
        bound = float(info.mip_dual_bound)
        if not math.isfinite(bound):
            bound = -math.inf
        return Answer(x, objective, min(bound, objective), status == _hc.HighsModelStatus.kOptimal, None,
                      self._highs.modelStatusToString(status))


def solve_lp(cost: np.ndarray, col_lb: np.ndarray, col_ub: np.ndarray, matrix: sp.spmatrix, row_lb: np.ndarray,
             row_ub: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(solution, row duals) of an LP by HiGHS's dual simplex, presolve off; None without the bindings or an optimum.

    Row duals in HiGHS's sign: for a minimisation, a `<=` row at its bound has a dual <= 0. The
    allocation's LP relaxation (100 models: 14,108 rows, 14,576 columns) takes 0.19 s CPU this way
    against 0.26-0.29 s through `scipy.optimize.linprog` (which splits ranged rows and copies the
    matrix twice), for the same value and prices.
    """
    if _hc is None:
        return None
    highs = _quiet_highs()
    for name, value in {"presolve": "off", "solver": "simplex"}.items():
        highs.setOptionValue(name, value)
    if highs.passModel(_model(cost, col_lb, col_ub, matrix, row_lb, row_ub)) == _hc.HighsStatus.kError:
        return None
    highs.run()
    if highs.getModelStatus() != _hc.HighsModelStatus.kOptimal:
        return None
    solution = highs.getSolution()
    return np.asarray(solution.col_value, dtype=float), np.asarray(solution.row_dual, dtype=float)


def _quiet_highs():
    highs = _hc._Highs()
    for name, value in {"output_flag": False, "log_to_console": False, "threads": 1}.items():
        highs.setOptionValue(name, value)
    return highs


def _model(cost, col_lb, col_ub, matrix, row_lb, row_ub):
    """A HiGHS LP from arrays (infinite bounds as HiGHS's infinity) and a sparse matrix."""
    inf = _hc.kHighsInf
    lp = _hc.HighsLp()
    lp.num_col_, lp.num_row_ = len(cost), matrix.shape[0]
    lp.col_cost_ = np.asarray(cost, dtype=float)
    lp.col_lower_ = np.where(np.isfinite(col_lb), col_lb, -inf).astype(float)
    lp.col_upper_ = np.where(np.isfinite(col_ub), col_ub, inf).astype(float)
    lp.row_lower_ = np.where(np.isfinite(row_lb), row_lb, -inf).astype(float)
    lp.row_upper_ = np.where(np.isfinite(row_ub), row_ub, inf).astype(float)
    csc = sp.csc_matrix(matrix, dtype=float)
    lp.a_matrix_.format_ = _hc.MatrixFormat.kColwise
    lp.a_matrix_.start_ = csc.indptr
    lp.a_matrix_.index_ = csc.indices
    lp.a_matrix_.value_ = csc.data
    return lp
