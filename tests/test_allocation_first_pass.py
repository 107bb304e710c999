"""The decomposition's first pass of per-model MILPs: what goes first when the clock may stop it.

On the benchmark's fleets the first pass rarely finishes within 2 s, so its order decides how much
bound and plan a short limit buys (optimizer.allocation_lagrangian.milp_work)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import numpy as np

from optimizer.allocation import allocate
from optimizer.allocation_formulation import build_formulation
from optimizer.allocation_lagrangian import (
    _cold_states,
    _integral,
    _jointly_feasible_roundings,
    _lp_relaxation,
    milp_work,
)
from optimizer.allocation_warm import Fingerprints

_SPEC = importlib.util.spec_from_file_location(
    "allocation_instances", pathlib.Path(__file__).parents[1] / "benchmarks" / "allocation_instances.py")
instances = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("allocation_instances", instances)  # dataclasses look their module up there
_SPEC.loader.exec_module(instances)


def _first_pass(n_models: int, seed: int):
    inst = instances.make_instance(n_models, seed=seed)
    opts = inst.problem.options.model_copy(update={"relative_gap": 0.01})
    form = build_formulation(inst.problem, inst.capacity, opts)
    prices, lp_x = _lp_relaxation(form)
    usage = [form.coupling_usage(b) for b in form.blocks]
    block_gap = 0.01 / 4
    states, pending = _cold_states(form, prices, lp_x, usage, Fingerprints(form, usage, block_gap), block_gap,
                                   time.perf_counter() + 600)
    return form, prices, lp_x, states, pending


def test_first_pass_goes_by_possible_gain_per_unit_of_milp_work():
    """A P/D model's MILP costs several times a plain one's: with the same possible gain it goes later."""
    form, prices, lp_x, states, pending = _first_pass(30, seed=1)
    gain, work = {}, {}
    for i in pending:
        block, st = form.blocks[i], states[i]
        priced = form.priced_cost(block, prices)
        n = lp_x[i][block.col_n]
        ceil_loss = float(priced[block.col_n] @ (np.ceil(n - 1e-7) - n))
        gain[i] = min(ceil_loss, float(priced @ st.columns[st.current].x) - st.bound)
        work[i] = milp_work(block, lp_x[i])
    assert len(pending) >= 5
    ratios = [gain[i] / work[i] for i in pending]
    assert all(a >= b - 1e-12 for a, b in zip(ratios, ratios[1:], strict=False)), ratios
    # the instance tells the orders apart: by gain alone the first pass would go otherwise
    assert pending != sorted(pending, key=lambda i: (-gain[i], i))
    disaggregated = [i for i in pending if form.blocks[i].disaggregated]
    plain = [i for i in pending if not form.blocks[i].disaggregated]
    assert disaggregated and plain
    assert min(work[i] for i in disaggregated) > max(work[i] for i in plain)


def test_milp_work_grows_with_flows_and_fractional_counts():
    form, _, lp_x, _, pending = _first_pass(10, seed=2)
    i = pending[0]
    block = form.blocks[i]
    x = lp_x[i].copy()
    integral = x.copy()
    integral[block.col_n] = np.rint(integral[block.col_n])
    assert milp_work(block, x) > milp_work(block, integral) == len(block.flow_variant)


def test_stock_fitting_roundings_take_the_cheap_roundings_where_they_fit_and_still_fit_stock():
    form, prices, lp_x, states, _ = _first_pass(30, seed=3)
    usage = [form.coupling_usage(b) for b in form.blocks]
    rhs = form.coupling_rhs
    fractional = [i for i, b in enumerate(form.blocks) if not _integral(lp_x[i][b.col_n])]
    cheap = {i: st.columns[st.current] for i, st in enumerate(states) if st.current > 0}
    joint = _jointly_feasible_roundings(form, lp_x, fractional, prices, usage, rhs, cheap)
    assert set(joint) == set(fractional)
    reused = [i for i in joint if joint[i] is cheap.get(i)]
    assert reused, "no cheap rounding taken: each one was rounded again"
    total = sum(joint[i].usage for i in fractional)
    total = total + sum(usage[i] @ np.rint(lp_x[i][form.blocks[i].col_n])
                        for i in range(len(form.blocks)) if i not in joint)
    assert np.all(total <= rhs + 1e-9)
    # each is a column of its own model: demand rows hold
    for i, column in joint.items():
        block = form.blocks[i]
        activity = block.matrix @ column.x
        assert np.all(activity >= block.row_lb - 1e-7) and np.all(activity <= block.row_ub + 1e-7)


def test_a_first_pass_stopped_anywhere_keeps_a_bound_below_the_optimum():
    """Stopped by the clock at any point of the first pass, the models not yet solved keep their LP value
    as their bound: the bound stays at most the optimum (a long monolithic solve), the plan at least it."""
    inst = instances.make_instance(10, seed=3)
    exact = allocate(inst.problem, inst.capacity, method="monolithic",
                     options=inst.problem.options.model_copy(update={"relative_gap": 1e-6, "time_limit_s": 120}))
    assert exact.gap <= 1e-6
    for limit in (0.05, 0.15, 0.3, 0.6):
        opts = inst.problem.options.model_copy(update={"relative_gap": 1e-6, "time_limit_s": limit})
        dec = allocate(inst.problem, inst.capacity, method="decomposition", options=opts)
        assert dec.lower_bound <= exact.objective + 1e-6, limit
        assert dec.objective >= exact.objective - 1e-6, limit
