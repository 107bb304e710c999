"""The whole allocation as one MILP: every model's block side by side plus the coupling rows.

Right for small fleets, where one HiGHS branch-and-bound (through OR-Tools, see
optimizer.allocation_ortools) proves optimality faster than any decomposition can set itself up;
with many models the inventory rows tie the blocks together and the monolithic search stalls (see
optimizer.allocation_lagrangian).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from optimizer import allocation_highs
from optimizer.allocation_block_solver import quiet_stdout
from optimizer.allocation_formulation import Formulation, LagrangianCut, Solution, gap_status, proven_gap
from optimizer.allocation_highs import HighsBlockProgram
from optimizer.allocation_ortools import SparseProgram

NODE_LIMIT = 200_000
CUT_SLACK = 1e-7


def stacked(form: Formulation):
    """Block-diagonal matrix of all blocks with the coupling rows underneath, and column offsets."""
    offsets = np.cumsum([0] + [b.n_cols for b in form.blocks])
    blocks = sp.block_diag([b.matrix for b in form.blocks], format="csr")
    coupling = sp.hstack([_coupling_block(form, b) for b in form.blocks], format="csr")
    matrix = sp.vstack([blocks, coupling], format="csr")
    row_lb = np.concatenate([b.row_lb for b in form.blocks] + [np.full(coupling.shape[0], -np.inf)])
    row_ub = np.concatenate([b.row_ub for b in form.blocks] + [form.coupling_rhs])
    return matrix, row_lb, row_ub, offsets


def _coupling_block(form: Formulation, block) -> sp.csr_matrix:
    usage = form.coupling_usage(block)
    full = np.zeros((usage.shape[0], block.n_cols))
    full[:, block.col_n] = usage
    return sp.csr_matrix(full)


class NoMilpSolution(RuntimeError):
    """HiGHS stopped (time or node limit) before it found any integer solution (below the cutoff, if one
    was given); `bound` is what it proved all the same (-inf if nothing)."""

    def __init__(self, message: str, bound: float = -np.inf):
        super().__init__(message)
        self.bound = bound


def with_cuts(form: Formulation, matrix: sp.csr_matrix, row_lb: np.ndarray, row_ub: np.ndarray,
              offsets: np.ndarray, cuts: Sequence[LagrangianCut]):
    """The stacked MILP with one `>=` row per Lagrangian cut (its block's priced costs >= its bound).

    Each bound is eased by CUT_SLACK (relative) so that HiGHS's own tolerances in proving it can
    never cut off an optimal allocation."""
    if not cuts:
        return matrix, row_lb, row_ub
    rows, cols, vals = [], [], []
    for r, cut in enumerate(cuts):
        block = form.blocks[cut.block]
        priced = form.priced_cost(block, cut.prices)
        nonzero = np.nonzero(priced)[0]
        rows.append(np.full(len(nonzero), r))
        cols.append(offsets[cut.block] + nonzero)
        vals.append(priced[nonzero])
    extra = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(len(cuts), matrix.shape[1]))
    bounds = np.array([c.bound - CUT_SLACK * max(1.0, abs(c.bound)) for c in cuts])
    return (sp.vstack([matrix, extra], format="csr"), np.concatenate([row_lb, bounds]),
            np.concatenate([row_ub, np.full(len(cuts), np.inf)]))


def solve_monolithic(form: Formulation, time_limit_s: float, relative_gap: float,
                     cutoff: float | None = None, cuts: Sequence[LagrangianCut] = (),
                     start: list[np.ndarray] | None = None, node_limit: int = NODE_LIMIT) -> Solution:
    """One MILP; the answer carries HiGHS's own proven bound (its best bound when stopped early).

    `cutoff`: the objective of a known allocation (the decomposition's, when this runs after it):
    only cheaper ones are searched for, by HiGHS directly where SciPy ships its bindings
    (optimizer.allocation_highs), which also reports its bound when it finds none. On the 10-model
    benchmark seeds where the decomposition stalls on its duality gap, that search finds 407.0 vs
    the decomposition's 409.7 $/h within 1 s (seed 3), and proves 1 % in 6.3 s where OR-Tools took
    15.6 s (seed 2).

    `cuts` (the decomposition's, `with_cuts`) lift the LP relaxation from 196.4 to the Lagrangian
    bound 207.6 $/h on seed 2 (HiGHS's own root cuts reach 196.4), so branching starts from the
    decomposition's proof instead of re-proving it; `start` (the decomposition's columns) is HiGHS's
    first incumbent. `node_limit` bounds the search (1: the root only).
    """
    began = time.perf_counter()
    matrix, row_lb, row_ub, offsets = stacked(form)
    cost = np.concatenate([b.cost for b in form.blocks])
    lb = np.concatenate([b.col_lb for b in form.blocks])
    ub = np.concatenate([b.col_ub for b in form.blocks])
    integrality = np.concatenate([b.integrality for b in form.blocks])
    if cutoff is not None and math.isfinite(cutoff) and allocation_highs.available():
        matrix, row_lb, row_ub = with_cuts(form, matrix, row_lb, row_ub, offsets, cuts)
        program = HighsBlockProgram(cost, lb, ub, integrality, matrix, row_lb, row_ub)
        remaining = max(time_limit_s - (time.perf_counter() - began), 0.05)
        with quiet_stdout():
            res = program.solve_below(relative_gap, cutoff, remaining, node_limit,
                                      start=None if start is None else np.concatenate(start))
        if res.x is None:
            raise NoMilpSolution(f"the allocation MILP found nothing below {cutoff:g}: {res.message}", res.bound)
    else:
        model = SparseProgram(cost, lb, ub, integrality, matrix, row_lb, row_ub)
        remaining = max(time_limit_s - (time.perf_counter() - began), 0.05)
        with quiet_stdout():
            res = model.solve_milp(relative_gap, time_limit_s=remaining, node_limit=node_limit)
        if res.x is None:
            raise NoMilpSolution(f"the allocation MILP found no solution: {res.message}")
    columns = [res.x[offsets[i]:offsets[i + 1]] for i in range(len(form.blocks))]
    out_of_time = time.perf_counter() - began >= time_limit_s * 0.99
    stopped_by = "time_limit" if out_of_time else "iteration_limit"
    status = gap_status(proven_gap(res.objective, res.bound), relative_gap, stopped_by)
    return Solution(columns=columns, objective=res.objective, lower_bound=min(res.bound, res.objective),
                    status=status, method="monolithic")
