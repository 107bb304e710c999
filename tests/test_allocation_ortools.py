"""The OR-Tools layer under the allocation: re-priced models solve like freshly built ones, GLOP's duals
are the LP's true prices, bounds never exceed objectives, and nothing reaches stdout."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from optimizer.allocation import allocate
from optimizer.allocation_ortools import SparseProgram
from optimizer.fleet import Accelerator, ModelSpec, Role, Variant
from optimizer.problem import AllocationOptions, Problem
from optimizer.profile import ParametricProfile
from optimizer.workload import SLO, LengthBucket, Workload


def knapsack_like(seed: int):
    """Covering rows with integer and continuous columns: min c.x, A x >= d, a budget row <= B."""
    rng = np.random.default_rng(seed)
    n_int, n_cont, n_rows = 6, 8, 5
    n = n_int + n_cont
    matrix = sp.random(n_rows, n, density=0.6, random_state=seed, data_rvs=lambda k: rng.uniform(0.5, 3.0, k))
    budget = sp.csr_matrix(rng.uniform(0.5, 2.0, (1, n)))
    a = sp.vstack([matrix, budget], format="csr")
    row_lb = np.concatenate([rng.uniform(1.0, 4.0, n_rows), [-np.inf]])
    row_ub = np.concatenate([np.full(n_rows, np.inf), [40.0]])
    col_ub = np.concatenate([np.full(n_int, 5.0), np.full(n_cont, 2.0)])
    integrality = np.concatenate([np.ones(n_int), np.zeros(n_cont)]).astype(np.uint8)
    cost = rng.uniform(1.0, 5.0, n)
    return cost, np.zeros(n), col_ub, integrality, a, row_lb, row_ub


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_cutoff_prunes_without_changing_the_optimum_and_a_wrong_one_still_gets_a_solution(seed):
    """`solve_milp(cutoff=...)`: at or above the optimum (the decomposition passes a known column's cost) the
    optimum and a valid bound come back; at a cutoff below the optimum nothing beats it, and the solve is repeated
    without it, so the caller still gets the optimum rather than no point."""
    cost, lb, ub, integ, a, rlb, rub = knapsack_like(seed)
    reference = milp(cost, integrality=integ, bounds=Bounds(lb, ub), constraints=LinearConstraint(a, rlb, rub))
    for cutoff in (1.2 * reference.fun, reference.fun, 0.5 * reference.fun):
        answer = SparseProgram(cost, lb, ub, integ, a, rlb, rub).solve_milp(1e-9, small=True, cutoff=cutoff)
        assert answer.x is not None, cutoff
        assert answer.objective == pytest.approx(reference.fun, rel=1e-6)
        assert answer.bound <= reference.fun + 1e-6


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_repriced_model_solves_like_a_fresh_one(seed):
    cost, lb, ub, integ, a, rlb, rub = knapsack_like(seed)
    program = SparseProgram(cost, lb, ub, integ, a, rlb, rub)
    program.solve_milp(1e-9)
    changed = np.array([0, 3, 7])
    new_cost = cost.copy()
    new_cost[changed] = np.random.default_rng(seed + 100).uniform(0.1, 8.0, len(changed))
    program.set_cost(changed, new_cost[changed])
    repriced = program.solve_milp(1e-9)
    reference = milp(new_cost, integrality=integ, bounds=Bounds(lb, ub), constraints=LinearConstraint(a, rlb, rub))
    assert repriced.optimal
    assert repriced.objective == pytest.approx(reference.fun, rel=1e-6)
    assert repriced.bound <= repriced.objective + 1e-9
    assert float(new_cost @ repriced.x) == pytest.approx(repriced.objective, rel=1e-9)
    assert np.allclose(repriced.x[integ == 1], np.rint(repriced.x[integ == 1]), atol=1e-6)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_glop_duals_are_the_lp_prices(seed):
    cost, lb, ub, _, a, rlb, rub = knapsack_like(seed)
    answer = SparseProgram(cost, lb, ub, None, a, rlb, rub).solve_lp_with_duals()
    ge = np.isfinite(rlb)
    ref = linprog(cost, A_ub=sp.vstack([-a[ge], a[~ge]]), b_ub=np.concatenate([-rlb[ge], rub[~ge]]),
                  bounds=np.column_stack([lb, ub]), method="highs")
    assert answer.objective == pytest.approx(ref.fun, rel=1e-7)
    # SciPy's marginals are d(objective)/d(b_ub); GLOP's duals are d(objective)/d(row bound)
    expected = np.concatenate([-ref.ineqlin.marginals[: ge.sum()], ref.ineqlin.marginals[ge.sum():]])
    assert np.allclose(answer.duals, expected, atol=1e-7)
    assert np.all(answer.duals[ge] >= -1e-9) and np.all(answer.duals[~ge] <= 1e-9)


def test_node_limited_milp_reports_a_valid_bound():
    cost, lb, ub, integ, a, rlb, rub = knapsack_like(4)
    exact = SparseProgram(cost, lb, ub, integ, a, rlb, rub).solve_milp(1e-9)
    cut = SparseProgram(cost, lb, ub, integ, a, rlb, rub).solve_milp(1e-9, node_limit=1, small=True)
    assert cut.x is not None
    assert cut.bound <= exact.objective + 1e-7 <= cut.objective + 2e-7


def test_infeasible_program_has_no_solution():
    a = sp.csr_matrix(np.array([[1.0, 1.0]]))
    program = SparseProgram(np.ones(2), np.zeros(2), np.ones(2), np.ones(2), a, np.array([3.0]), np.array([np.inf]))
    assert program.solve_milp(0.0).x is None
    assert SparseProgram(np.ones(2), np.zeros(2), np.ones(2), None, a, np.array([3.0]),
                         np.array([np.inf])).solve_lp_with_duals().x is None


def test_allocation_writes_nothing_to_stdout(capfd):
    """The CLI prints its JSON on stdout; HiGHS must not print there, whichever solver path runs."""
    profile = ParametricProfile(decode_base_s=0.02, prefill_per_token_s=1e-4)
    accs = [Accelerator(name="a", memory_gb=80, cost_per_hour=2.0, available=4),
            Accelerator(name="b", memory_gb=80, cost_per_hour=1.0, available=3)]
    rng = np.random.default_rng(7)
    variants, workloads, slos, models, capacity = [], [], [], [], {}
    for m in range(6):
        model = f"m{m}"
        models.append(ModelSpec(name=model, weight_gb=10, kv_bytes_per_token=1e5))
        buckets = [LengthBucket(input_tokens=100 * (j + 1), output_tokens=50, share=0.5, name=f"b{j}") for j in range(2)]
        workloads.append(Workload(model=model, arrival_rate_rps=float(rng.uniform(1, 4)), buckets=buckets))
        slos.append(SLO(model=model, ttft_s=1, itl_s=0.05))
        for acc in ("a", "b"):
            variants.append(Variant(name=f"{model}-{acc}", model=model, accelerator=acc, accelerators_per_replica=1,
                                    max_batch=64, role=Role.BOTH, profile=profile, max_replicas=3))
            for j in range(2):
                capacity[(f"{model}-{acc}", f"b{j}")] = float(rng.uniform(0.5, 3.0))
    prob = Problem(accelerators=accs, models=models, variants=variants, workloads=workloads, slos=slos,
                   options=AllocationOptions())
    answers = [allocate(prob, capacity, method=method) for method in ("monolithic", "decomposition")]
    out, _ = capfd.readouterr()
    assert out == ""
    assert all(a.lower_bound <= a.objective + 1e-9 for a in answers)
