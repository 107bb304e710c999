"""Per-model MILPs in HiGHS itself (optimizer.allocation_highs): same answers as OR-Tools, bounds that are
HiGHS's own proof (valid, and tighter than what OR-Tools lets the caller claim), independent of history."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from test_allocation import EXACT, many_models
from test_allocation_first_pass import _first_pass, instances
from test_allocation_ortools import knapsack_like

from optimizer import allocation_highs
from optimizer.allocation_block_solver import BlockModels, solve_block
from optimizer.allocation_formulation import build_formulation
from optimizer.allocation_highs import HighsBlockProgram
from optimizer.allocation_lagrangian import _block_lp, _lp_relaxation, solve_lagrangian
from optimizer.allocation_monolithic import NoMilpSolution, solve_monolithic, stacked
from optimizer.allocation_ortools import SparseProgram

pytestmark = pytest.mark.skipif(not allocation_highs.available(), reason="SciPy without its HiGHS bindings")


def _reference(cost, lb, ub, integ, a, rlb, rub) -> float:
    return milp(cost, integrality=integ, bounds=Bounds(lb, ub), constraints=LinearConstraint(a, rlb, rub)).fun


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_cutoff_at_above_or_below_the_optimum_still_gives_the_optimum_and_a_valid_bound(seed):
    cost, lb, ub, integ, a, rlb, rub = knapsack_like(seed)
    best = _reference(cost, lb, ub, integ, a, rlb, rub)
    program = HighsBlockProgram(cost, lb, ub, integ, a, rlb, rub)
    for cutoff in (1.2 * best, best, 0.5 * best, None):
        answer = program.solve_milp(1e-9, node_limit=10_000, cutoff=cutoff)
        assert answer.x is not None, cutoff
        assert answer.objective == pytest.approx(best, rel=1e-6)
        assert answer.bound <= best + 1e-6
        assert float(cost @ answer.x) == pytest.approx(answer.objective, rel=1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_repriced_program_solves_like_a_fresh_one_whatever_it_solved_before(seed):
    cost, lb, ub, integ, a, rlb, rub = knapsack_like(seed)
    changed = np.array([0, 3, 7])
    new_cost = cost.copy()
    new_cost[changed] = np.random.default_rng(seed + 100).uniform(0.1, 8.0, len(changed))
    used = HighsBlockProgram(cost, lb, ub, integ, a, rlb, rub)
    used.solve_milp(1e-9, node_limit=10_000)
    used.set_cost(changed, new_cost[changed])
    fresh = HighsBlockProgram(new_cost, lb, ub, integ, a, rlb, rub)
    first, second = used.solve_milp(1e-9, node_limit=10_000), fresh.solve_milp(1e-9, node_limit=10_000)
    assert first.objective == pytest.approx(_reference(new_cost, lb, ub, integ, a, rlb, rub), rel=1e-6)
    assert np.array_equal(first.x, second.x) and first.bound == second.bound


def test_node_limited_solve_reports_a_valid_bound_and_infeasible_has_no_point():
    cost, lb, ub, integ, a, rlb, rub = knapsack_like(4)
    best = _reference(cost, lb, ub, integ, a, rlb, rub)
    cut = HighsBlockProgram(cost, lb, ub, integ, a, rlb, rub).solve_milp(1e-9, node_limit=1)
    assert cut.x is not None
    assert cut.bound <= best + 1e-7 <= cut.objective + 2e-7
    row = sp.csr_matrix(np.array([[1.0, 1.0]]))
    infeasible = HighsBlockProgram(np.ones(2), np.zeros(2), np.ones(2), np.ones(2), row, np.array([3.0]),
                                   np.array([np.inf]))
    assert infeasible.solve_milp(0.0, node_limit=100).x is None


def test_block_bounds_are_valid_and_prove_more_than_objective_minus_gap():
    """On the benchmark's blocks at the LP's prices: every bound is at most the block's optimum (an exact
    OR-Tools solve), the answers are within the gap of it, and where HiGHS stops on the gap its own bound
    proves more than the objective minus the gap that OR-Tools' report leaves the caller."""
    form, prices, lp_x, _, pending = _first_pass(30, seed=1)
    models = BlockModels(form)
    assert models.direct
    gap, tighter = 0.0025, 0
    for i in pending[:12]:
        res = solve_block(models, i, prices, gap)
        block = form.blocks[i]
        priced = form.priced_cost(block, prices)
        exact = SparseProgram(priced, block.col_lb, block.col_ub, block.integrality, block.matrix, block.row_lb,
                              block.row_ub).solve_milp(1e-9, node_limit=100_000)
        value = float(priced @ res.x)
        assert res.bound <= exact.objective + 1e-7
        assert exact.objective - 1e-7 <= value <= exact.objective + gap * abs(exact.objective) + 1e-7
        tighter += res.bound > value - gap * max(abs(value), 1.0) + 1e-9
    assert tighter > 0


def test_lp_relaxation_in_highs_itself_has_linprogs_value_and_prices_that_prove_it():
    """The LP's coupling prices are optimal duals: every block's LP part is optimal for that block priced at
    them, so the Lagrangian bound at those prices equals the LP value (what the decomposition relies on)."""
    form, prices, lp_x, _, _ = _first_pass(20, seed=2)
    value = sum(float(b.cost @ lp_x[i]) for i, b in enumerate(form.blocks))
    matrix, row_lb, row_ub, _ = stacked(form)
    cost = np.concatenate([b.cost for b in form.blocks])
    bounds = np.column_stack([np.concatenate([b.col_lb for b in form.blocks]),
                              np.concatenate([b.col_ub for b in form.blocks])])
    eq = row_lb == row_ub
    le, ge = ~eq & np.isfinite(row_ub), ~eq & np.isfinite(row_lb)
    ref = linprog(cost, A_ub=sp.vstack([matrix[le], -matrix[ge]]), b_ub=np.concatenate([row_ub[le], -row_lb[ge]]),
                  A_eq=matrix[eq], b_eq=row_ub[eq], bounds=bounds, method="highs")
    assert value == pytest.approx(ref.fun, rel=1e-9)
    assert allocation_highs.solve_lp(cost, bounds[:, 0], bounds[:, 1], matrix, row_lb, row_ub) is not None
    lagrangian = sum(_block_lp(form, b, prices)[1] for b in form.blocks) - float(prices @ form.coupling_rhs)
    assert lagrangian == pytest.approx(value, rel=1e-7)
    assert _lp_relaxation(form)[0] == pytest.approx(prices)


@pytest.mark.parametrize("seed", [1, 2])
def test_monolithic_search_below_a_known_cost_finds_cheaper_or_proves_a_valid_bound(seed):
    """After the decomposition, the monolithic MILP searches only below the decomposition's cost: above the
    optimum it returns a cheaper point and a valid bound; at the optimum it finds none, and its bound is
    still valid (never above the optimum) and what `allocate` keeps."""
    prob, capacity = many_models(seed, n_models=6, **EXACT)
    form = build_formulation(prob, capacity, prob.options)
    exact = solve_monolithic(form, 60.0, 1e-9)
    assert exact.status == "optimal"
    above = solve_monolithic(form, 60.0, 1e-9, cutoff=exact.objective * 1.05)
    assert above.objective == pytest.approx(exact.objective, rel=1e-7)
    assert above.lower_bound <= exact.objective + 1e-6
    with pytest.raises(NoMilpSolution) as none:
        solve_monolithic(form, 60.0, 1e-9, cutoff=exact.objective * (1 - 1e-7))
    assert none.value.bound <= exact.objective + 1e-6



@pytest.mark.parametrize("seed", [2, 3, 4])
def test_lagrangian_cuts_hold_for_the_optimum_and_lift_the_monolithic_root_to_the_decompositions_bound(seed):
    """Each cut the decomposition hands the monolithic search (a block's priced cost >= its proven bound
    at some prices) must hold for the optimal allocation's own columns. These 3-model fleets have a
    duality gap (the decomposition alone proves less than the optimum) and a root LP below the
    decomposition's bound; with the cuts the root alone proves that bound, and the search still ends at
    the optimum."""
    inst = instances.make_instance(3, seed=seed)
    form = build_formulation(inst.problem, inst.capacity, inst.problem.options)
    exact = solve_monolithic(form, 60.0, 1e-9)
    assert exact.status == "optimal"
    dec = solve_lagrangian(form, 60.0, 1e-9, workers=1)
    assert dec.lower_bound < exact.objective - 1e-3 < dec.objective  # the duality gap this is about
    assert len(dec.cuts) >= len(form.blocks)
    for cut in dec.cuts:
        priced = float(form.priced_cost(form.blocks[cut.block], cut.prices) @ exact.columns[cut.block])
        assert priced >= cut.bound - 1e-7 * max(1.0, abs(cut.bound)), cut
    kwargs = {"cutoff": dec.objective, "start": dec.columns, "node_limit": 1}
    bare = solve_monolithic(form, 60.0, 1e-9, **kwargs)
    root = solve_monolithic(form, 60.0, 1e-9, cuts=dec.cuts, **kwargs)
    assert bare.lower_bound < dec.lower_bound - 1e-3
    assert dec.lower_bound - 1e-6 * abs(dec.lower_bound) <= root.lower_bound <= exact.objective + 1e-6
    assert root.objective <= dec.objective + 1e-6  # the start is HiGHS's incumbent
    full = solve_monolithic(form, 60.0, 1e-9, cutoff=dec.objective, cuts=dec.cuts, start=dec.columns)
    assert full.objective == pytest.approx(exact.objective, rel=1e-7)
    assert full.lower_bound <= exact.objective + 1e-6
