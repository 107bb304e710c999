"""Replicas per variant and routing of every model's demand, for all models at once, at least cost.

Formulation (one MILP; units: replicas, requests/s, $/h, W)

  Sets:   accelerator types a, models m, variants v (model m(v), type a(v), k_v accelerators per
          replica, role P / D / PD), buckets b of each model with rate r_b > 0.
  Data:   c_v = price_a(v) * k_v; cap_{v,b} = requests/s one replica of v sustains for bucket b at
          SLO (P: its prefill stage, D: its decode stage, PD: whole requests; missing or 0 = cannot
          serve b); s = service_level; A_a = available accelerators of type a (None = unlimited);
          W = power cap; pen = change penalty per replica; cur_v = current replicas.
  Vars:   n_v integer in [min_v, max_v]; y_{v,b} >= 0 share of bucket b's demand that v takes
          (x for PD variants, p for P, d for D in the usual notation); u_b in [0, 1] unmet share.
  Demand: for every bucket b of model m
            sum_{v PD} y_{v,b} + sum_{v P} y_{v,b} + u_b = 1      (every served request is prefilled once)
            sum_{v PD} y_{v,b} + sum_{v D} y_{v,b} + u_b = 1      (and decoded once; only if m has P/D)
          so the disaggregated share is covered by both a prefill and a decode capacity, and
          served_b = (1 - u_b) r_b <= r_b.
  Load:   sum_b y_{v,b} r_b / cap_{v,b} <= s * n_v                (normalized load <= service level)
          y_{v,b} <= n_v  when one replica could take all of b     (valid, tightens the LP)
  Stock:  sum_{v: a(v)=a} k_v n_v <= A_a                          (per accelerator type)
  Power:  sum_v k_v power_a(v) n_v <= W                           (only with a power cap)
  Cost:   min sum_v c_v n_v + pen * sum_v |n_v - cur_v| + sum_b P_m r_b u_b
          with P_m = priority_m / min priority * 10 * (dearest replica-hour + 2 pen) / 0.01 rps, so
          every replica that serves >= 0.001 rps more demand pays for itself: demand is served as
          far as inventory allows, higher priority first, and only then is cost minimised. The
          solver picks PD vs P + D by cost alone.

Infeasible demand is never an error: what inventory cannot serve is reported as unmet demand.
Minimum replicas that inventory (or the power cap) cannot hold are the one contradiction in the
input; they are not an error either: those minimums become soft (each replica short costs 10
dearest replica-hours, still far below unmet demand), and a note says so. Genuinely malformed input
(capacities for unknown variants, negative capacities, a power cap with accelerators of unknown
power) raises ValueError.

Solving (OR-Tools: HiGHS for every MILP, GLOP for the LPs whose duals price inventory; see
optimizer.allocation_ortools): small problems go to one MILP (optimizer.allocation_monolithic); larger ones to a
Lagrangian decomposition over the inventory rows (optimizer.allocation_lagrangian). With only a
few models the Lagrangian dual can stay a few % below the optimum (the per-model problems are
integer, so the dual has a duality gap); then, for mid-sized problems, the time left goes to the
monolithic MILP and the better answer and the tighter bound are kept. Both solvers report a proven
bound, and the gap is (objective - bound) / objective of the full objective above.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from optimizer.allocation_formulation import (
    STAGE_NAMES,
    Formulation,
    ModelBlock,
    Solution,
    build_formulation,
    gap_status,
    proven_gap,
)
from optimizer.allocation_lagrangian import solve_lagrangian
from optimizer.allocation_monolithic import NoMilpSolution, solve_monolithic
from optimizer.allocation_warm import WarmStart
from optimizer.problem import AllocationOptions, Problem

# Up to this many integer columns one MILP proves optimality quickly; beyond, decompose.
MONOLITHIC_MAX_INTEGERS = 60
# With few models the Lagrangian dual may not close; below this size the time left goes to one MILP.
MONOLITHIC_FALLBACK_INTEGERS = 400
_TINY = 1e-9


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteWeight(_Strict):
    """Share of one bucket's served requests that one variant handles at one stage.

    Per (model, bucket) the PD and P weights sum to 1 (every served request is prefilled once) and
    the PD and D weights sum to 1 (and decoded once).
    """

    model: str
    bucket: str
    variant: str
    stage: Literal["PD", "P", "D"]
    weight: float = Field(ge=0, le=1)
    rate_rps: float = Field(ge=0, description="Requests/s this route carries.")


class Allocation(_Strict):
    """The decision and why it is what it is."""

    replicas: dict[str, int] = Field(description="Replicas per variant name (every variant listed).")
    routing: list[RouteWeight]
    cost_per_hour: float = Field(description="Accelerator cost of the chosen replicas.")
    change_cost_per_hour: float = Field(description="Change penalty paid for replicas added or removed.")
    objective: float = Field(description="Cost + change penalty + unmet-demand and minimum-shortfall penalties.")
    lower_bound: float = Field(description="Proven lower bound on the objective.")
    gap: float = Field(ge=0, description="(objective - lower_bound) / objective.")
    unmet_demand_rps: dict[str, float] = Field(description="Demand left unserved, per model with demand.")
    normalized_load: dict[str, float] = Field(
        description="Per variant with replicas: routed demand / (replicas x capacity); <= service level."
    )
    binding_constraints: list[str] = Field(description="What limits this allocation, in plain words.")
    notes: list[str] = Field(default_factory=list, description="Decisions taken about contradictory input.")
    status: Literal["optimal", "within_gap", "time_limit", "iteration_limit"] = Field(
        description="optimal: gap <= 1e-6; within_gap: gap <= options.relative_gap; otherwise what stopped it."
    )
    method: Literal["monolithic", "decomposition"]
    iterations: int = Field(description="Price-update rounds of the decomposition (0 for monolithic).")
    solve_time_s: float
    warm_started: bool = Field(
        default=False, description="The decomposition started from the previous allocation's prices and columns.")
    _warm_start: WarmStart | None = PrivateAttr(default=None)

    @property
    def warm_start(self) -> WarmStart | None:
        """What the next `allocate` call may start from (pass it as `warm_start`); not part of the output."""
        return self._warm_start


def allocate(
    problem: Problem,
    capacity: Mapping,
    *,
    options: AllocationOptions | None = None,
    method: Literal["auto", "monolithic", "decomposition"] = "auto",
    deadline: float | None = None,
    warm_start: WarmStart | None = None,
) -> Allocation:
    """Choose replicas and routing for every model at least cost within inventory (see module doc).

    ``capacity`` maps (variant name, bucket label) to requests/s one replica sustains at SLO (a
    number, or an object with ``max_rate_rps``). ``options`` overrides ``problem.options``.
    ``method`` "auto" solves small problems monolithically and decomposes larger ones.
    ``deadline`` (a ``time.perf_counter()`` instant) replaces now + ``options.time_limit_s``, so a
    caller can count its own work (the capacity table) against the same limit.
    ``warm_start`` (a previous result's `Allocation.warm_start`, from this or any other problem) lets
    the decomposition start from its prices, per-model results and replicas (optimizer.allocation_warm);
    the bound stays proven and the plan feasible whatever it holds.
    """
    began = start = time.perf_counter()
    opts = options or problem.options
    if deadline is not None:
        start = deadline - opts.time_limit_s
    form = build_formulation(problem, capacity, opts)
    integers = sum(b.col_n.stop - b.col_n.start for b in form.blocks)
    auto = method == "auto"
    if auto:
        method = "monolithic" if integers <= MONOLITHIC_MAX_INTEGERS or len(form.blocks) == 1 else "decomposition"
    if not form.blocks:
        solution = Solution(columns=[], objective=0.0, lower_bound=0.0, status="optimal", method="monolithic")
    elif method == "monolithic":
        try:
            solution = solve_monolithic(form, _left(start, opts), opts.relative_gap)
        except NoMilpSolution:
            # Never fail a solvable input: the decomposition always ends with a feasible answer.
            solution = solve_lagrangian(form, _left(start, opts), opts.relative_gap)
    else:
        solution = solve_lagrangian(form, _left(start, opts), opts.relative_gap, warm=warm_start)
        if auto and proven_gap(solution.objective, solution.lower_bound) > opts.relative_gap \
                and integers <= MONOLITHIC_FALLBACK_INTEGERS and _left(start, opts) > 0.1:
            try:
                solution = _better(solution, solve_monolithic(
                    form, _left(start, opts), opts.relative_gap, cutoff=solution.objective,
                    cuts=solution.cuts, start=solution.columns), opts.relative_gap)
            except NoMilpSolution as none:
                # keep the decomposition's answer, with the search's bound where that is tighter
                bound = min(max(solution.lower_bound, none.bound), solution.objective)
                solution = dataclasses.replace(solution, lower_bound=bound, status=gap_status(
                    proven_gap(solution.objective, bound), opts.relative_gap, solution.status))
    result = _report(form, solution, time.perf_counter() - began)
    # the decomposition's prices and per-model results, with the replicas finally chosen
    prior = solution.warm_start or WarmStart()
    result._warm_start = dataclasses.replace(prior, replicas=dict(result.replicas))
    return result


def _left(start: float, opts: AllocationOptions) -> float:
    return opts.time_limit_s - (time.perf_counter() - start)


def _better(a: Solution, b: Solution, relative_gap: float) -> Solution:
    """The cheaper answer, with the tighter of the two proven bounds (both are valid)."""
    best = a if a.objective <= b.objective else b
    bound = min(max(a.lower_bound, b.lower_bound), best.objective)
    status = gap_status(proven_gap(best.objective, bound), relative_gap, best.status)
    return Solution(columns=best.columns, objective=best.objective, lower_bound=bound, status=status,
                    method=best.method, iterations=a.iterations + b.iterations,
                    warm_started=a.warm_started or b.warm_started, warm_start=a.warm_start or b.warm_start)


def _report(form: Formulation, sol: Solution, elapsed: float) -> Allocation:
    replicas = {v.name: 0 for v in form.variants}
    routing: list[RouteWeight] = []
    unmet: dict[str, float] = {w.model: 0.0 for w in form.problem.workloads}
    load: dict[str, float] = {}
    cost = change = 0.0
    n_all = np.zeros(len(form.variants))
    loads_all = np.zeros(len(form.variants))
    for block, x in zip(form.blocks, sol.columns, strict=True):
        n = np.rint(x[block.col_n])
        n_all[block.variants] = n
        for j, gi in enumerate(block.variants):
            replicas[form.variants[gi].name] = int(n[j])
        cost += float(form.variant_cost[block.variants] @ n)
        delta = n - form.variant_current[block.variants]
        change += float(form.variant_change_penalty[block.variants] @ np.maximum(delta, 0)
                        + form.variant_removal_penalty[block.variants] @ np.maximum(-delta, 0))
        routing += _routes(form, block, x)
        u = np.clip(x[block.col_u], 0.0, 1.0)
        u[u < _TINY] = 0.0
        unmet[block.model] = float(u @ block.rates)
        y = np.clip(x[block.col_y], 0.0, None)
        work = np.bincount(block.flow_variant, weights=y * block.rates[block.flow_bucket] / block.flow_capacity,
                           minlength=len(block.variants))
        loads_all[block.variants] = work
        for j, gi in enumerate(block.variants):
            if n[j] > 0:
                load[form.variants[gi].name] = float(work[j] / n[j])
    gap = proven_gap(sol.objective, sol.lower_bound)
    return Allocation(
        replicas=replicas, routing=routing, cost_per_hour=cost, change_cost_per_hour=change,
        objective=sol.objective, lower_bound=sol.lower_bound, gap=gap, unmet_demand_rps=unmet,
        normalized_load=load, binding_constraints=_binding(form, n_all, loads_all, unmet),
        notes=list(form.notes), status=sol.status, method=sol.method, iterations=sol.iterations,
        solve_time_s=elapsed, warm_started=sol.warm_started,
    )


def _routes(form: Formulation, block: ModelBlock, x: np.ndarray) -> list[RouteWeight]:
    y = np.clip(x[block.col_y], 0.0, None)
    served = 1.0 - np.clip(x[block.col_u], 0.0, 1.0)
    out = []
    for f in np.nonzero(y > _TINY)[0]:
        b = block.flow_bucket[f]
        if served[b] <= _TINY:
            continue
        out.append(RouteWeight(
            model=block.model, bucket=block.bucket_labels[b],
            variant=form.variants[block.variants[block.flow_variant[f]]].name,
            stage=STAGE_NAMES[block.flow_stage[f]], weight=min(1.0, float(y[f] / served[b])),
            rate_rps=float(y[f] * block.rates[b]),
        ))
    return out


def _binding(form: Formulation, n: np.ndarray, work: np.ndarray, unmet: dict[str, float]) -> list[str]:
    out = []
    s = form.options.service_level
    k, acc = form.variant_accelerators, form.variant_accelerator
    room = form.variant_max > n
    for a in form.limited:
        used = float(k[acc == a] @ n[acc == a])
        left = form.available[a] - used
        fits = room & (acc == a) & (k <= left)
        if not fits.any():
            out.append(f"inventory of {form.accelerator_names[a]} exhausted ({used:g}/{form.available[a]:g})")
    if form.power_cap_w is not None:
        used = float(form.variant_power_w @ n)
        if not (room & (form.variant_power_w <= form.power_cap_w - used)).any():
            out.append(f"power cap reached ({used:g}/{form.power_cap_w:g} W)")
    for i, v in enumerate(form.variants):
        if v.max_replicas is not None and n[i] >= v.max_replicas and n[i] > 0 and work[i] >= s * n[i] - 1e-6:
            out.append(f"variant {v.name} at max_replicas ({v.max_replicas}) and fully loaded")
        if form.soft_min[i] and n[i] < v.min_replicas:
            out.append(f"variant {v.name} below min_replicas ({int(n[i])} of {v.min_replicas}): not enough inventory")
        needed = math.ceil(work[i] / s - 1e-6)
        if n[i] > needed and n[i] > 0:
            if n[i] == v.min_replicas:
                out.append(f"variant {v.name} held at min_replicas ({v.min_replicas}); demand needs {needed}")
            elif n[i] == form.variant_current[i] and form.variant_removal_penalty[i] > 0:
                out.append(f"variant {v.name} kept at its current {int(n[i])} replicas (demand needs {needed}): "
                           "the change penalty exceeds the saving")
    for model, rps in unmet.items():
        if rps > 1e-6:
            w = form.problem.workload(model)
            out.append(f"model {model}: {rps:.4g} of {w.arrival_rate_rps:.4g} rps unmet")
    return out

