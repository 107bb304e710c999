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

Warm start (optimizer.allocation_warm): given the previous cycle's prices, per-model results and
columns, the loop starts at those prices instead of the LP's. A model whose block and prices are
unchanged takes its cached result (bound and column) as it is; every other model's MILP runs; the
previous columns (or, for a changed block, the previous replicas repaired to it) go to the master
at once. The LP relaxation still runs: its value is a bound whatever prices the loop starts from,
and its roundings cover any model the warm start does not know. For the very same problem the
previous proven bound still holds. So stale prices can cost time, never validity; and on an
unchanged problem a cycle resumes where the last one stopped (even inside a price round cut short
by the clock) and stops as soon as the proven gap is within target.

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

from optimizer import allocation_highs
from optimizer.allocation_block_solver import BlockPool, quiet_stdout
from optimizer.allocation_formulation import (
    Formulation,
    LagrangianCut,
    ModelBlock,
    Solution,
    gap_status,
    proven_gap,
)
from optimizer.allocation_highs import HighsBlockProgram
from optimizer.allocation_monolithic import stacked
from optimizer.allocation_ortools import SparseProgram
from optimizer.allocation_rounding import round_block
from optimizer.allocation_warm import (
    CachedBlock,
    Fingerprints,
    WarmStart,
    prices_for,
    repaired_columns,
    row_names,
)

MAX_ROUNDS = 30
SMOOTHING = 0.5  # next prices = SMOOTHING x best-bound prices + rest x master-LP duals (Wentges)
MASTER_EVERY = 8  # per-model results between master solves while the first pass runs
STALL_ROUNDS = 3  # stop after this many price rounds that improve neither bound nor master
_INTEGRAL = 1e-6
WARM_MIN_UNCHANGED = 0.5  # share of models that must be unchanged for the warm prices to be used
MAX_KEPT_COLUMNS = 32  # per model, handed to the next warm start
MASTER_NODE_LIMIT = 10**9  # the master is solved to optimality, as through OR-Tools (which sets no node limit)
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
    fingerprint: bytes = b""  # of the block at the prices its bound holds for (what a warm start may reuse)


def solve_lagrangian(form: Formulation, time_limit_s: float, relative_gap: float,
                     workers: int | None = None, warm: WarmStart | None = None) -> Solution:
    """The decomposition (module doc); `warm` (the previous cycle's `Solution.warm_start`) starts it warm."""
    deadline = time.perf_counter() + max(time_limit_s - FINISH_S, 0.05)
    usage = [form.coupling_usage(b) for b in form.blocks]
    rhs = form.coupling_rhs
    block_gap = max(relative_gap / 4, 1e-10)
    fingerprints = Fingerprints(form, usage, block_gap)

    warm_prices = prices_for(form, warm) if warm is not None else None
    seeded = False  # a cold start took columns from the warm start
    same = [warm is not None and warm.columns.get(b.model, (b"",))[0] == fingerprints.blocks[i]
            for i, b in enumerate(form.blocks)]
    if warm_prices is not None and sum(same) < WARM_MIN_UNCHANGED * len(form.blocks):
        # most models changed: their results at the old prices are gone, and the LP's prices with the
        # LP values as bounds prove more, sooner, than the old prices with per-model LPs; the previous
        # plan and columns still seed the master
        warm_prices = None
    # the very same problem with every model's columns known: its bound and plan carry over as they are,
    # and neither the LP relaxation nor a repair of the previous replicas can add anything
    identical = warm is not None and warm.problem == fingerprints.problem
    unchanged = warm_prices is not None and identical and all(same)
    if unchanged:
        lp_prices, lp_x, lp_bound = warm_prices, None, -np.inf
    else:
        lp_prices, lp_x = _lp_relaxation(form)
        # the LP optimum: a valid bound whatever prices the loop starts from
        lp_bound = float(sum(form.priced_cost(b, lp_prices) @ lp_x[i] for i, b in enumerate(form.blocks))
                         - lp_prices @ rhs)
    cheap: dict[int, _Column] = {}  # cold start: the cheap roundings at the LP's prices
    if warm_prices is not None:
        prices = warm_prices
        states, pending = _warm_states(form, warm, prices, lp_x, usage, fingerprints, repair=not unchanged,
                                       block_lps=not identical, deadline=deadline)
    else:
        prices = lp_prices
        states, pending = _cold_states(form, prices, lp_x, usage, fingerprints, block_gap, deadline)
        # the stock-fitting roundings take these where they fit
        cheap = {i: st.columns[st.current] for i, st in enumerate(states) if st.current > 0}
        if warm is not None:
            seeded = _seed(form, states, warm, prices, usage, fingerprints, deadline)
    fractional = [] if lp_x is None else [i for i in range(len(states))
                                          if not _integral(lp_x[i][form.blocks[i].col_n])]
    rounds = 0
    timed_out = False
    cuts = _Cuts(usage)  # every block's bound at each price vector all the bounds hold at
    with BlockPool(form, block_gap, workers) as pool:
        # workers start on these while the roundings that fit the stock together are built
        results = pool.solve(pending, prices, deadline, _cutoffs(form, states, pending, prices))
        # those come whatever the clock says: they are what a clock-stopped run serves (a warm start's
        # repaired columns already fit together, unless a model is new)
        if warm_prices is None or any(st.current == 0 for st in states):
            joint = _jointly_feasible_roundings(form, lp_x, fractional, lp_prices, usage, rhs, cheap)
            for i, column in joint.items():
                if column is cheap.get(i):
                    continue  # already known: the model's cheap rounding fits the stock the others leave
                states[i].columns.append(column)
                if states[i].current == 0:  # no cheap rounding in time: the joint one is the best known
                    states[i].current = len(states[i].columns) - 1
        best_bound = max(_bound(states, prices, rhs), lp_bound)
        if identical:
            best_bound = max(best_bound, warm.lower_bound)  # the very same problem: its proven bound holds
        best_prices = prices if _bound(states, prices, rhs) >= lp_bound else lp_prices
        objective, chosen = _master(states, rhs)
        unmastered = 0  # results recorded since the last master solve
        if proven_gap(objective, best_bound) <= relative_gap:
            results = iter(())  # proven already (a warm start's bound and plan): no per-model MILP is needed
        # past the deadline the results stop by themselves, after those workers had already finished
        for done, res in enumerate(results, start=1):
            _record(states[res.index], res, form.blocks[res.index], usage[res.index],
                    fingerprint=fingerprints.of(res.index, prices))
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
            unmastered = 0
        cuts.add(states, prices)  # every block's bound holds at these prices, even if the clock stopped the pass
        timed_out = time.perf_counter() > deadline
        stalled = 0
        # every block's result at the prices of the best bound found at consistent prices: the next warm start
        kept = _Kept(states, prices)
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
            # the others' bounds hold at the new prices too (their optimum cannot have moved down)
            for i in set(range(len(states))) - set(redo):
                states[i].fingerprint = fingerprints.of(i, prices)
            for res in pool.solve(redo, prices, deadline, _cutoffs(form, states, redo, prices)):
                _record(states[res.index], res, form.blocks[res.index], usage[res.index], replace_bound=True,
                        fingerprint=fingerprints.of(res.index, prices))
                unmastered += 1
                if time.perf_counter() > deadline:
                    break
            timed_out = time.perf_counter() > deadline
            if timed_out:
                # some models still hold bounds from the old prices: not a bound at the new ones. The next
                # warm start resumes this round where it stopped (its results are cached at these prices).
                kept = _Kept(states, prices)
                break
            bound_now = _bound(states, prices, rhs)
            cuts.add(states, prices)
            before = (best_bound, objective)
            if bound_now > kept.bound(rhs):
                kept = _Kept(states, prices)
            if bound_now > best_bound:
                best_bound, best_prices = bound_now, prices
            objective, chosen = _master(states, rhs)
            unmastered = 0
            improved = best_bound > before[0] + 1e-9 * abs(before[0]) or objective < before[1] - 1e-9 * abs(before[1])
            stalled = 0 if improved else stalled + 1
            timed_out = time.perf_counter() > deadline

        if unmastered:
            # the round the clock stopped still found columns: they may make a cheaper plan (FINISH_S)
            objective, chosen = _master(states, rhs)
    columns = [states[i].columns[chosen[i]].x for i in range(len(states))]
    status = gap_status(proven_gap(objective, best_bound), relative_gap,
                        "time_limit" if timed_out else "iteration_limit")
    return Solution(columns=columns, objective=objective, lower_bound=min(best_bound, objective), status=status,
                    method="decomposition", iterations=rounds, warm_started=warm_prices is not None or seeded,
                    warm_start=kept.warm_start(form, states, columns, fingerprints, min(best_bound, objective)),
                    cuts=cuts.cuts)


def _cutoffs(form: Formulation, states: list[_BlockState], indices: list[int], prices: np.ndarray) -> dict[int, float]:
    """Per block, the priced cost of its best known column at `prices`: its MILP may prune above it."""
    out = {}
    for i in indices:
        priced = form.priced_cost(form.blocks[i], prices)
        out[i] = min(float(priced @ c.x) for c in states[i].columns)
    return out


def _integral(n: np.ndarray) -> bool:
    return bool(np.all(np.abs(n - np.rint(n)) <= _INTEGRAL))


def _cold_states(form, prices, lp_x, usage, fingerprints, block_gap, deadline) -> tuple[list[_BlockState], list[int]]:
    """Block states at the LP's prices, and the models whose MILP may close the gap, largest gain first.

    Every block's bound is its LP value at those prices; a model whose LP counts are integral is solved.
    """
    states, fractional, loss = [], [], {}
    for i, block in enumerate(form.blocks):
        fallback = _column(_serve_nothing(form, block), block, usage[i])
        x = lp_x[i]
        n = x[block.col_n]
        priced = form.priced_cost(block, prices)
        lp_value = float(priced @ x)
        fp = fingerprints.of(i, prices)
        if _integral(n):
            x = x.copy()
            x[block.col_n] = np.rint(n)
            states.append(_BlockState([fallback, _column(x, block, usage[i])], 1, lp_value, True, fp))
            continue
        states.append(_BlockState([fallback], 0, lp_value, False, fp))
        fractional.append(i)
        # rounding every count up is feasible, so this bounds what the model's MILP can gain
        loss[i] = float(priced[block.col_n] @ (np.ceil(n - 1e-7) - n))
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
    pending = sorted((i for i in fractional if not states[i].exact),
                     key=lambda i: (-loss[i] / milp_work(form.blocks[i], lp_x[i]), i))
    return states, pending


def milp_work(block: ModelBlock, x_lp: np.ndarray) -> float:
    """A model's MILP CPU cost relative to others': its flows times (1 + its fractional replica counts).

    Why: the first pass of per-model MILPs rarely finishes within a short limit, so it goes in order
    of possible gain per CPU-second. The MILPs' CPU time varies 30-fold (13 ms for a 10-variant
    model, up to 0.4 s for a 30-variant P/D one on the 100-model benchmark), and this product ranks
    it best among the block sizes tried (Spearman 0.65 over 161 blocks of 3 seeds, against 0.46 for
    the flows alone). In a simulated budget of 0.5 CPU-s per seed the order by gain per work finds
    74 of the 130 $/h of bound the whole pass finds, against 50 in order of gain alone.
    """
    n = x_lp[block.col_n]
    fractional = int(np.sum(np.abs(n - np.rint(n)) > _INTEGRAL))
    return float(max(len(block.flow_variant), 1) * (1 + fractional))


def _warm_states(form, warm: WarmStart, prices, lp_x, usage, fingerprints, repair: bool,
                 block_lps: bool, deadline: float) -> tuple[list[_BlockState], list[int]]:
    """Block states at the warm prices, and the models whose MILP must run, largest possible gain first.

    A model whose block and prices are exactly those of its cached result takes that result (column,
    bound, exactness) as it is. Any other model's bound is its own LP's value at those prices (with
    `block_lps`; else 0, valid too as every cost and price is >= 0: for the very same problem, whose
    previous bound still holds), its LP's rounding is a column, and its MILP runs. Every model is offered its previous replicas, repaired to this
    problem (`repaired_columns`; not needed when `repair` is False: every block is unchanged and its
    previous columns, the chosen one first, are offered as they are), and its LP column where that one
    is integral (`lp_x` None: no LP was solved).
    """
    states = []
    for i, block in enumerate(form.blocks):
        columns = [_column(_serve_nothing(form, block), block, usage[i])]
        fp = fingerprints.of(i, prices)
        cached = warm.blocks.get(block.model)
        if cached is not None and cached.fingerprint == fp:
            columns.append(_column(cached.x, block, usage[i]))
            states.append(_BlockState(columns, 1, cached.bound, cached.exact, fp))
        else:
            states.append(_BlockState(columns, 0, 0.0, False, fp))
            lp = _block_lp(form, block, prices) if block_lps and time.perf_counter() <= deadline else None
            if lp is not None:  # its LP value is a bound; its rounding a column
                states[i].bound = lp[1]
                rounded = round_block(block, lp[0], form.priced_cost(block, prices), form.variant_current[block.variants])
                states[i].columns.append(_column(rounded, block, usage[i]))
                states[i].current = 1
        known = warm.columns.get(block.model)
        if known is not None and known[0] == fingerprints.blocks[i]:
            for x in known[1]:
                _add_column(states[i], x, block, usage[i])
            if states[i].current == 0:
                states[i].current = 1  # the previous plan's column
        if lp_x is not None and _integral(lp_x[i][block.col_n]):
            x = lp_x[i].copy()
            x[block.col_n] = np.rint(x[block.col_n])
            states[i].columns.append(_column(x, block, usage[i]))
            if states[i].current == 0:
                states[i].current = len(states[i].columns) - 1
    for i, x in (repaired_columns(form, usage, warm, prices, deadline) if repair else {}).items():
        st = states[i]
        st.columns.append(_column(x, form.blocks[i], usage[i]))
        if st.current == 0:
            st.current = len(st.columns) - 1

    def gain(i: int) -> float:
        st = states[i]
        return float(form.priced_cost(form.blocks[i], prices) @ st.columns[st.current].x) - st.bound

    pending = sorted((i for i, st in enumerate(states) if not st.exact), key=lambda i: (-gain(i), i))
    return states, pending


def _seed(form, states: list[_BlockState], warm: WarmStart, prices, usage, fingerprints, deadline) -> bool:
    """A cold start still offers the master the previous plan: an unchanged model's known columns as they
    are, the others' previous replicas repaired (`repaired_columns`). Bounds are not touched. False if
    the warm start knew none of these models."""
    fresh, repaired = {}, {}
    for i, block in enumerate(form.blocks):
        known = warm.columns.get(block.model)
        if known is not None and known[0] == fingerprints.blocks[i]:
            for x in known[1]:
                _add_column(states[i], x, block, usage[i])
            fresh[i] = True
    if len(fresh) < len(form.blocks):
        repaired = repaired_columns(form, usage, warm, prices, deadline)
        for i, x in repaired.items():
            if i not in fresh:
                _add_column(states[i], x, form.blocks[i], usage[i])
    for st in states:
        if st.current == 0 and len(st.columns) > 1:
            st.current = 1
    return bool(fresh or repaired)


def _block_lp(form: Formulation, block: ModelBlock, prices: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(solution, value) of one block's LP relaxation at `prices`; None if the LP solver failed."""
    program = SparseProgram(form.priced_cost(block, prices), block.col_lb, block.col_ub, None, block.matrix,
                            block.row_lb, block.row_ub)
    with quiet_stdout():
        res = program.solve_lp_with_duals()
    return None if res.x is None else (res.x, float(res.objective))



class _Cuts:
    """Lagrangian cuts (optimizer.allocation_formulation.LagrangianCut), each block's once per distinct row."""

    def __init__(self, usage: list[np.ndarray]):
        self.used_rows = [np.any(u > 0, axis=1) for u in usage]  # a block's priced cost depends only on these
        self.cuts: list[LagrangianCut] = []
        self._seen: set[tuple] = set()

    def add(self, states: list[_BlockState], prices: np.ndarray) -> None:
        """One cut per block at `prices`: only where every block's bound holds at them."""
        for i, st in enumerate(states):
            key = (i, st.bound, prices[self.used_rows[i]].tobytes())
            if key not in self._seen:
                self._seen.add(key)
                self.cuts.append(LagrangianCut(i, prices, float(st.bound)))


class _Kept:
    """Every block's result (fingerprint, current column, bound, exact) at one price vector they all hold at."""

    def __init__(self, states: list[_BlockState], prices: np.ndarray):
        self.prices = prices
        self.results = [(st.fingerprint, st.columns[st.current].x, st.bound, st.exact) for st in states]

    def bound(self, rhs: np.ndarray) -> float:
        return float(sum(r[2] for r in self.results) - self.prices @ rhs)

    def warm_start(self, form: Formulation, states: list[_BlockState], columns: list[np.ndarray],
                   fingerprints: Fingerprints, lower_bound: float) -> WarmStart:
        """What the next allocation may start from: these prices and results, every column known (at most
        MAX_KEPT_COLUMNS per model, the chosen one included), the replicas chosen and the bound proven."""
        replicas = {}
        for block, x in zip(form.blocks, columns, strict=True):
            for j, g in enumerate(block.variants):
                replicas[form.variants[g].name] = int(np.rint(x[block.col_n][j]))
        blocks = {form.blocks[i].model: CachedBlock(fp, x, bound, exact)
                  for i, (fp, x, bound, exact) in enumerate(self.results) if fp}
        pool = {}
        for i, st in enumerate(states):
            kept = [c.x for c in st.columns[1:]]  # the serve-nothing column is rebuilt every time
            pool[form.blocks[i].model] = (fingerprints.blocks[i], tuple([columns[i], *kept[-MAX_KEPT_COLUMNS + 1:]]))
        return WarmStart(prices=dict(zip(row_names(form), map(float, self.prices), strict=True)),
                         replicas=replicas, blocks=blocks, columns=pool, problem=fingerprints.problem,
                         lower_bound=lower_bound)


def _jointly_feasible_roundings(form, lp_x, fractional, prices, usage, rhs,
                                cheap: dict[int, _Column] | None = None) -> dict[int, _Column]:
    """One more column per fractional model, rounded so that all models' columns fit the stock together.

    Rounding every LP count down keeps within the LP's usage, hence within stock; the demand this
    drops is then covered model by model (higher unmet penalty first) from what stock is left. The
    master can therefore always serve nearly all demand, even if the clock stops every MILP. Built
    whatever the clock says (one rounding per model, milliseconds each): a plan that serves nothing
    because the limit was short would scale models to zero.

    `cheap`: per model, a column already known (its cheap rounding at these prices); where it fits
    the stock left, it is taken as it is instead of rounding again (the rounding under that budget
    could retrace it step by step, as a cover only adds replicas; it may also end elsewhere), and the
    rounding is what this saves: 0.19 s on an idle core at 100 models, 0.35-0.95 s beside the workers.
    """
    columns: dict[int, _Column] = {}
    if not len(rhs):
        return columns
    floors = {i: np.maximum(np.floor(lp_x[i][form.blocks[i].col_n] + 1e-7), form.blocks[i].col_lb[form.blocks[i].col_n])
              for i in fractional}
    integral = set(range(len(form.blocks))) - set(fractional)  # their LP columns are integral: taken as they are
    left = rhs - sum((usage[i] @ np.rint(lp_x[i][form.blocks[i].col_n]) for i in integral), np.zeros(len(rhs)))
    left = left - sum((usage[i] @ floors[i] for i in fractional), np.zeros(len(rhs)))
    left = np.maximum(left, 0.0)
    order = sorted(fractional, key=lambda i: (-form.blocks[i].unmet_penalty_per_rps * form.blocks[i].rates.sum(), i))
    for i in order:
        block = form.blocks[i]
        budget = left + usage[i] @ floors[i]
        known = (cheap or {}).get(i)
        if known is not None and np.all(known.usage <= budget + 1e-9):
            left = budget - known.usage
            columns[i] = known
            continue
        x = round_block(block, lp_x[i], form.priced_cost(block, prices), form.variant_current[block.variants],
                        usage[i], budget)
        left = budget - usage[i] @ x[block.col_n]
        columns[i] = _column(x, block, usage[i])
    return columns


def _lp_relaxation(form: Formulation) -> tuple[np.ndarray, list[np.ndarray]]:
    """Coupling-row duals of the LP relaxation and its per-block solutions.

    HiGHS's dual simplex, passed the model directly (optimizer.allocation_highs.solve_lp: 0.19 s CPU
    at 100 models), else through `scipy.optimize.linprog` (0.22-0.29 s), against GLOP's 0.35-0.43 s,
    the same LP value (to 1e-12), and the same prices where the dual is unique (where it is not,
    either optimal dual is as good a start). The LP runs before any worker has work, so this is
    wall time saved outright. GLOP remains the fallback should HiGHS not report an optimum.
    """
    matrix, row_lb, row_ub, offsets = stacked(form)
    cost = np.concatenate([b.cost for b in form.blocks])
    lb = np.concatenate([b.col_lb for b in form.blocks])
    ub = np.concatenate([b.col_ub for b in form.blocks])
    n_coupling = len(form.coupling_rhs)
    direct = allocation_highs.solve_lp(cost, lb, ub, matrix, row_lb, row_ub)
    if direct is not None:
        x, prices = direct[0], np.maximum(-direct[1][matrix.shape[0] - n_coupling:], 0.0)
    else:
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


def _record(st: _BlockState, res, block: ModelBlock, usage: np.ndarray, replace_bound: bool = False,
            fingerprint: bytes = b"") -> None:
    n = res.x[block.col_n]
    same = next((j for j, c in enumerate(st.columns) if np.array_equal(c.x[block.col_n], n)), None)
    if same is None:
        st.columns.append(_column(res.x, block, usage))
        same = len(st.columns) - 1
    # at unchanged prices, or when prices only rose, an older bound stays valid: keep the larger
    st.current, st.bound, st.exact = same, res.bound if replace_bound else max(st.bound, res.bound), True
    st.fingerprint = fingerprint


def _add_column(st: _BlockState, x: np.ndarray, block: ModelBlock, usage: np.ndarray) -> None:
    if not any(np.array_equal(c.x, x) for c in st.columns):
        st.columns.append(_column(x, block, usage))


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


def _master_program(states: list[_BlockState], rhs: np.ndarray,
                    integer: bool) -> tuple[SparseProgram | HighsBlockProgram, np.ndarray]:
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
    if integer and allocation_highs.available():
        # HiGHS itself, presolve and heuristics off: 3-10 ms against OR-Tools' 15-26 ms on the 100-model
        # benchmark's masters (208-247 columns), same objectives
        program = HighsBlockProgram(cost, np.zeros(total), upper, np.ones(total), matrix, lb, ub)
    else:
        program = SparseProgram(cost, np.zeros(total), upper, np.ones(total) if integer else None, matrix, lb, ub)
    return program, offsets


def _master(states: list[_BlockState], rhs: np.ndarray) -> tuple[float, list[int]]:
    """Pick one column per block: least true cost with the coupling rows satisfied."""
    program, offsets = _master_program(states, rhs, integer=True)
    with quiet_stdout():
        if isinstance(program, HighsBlockProgram):
            res = program.solve_milp(1e-9, node_limit=MASTER_NODE_LIMIT)
        else:
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
