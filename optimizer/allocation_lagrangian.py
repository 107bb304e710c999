"""Lagrangian decomposition of the allocation MILP over the inventory and power rows.

Why: with many models the inventory rows tie every model's integer choices together and a
monolithic branch-and-bound stalls far from optimality, while each model on its own is a small
MILP. Pricing the coupling rows at lambda >= 0 (per accelerator, and per watt) splits the problem:

    L(lambda) = sum_m min_{block m} (cost_m + lambda . usage_m) - lambda . capacity   <=   optimum

for every lambda >= 0, and stays a valid bound when a model's minimum is replaced by any proven
lower bound of it (its LP value, or its MILP's dual bound). L is nondecreasing in each model's
term as prices rise, because usage is never negative. The loop:

1. The LP relaxation of the whole problem gives the starting prices (its coupling duals), every
   model's LP value at them, and the exact optimum of every model whose LP replica counts are
   already integral.
2. Every other model first gets a cheap rounding (optimizer.allocation_rounding): its priced cost
   above the model's LP value bounds what the model's MILP can gain, more tightly than rounding
   every count up. A rounding within the per-model gap of the LP value is proven good enough and
   needs no MILP; the others get their own MILP at those prices, largest possible gain first, in
   worker processes where cores allow, stopping early once the gap is reached. Meanwhile each gets
   one more rounding, rounded so that all models' columns fit the stock together, so a
   clock-stopped run still serves the demand.
3. Primal side: a master MILP picks one known column per model so that the coupling rows hold, at
   least true cost. A column that serves nothing exists for every model, so it is always feasible.
4. While the gap (master - best bound) / master is above target, move the prices and re-solve the
   models that can react: those whose column uses a row that got dearer, and those with a variant
   on a row that got cheaper. Any other model keeps its column and its bound: its optimum cannot
   move. If the models' current columns overuse some rows, only those rows get dearer (subgradient
   step of Polyak length towards the master value): few models use them, so the step is cheap.
   Otherwise the prices come from the duals of the master's LP relaxation (what inventory is worth
   given the known columns), smoothed towards the prices of the best bound so far (Wentges).

Solvers: the LP relaxation goes to HiGHS's dual simplex through SciPy (GLOP as fallback); the
master's LP, whose duals are prices, to GLOP (OR-Tools, see optimizer.allocation_ortools); the
per-model MILPs and the master MILP to HiGHS. Each model's MILP is built once and re-solved with
only its replica costs re-priced.

Deterministic: per-model searches stop on node counts, results are consumed in submission order,
and the time limit stops the loop between steps (reported as status "time_limit"): the roundings
that fit the stock together are always built (they are the answer's floor); the
cheap roundings, the waits for workers' results and the price rounds stop at the deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from optimizer.allocation_block_solver import BlockPool, quiet_stdout
from optimizer.allocation_formulation import Formulation, ModelBlock, Solution, gap_status, proven_gap
from optimizer.allocation_monolithic import stacked
from optimizer.allocation_ortools import SparseProgram
from optimizer.allocation_rounding import round_block

MAX_ROUNDS = 30
SMOOTHING = 0.5  # next prices = SMOOTHING x best-bound prices + rest x master-LP duals (Wentges)
MASTER_EVERY = 8  # per-model results between master solves while the first pass runs
STALL_ROUNDS = 3  # stop after this many price rounds that improve neither bound nor master
_INTEGRAL = 1e-6
FINISH_S = 0.1  # kept from the time limit for what follows the deadline: last master solve, workers, report


@dataclass
class _Column:
    x: np.ndarray
    cost: float  # true objective of this block solution (no prices)
    usage: np.ndarray  # per coupling row


@dataclass
class _BlockState:
    columns: list[_Column]
    current: int  # best known column at the prices of the last solve
    bound: float  # proven lower bound of the priced block problem at those prices
    exact: bool  # current column is optimal (within the per-model gap) at those prices


def solve_lagrangian(form: Formulation, time_limit_s: float, relative_gap: float,
                     workers: int | None = None) -> Solution:
    deadline = time.perf_counter() + max(time_limit_s - FINISH_S, 0.05)
    usage = [form.coupling_usage(b) for b in form.blocks]
    rhs = form.coupling_rhs
    block_gap = max(relative_gap / 4, 1e-10)

    prices, lp_x = _lp_relaxation(form)
    states, fractional, loss = [], [], {}
    for i, block in enumerate(form.blocks):
        fallback = _column(_serve_nothing(form, block), block, usage[i])
        x = lp_x[i]
        n = x[block.col_n]
        priced = form.priced_cost(block, prices)
        lp_value = float(priced @ x)
        if np.all(np.abs(n - np.rint(n)) <= _INTEGRAL):
            x = x.copy()
            x[block.col_n] = np.rint(n)
            states.append(_BlockState([fallback, _column(x, block, usage[i])], 1, lp_value, True))
            continue
        states.append(_BlockState([fallback], 0, lp_value, False))
        fractional.append(i)
        # rounding every count up is feasible, so this bounds what the model's MILP can gain
        loss[i] = float(priced[block.col_n] @ (np.ceil(n - 1e-7) - n))
    rounds = 0
    timed_out = False
    # cheap roundings first (a few ms each): what one costs above the LP value bounds the model's MILP
    # gain more tightly than rounding up does, so the MILPs that can close most of the gap go first,
    # and a rounding within the per-model gap of its LP value needs no MILP at all
    for i in fractional:
        if time.perf_counter() > deadline:
            break
        block = form.blocks[i]
        priced = form.priced_cost(block, prices)
        rounded = round_block(block, lp_x[i], priced, form.variant_current[block.variants])
        states[i].columns.append(_column(rounded, block, usage[i]))
        states[i].current = len(states[i].columns) - 1
        loss[i] = min(loss[i], float(priced @ rounded) - states[i].bound)
        states[i].exact = loss[i] <= block_gap * abs(states[i].bound) + 1e-9
    pending = sorted((i for i in fractional if not states[i].exact), key=lambda i: (-loss[i], i))
    with BlockPool(form, block_gap, workers) as pool:
        # workers start on these while the roundings that fit the stock together are built
        results = pool.solve(pending, prices, deadline)
        # those come whatever the clock says: they are what a clock-stopped run serves
        joint = _jointly_feasible_roundings(form, states, fractional, lp_x, prices, usage, rhs)
        for i, column in joint.items():
            states[i].columns.append(column)
            if states[i].current == 0:  # no cheap rounding in time: the joint one is the best known
                states[i].current = len(states[i].columns) - 1
        best_bound = _bound(states, prices, rhs)
        objective, chosen = _master(states, rhs)
        unmastered = 0  # results recorded since the last master solve
        # past the deadline the results stop by themselves, after those workers had already finished
        for done, res in enumerate(results, start=1):
            _record(states[res.index], res, form.blocks[res.index], usage[res.index])
            unmastered += 1
            if done % MASTER_EVERY == 0 or done == len(pending):
                best_bound = max(best_bound, _bound(states, prices, rhs))
                objective, chosen = _master(states, rhs)
                unmastered = 0
                if proven_gap(objective, best_bound) <= relative_gap:
                    break
        if unmastered:
            # stopped by the clock between master solves: the last results still count (FINISH_S)
            best_bound = max(best_bound, _bound(states, prices, rhs))
            objective, chosen = _master(states, rhs)
        timed_out = time.perf_counter() > deadline
        best_prices, stalled = prices, 0
        while (not timed_out and rounds < MAX_ROUNDS and stalled < STALL_ROUNDS
               and proven_gap(objective, best_bound) > relative_gap):
            over = sum(st.columns[st.current].usage for st in states) - rhs
            if np.any(over > 1e-9):
                # cheap step: only overused rows get dearer, so only their users can change
                g = np.maximum(over, 0.0)
                step = max(objective - _bound(states, prices, rhs), 1e-9) / float(g @ g)
                new_prices = prices + step * g
            else:
                duals = _master_duals(states, rhs)
                new_prices = SMOOTHING * best_prices + (1 - SMOOTHING) * duals
            if np.allclose(new_prices, prices, rtol=1e-9, atol=1e-9):
                break
            rounds += 1
            raised, lowered = new_prices > prices, new_prices < prices
            redo = [i for i, st in enumerate(states)
                    if np.any(st.columns[st.current].usage[raised] > 0) or np.any(usage[i][lowered] > 0)
                    or not st.exact]
            prices = new_prices
            for res in pool.solve(redo, prices, deadline):
                _record(states[res.index], res, form.blocks[res.index], usage[res.index], replace_bound=True)
                if time.perf_counter() > deadline:
                    break
            timed_out = time.perf_counter() > deadline
            if timed_out:
                break  # some models still hold bounds from the old prices: not a bound at the new ones
            bound_now = _bound(states, prices, rhs)
            before = (best_bound, objective)
            if bound_now > best_bound:
                best_bound, best_prices = bound_now, prices
            objective, chosen = _master(states, rhs)
            improved = best_bound > before[0] + 1e-9 * abs(before[0]) or objective < before[1] - 1e-9 * abs(before[1])
            stalled = 0 if improved else stalled + 1
            timed_out = time.perf_counter() > deadline

    columns = [states[i].columns[chosen[i]].x for i in range(len(states))]
    status = gap_status(proven_gap(objective, best_bound), relative_gap,
                        "time_limit" if timed_out else "iteration_limit")
    return Solution(columns=columns, objective=objective, lower_bound=min(best_bound, objective), status=status,
                    method="decomposition", iterations=rounds)


def _jointly_feasible_roundings(form, states, fractional, lp_x, prices, usage, rhs) -> dict[int, _Column]:
    """One more column per fractional model, rounded so that all models' columns fit the stock together.

    Rounding every LP count down keeps within the LP's usage, hence within stock; the demand this
    drops is then covered model by model (higher unmet penalty first) from what stock is left. The
    master can therefore always serve nearly all demand, even if the clock stops every MILP. Built
    whatever the clock says (one rounding per model, milliseconds each): a plan that serves nothing
    because the limit was short would scale models to zero.
    """
    columns: dict[int, _Column] = {}
    if not len(rhs):
        return columns
    floors = {i: np.maximum(np.floor(lp_x[i][form.blocks[i].col_n] + 1e-7), form.blocks[i].col_lb[form.blocks[i].col_n])
              for i in fractional}
    integral = set(range(len(states))) - set(fractional)  # their only columns besides serve-nothing are their LP's
    left = rhs - sum((states[i].columns[states[i].current].usage for i in integral), np.zeros(len(rhs)))
    left = left - sum((usage[i] @ floors[i] for i in fractional), np.zeros(len(rhs)))
    left = np.maximum(left, 0.0)
    order = sorted(fractional, key=lambda i: (-form.blocks[i].unmet_penalty_per_rps * form.blocks[i].rates.sum(), i))
    for i in order:
        block = form.blocks[i]
        budget = left + usage[i] @ floors[i]
        x = round_block(block, lp_x[i], form.priced_cost(block, prices), form.variant_current[block.variants],
                        usage[i], budget)
        left = budget - usage[i] @ x[block.col_n]
        columns[i] = _column(x, block, usage[i])
    return columns


def _lp_relaxation(form: Formulation) -> tuple[np.ndarray, list[np.ndarray]]:
    """Coupling-row duals of the LP relaxation and its per-block solutions.

    HiGHS's dual simplex through SciPy: 0.22-0.27 s CPU on the 100-model benchmark instances
    against GLOP's 0.35-0.43 s, the same LP value (to 1e-12), and the same prices where the dual is
    unique (where it is not, either optimal dual is as good a start). The LP runs before any worker
    has work, so this is wall time saved outright. GLOP remains the fallback should HiGHS not
    report an optimum.
    """
    matrix, row_lb, row_ub, offsets = stacked(form)
    cost = np.concatenate([b.cost for b in form.blocks])
    lb = np.concatenate([b.col_lb for b in form.blocks])
    ub = np.concatenate([b.col_ub for b in form.blocks])
    n_coupling = len(form.coupling_rhs)
    x, prices = _lp_by_highs(cost, lb, ub, matrix, row_lb, row_ub, n_coupling)
    if x is None:
        with quiet_stdout():
            res = SparseProgram(cost, lb, ub, None, matrix, row_lb, row_ub).solve_lp_with_duals()
        if res.x is None:
            raise RuntimeError(f"the allocation LP relaxation failed: {res.message}")
        x, prices = res.x, np.maximum(-res.duals[matrix.shape[0] - n_coupling:], 0.0)
    return prices, [x[offsets[i]:offsets[i + 1]] for i in range(len(form.blocks))]


def _lp_by_highs(cost, lb, ub, matrix, row_lb, row_ub, n_coupling: int):
    """(solution, prices of the last `n_coupling` rows), or (None, None) if HiGHS found no optimum.

    The coupling rows are the last rows and all of the form `<= rhs`, so they are the last rows of
    the `<=` part, and their prices are minus HiGHS's marginals (which are <= 0 for such rows)."""
    eq = row_lb == row_ub
    le = ~eq & np.isfinite(row_ub)
    ge = ~eq & np.isfinite(row_lb)
    a_ub = sp.vstack([matrix[le], -matrix[ge]], format="csr")
    b_ub = np.concatenate([row_ub[le], -row_lb[ge]])
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=matrix[eq], b_eq=row_ub[eq],
                  bounds=np.column_stack([lb, ub]), method="highs-ds")
    if res.status != 0 or res.x is None:
        return None, None
    n_le = int(le.sum())
    prices = np.maximum(-np.asarray(res.ineqlin.marginals[n_le - n_coupling:n_le], dtype=float), 0.0)
    return np.asarray(res.x, dtype=float), prices


def _record(st: _BlockState, res, block: ModelBlock, usage: np.ndarray, replace_bound: bool = False) -> None:
    n = res.x[block.col_n]
    same = next((j for j, c in enumerate(st.columns) if np.array_equal(c.x[block.col_n], n)), None)
    if same is None:
        st.columns.append(_column(res.x, block, usage))
        same = len(st.columns) - 1
    # at unchanged prices, or when prices only rose, an older bound stays valid: keep the larger
    st.current, st.bound, st.exact = same, res.bound if replace_bound else max(st.bound, res.bound), True


def _column(x: np.ndarray, block: ModelBlock, usage: np.ndarray) -> _Column:
    return _Column(x=x, cost=float(block.cost @ x), usage=usage @ x[block.col_n])


def _serve_nothing(form: Formulation, block: ModelBlock) -> np.ndarray:
    """Keep only the hard minimums and serve nothing: feasible for every block, and for all together."""
    x = np.zeros(block.n_cols)
    n = block.col_lb[block.col_n]
    x[block.col_n] = n
    cur = form.variant_current[block.variants]
    if block.col_up.stop > block.col_up.start:
        x[block.col_up] = np.maximum(n - cur, 0)
        x[block.col_down] = np.maximum(cur - n, 0)
    x[block.col_short] = block.short_min
    x[block.col_u] = 1.0
    return x


def _bound(states: list[_BlockState], prices: np.ndarray, rhs: np.ndarray) -> float:
    return float(sum(st.bound for st in states) - prices @ rhs)


def _master_program(states: list[_BlockState], rhs: np.ndarray, integer: bool) -> tuple[SparseProgram, np.ndarray]:
    """Pick rows (one column per block, == 1) above the coupling rows (<= stock), and column offsets."""
    sizes = [len(st.columns) for st in states]
    offsets = np.cumsum([0] + sizes)
    total = int(offsets[-1])
    cost = np.concatenate([[c.cost for c in st.columns] for st in states])
    usage = np.column_stack([c.usage for st in states for c in st.columns]) if len(rhs) else np.zeros((0, total))
    pick = sp.csr_matrix((np.ones(total), (np.repeat(np.arange(len(states)), sizes), np.arange(total))),
                         shape=(len(states), total))
    matrix = sp.vstack([pick, sp.csr_matrix(usage)], format="csr")
    lb = np.concatenate([np.ones(len(states)), np.full(len(rhs), -np.inf)])
    ub = np.concatenate([np.ones(len(states)), rhs])
    upper = np.ones(total) if integer else np.full(total, np.inf)  # the LP as before: z >= 0, picks == 1
    program = SparseProgram(cost, np.zeros(total), upper, np.ones(total) if integer else None, matrix, lb, ub)
    return program, offsets


def _master(states: list[_BlockState], rhs: np.ndarray) -> tuple[float, list[int]]:
    """Pick one column per block: least true cost with the coupling rows satisfied."""
    program, offsets = _master_program(states, rhs, integer=True)
    with quiet_stdout():
        res = program.solve_milp(1e-9)
    if res.x is None:
        raise RuntimeError(f"the allocation master problem failed: {res.message}")
    chosen = [int(np.argmax(res.x[offsets[i]:offsets[i + 1]])) for i in range(len(states))]
    return float(sum(states[i].columns[chosen[i]].cost for i in range(len(states)))), chosen


def _master_duals(states: list[_BlockState], rhs: np.ndarray) -> np.ndarray:
    """Coupling-row prices of the master's LP relaxation: what inventory is worth given the known columns."""
    program, _ = _master_program(states, rhs, integer=False)
    with quiet_stdout():
        res = program.solve_lp_with_duals()
    if res.x is None:
        raise RuntimeError(f"the allocation master LP failed: {res.message}")
    return np.maximum(-res.duals[len(states):], 0.0)
