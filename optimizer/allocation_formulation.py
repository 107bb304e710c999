"""The allocation MILP compiled into one block per model plus the rows that couple the blocks.

Every solver of the allocation (the monolithic MILP, the Lagrangian decomposition, the final
routing read-out) works on the same numbers, so they are built once, here, as sparse matrices:
a model's block holds its replica counts, routing shares and unmet demand; the coupling rows are
the per-accelerator inventories and the power cap. Pricing the coupling rows (`priced_cost`) turns
the whole problem into independent per-model problems, which is what the decomposition needs.

Columns of a block, in order: n (replicas per variant, integer), up / down (replicas added or
removed vs current, only with a change penalty), short (replicas below a minimum that inventory
cannot honour, only for such variants), y (share of a bucket's demand routed to a variant, one per
(variant, bucket) it can serve) and u (unmet share per bucket). Shares are fractions of the bucket
rate, so every coefficient stays near 1 whatever the rates are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from optimizer.fleet import Role, Variant
from optimizer.input_limits import MAX_RATE_RPS
from optimizer.problem import AllocationOptions, Problem

if TYPE_CHECKING:
    from optimizer.allocation_warm import WarmStart

STAGE_PD, STAGE_P, STAGE_D = 0, 1, 2
STAGE_NAMES = ("PD", "P", "D")
_ROLE_STAGE = {Role.BOTH: STAGE_PD, Role.PREFILL: STAGE_P, Role.DECODE: STAGE_D}

# Unmet demand costs UNMET_FACTOR x (dearest replica-hour incl. change penalties) per DEMAND_RESOLUTION_RPS
# of demand, so adding any replica is cheaper than leaving 1 / UNMET_FACTOR of that rate unserved.
UNMET_FACTOR = 10.0
DEMAND_RESOLUTION_RPS = 0.01
# A replica kept below a minimum that inventory cannot honour costs this many dearest replica-hours.
MIN_SHORTFALL_FACTOR = 10.0


@dataclass(frozen=True)
class ModelBlock:
    """One model's part of the MILP: its own constraints and columns, no coupling rows."""

    model: str
    variants: np.ndarray  # global variant indices, local order
    bucket_labels: tuple[str, ...]
    rates: np.ndarray  # rps per bucket (all > 0)
    unmet_penalty_per_rps: float
    flow_variant: np.ndarray  # local variant index per routing column
    flow_bucket: np.ndarray
    flow_stage: np.ndarray  # STAGE_* of the variant's role
    flow_capacity: np.ndarray  # rps one replica sustains for that bucket (before service level)
    flow_work: np.ndarray  # replicas one whole bucket costs on that flow: rate / (service level x capacity)
    col_n: slice
    col_up: slice
    col_down: slice
    col_short: slice
    short_variants: np.ndarray  # local indices of variants with a soft minimum
    short_min: np.ndarray  # their minimums
    col_y: slice
    col_u: slice
    matrix: sp.csr_matrix
    row_lb: np.ndarray
    row_ub: np.ndarray
    col_lb: np.ndarray
    col_ub: np.ndarray
    integrality: np.ndarray
    cost: np.ndarray  # objective per column without coupling prices
    disaggregated: bool

    @property
    def n_cols(self) -> int:
        return self.matrix.shape[1]


@dataclass(frozen=True)
class LagrangianCut:
    """A proven lower bound of one block's problem at some coupling prices: a valid row for the whole MILP.

    Why: every feasible allocation's columns x_m of block m are feasible for the block on its own, so
    `priced_cost(block, prices) @ x_m >= bound` holds for all of them. Added to the monolithic MILP,
    the cuts of the decomposition's price rounds lift its LP relaxation to the Lagrangian bound (10
    models: 196 -> 207.6 $/h on seed 2), which its own cuts do not reach; branching then starts there.
    """

    block: int  # index into Formulation.blocks
    prices: np.ndarray  # per coupling row, as in Formulation.coupling_rhs
    bound: float


@dataclass
class Solution:
    """A solver's answer in block terms: one column vector per block, with its proof."""

    columns: list[np.ndarray]
    objective: float
    lower_bound: float
    status: str  # "optimal", "within_gap" or "time_limit"
    method: str
    iterations: int = 0
    warm_started: bool = False  # the decomposition started from a previous solution's prices and columns
    warm_start: WarmStart | None = None  # what the next solve may start from (decomposition only)
    cuts: list[LagrangianCut] = field(default_factory=list)  # per-block bounds the decomposition proved


def proven_gap(objective: float, bound: float) -> float:
    """(objective - bound) / objective, the gap every solver reports; 0 for a free allocation."""
    if objective <= 0:
        return 0.0
    return max(0.0, (objective - bound) / abs(objective))


def gap_status(gap: float, target: float, stopped_by: str) -> str:
    """"optimal", "within_gap", or what stopped the search ("time_limit" / "iteration_limit")."""
    if gap <= 1e-6:
        return "optimal"
    return "within_gap" if gap <= target + 1e-12 else stopped_by


@dataclass
class Formulation:
    """The whole allocation problem as numbers, plus what had to be decided about the input."""

    problem: Problem
    options: AllocationOptions
    accelerator_names: list[str]
    available: np.ndarray  # per accelerator type, inf = unlimited
    accelerator_power_w: np.ndarray
    variants: list[Variant]
    variant_model: np.ndarray
    variant_accelerator: np.ndarray
    variant_accelerators: np.ndarray  # accelerators per replica
    variant_cost: np.ndarray  # $/h per replica
    variant_power_w: np.ndarray  # W per replica
    variant_min: np.ndarray  # hard lower bound
    variant_max: np.ndarray
    variant_current: np.ndarray
    variant_change_penalty: np.ndarray  # $/h charged per replica added
    variant_removal_penalty: np.ndarray  # $/h charged per replica removed
    soft_min: np.ndarray  # minimum enforced only through a penalty (inventory cannot honour it)
    blocks: list[ModelBlock]
    limited: np.ndarray  # accelerator indices with finite inventory
    power_cap_w: float | None
    notes: list[str] = field(default_factory=list)

    def coupling_usage(self, block: ModelBlock) -> np.ndarray:
        """Rows: limited accelerator types, then power (if capped); columns: the block's n columns."""
        v = block.variants
        rows = [np.where(self.variant_accelerator[v] == a, self.variant_accelerators[v], 0.0) for a in self.limited]
        if self.power_cap_w is not None:
            rows.append(self.variant_power_w[v])
        return np.array(rows, dtype=float).reshape(len(rows), len(v))

    @property
    def coupling_rhs(self) -> np.ndarray:
        rhs = list(self.available[self.limited])
        if self.power_cap_w is not None:
            rhs.append(self.power_cap_w)
        return np.array(rhs, dtype=float)

    def priced_cost(self, block: ModelBlock, prices: np.ndarray) -> np.ndarray:
        """The block's objective with each coupling row charged at `prices` per unit used."""
        cost = block.cost.copy()
        if len(prices):
            cost[block.col_n] += prices @ self.coupling_usage(block)
        return cost


def capacity_value(value) -> float:
    """A capacity entry as a float: plain numbers, or objects with `max_rate_rps` (CapacityEstimate)."""
    rate = getattr(value, "max_rate_rps", value)
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise ValueError(f"capacity values must be numbers or have max_rate_rps, got {value!r}") from None
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"capacity values must be finite and >= 0, got {rate}")
    return rate


def build_formulation(problem: Problem, capacity: Mapping, options: AllocationOptions) -> Formulation:
    """Check the inputs against each other and compile the MILP blocks."""
    names = [a.name for a in problem.accelerators]
    acc_index = {n: i for i, n in enumerate(names)}
    available = np.array([math.inf if a.available is None else float(a.available) for a in problem.accelerators])
    power = np.array([a.power_w or 0.0 for a in problem.accelerators])
    cap_w = options.power_cap_w
    if cap_w is not None:
        missing = [a.name for a in problem.accelerators if a.power_w is None]
        if missing:
            raise ValueError(f"power_cap_w is set but accelerators {missing} have no power_w")
    variant_names = {v.name for v in problem.variants}
    caps: dict[tuple[str, str], float] = {}
    for key, value in capacity.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"capacity keys must be (variant name, bucket label), got {key!r}")
        if key[0] not in variant_names:
            raise ValueError(f"capacity names unknown variant {key[0]!r}")
        rate = capacity_value(value)
        if rate > 0:
            # No demand exceeds MAX_RATE_RPS, so a replica that serves more serves all of it either way;
            # the cap keeps LP coefficients in the range solvers accept (a profile of 1e-300 s is valid input).
            caps[key] = min(rate, MAX_RATE_RPS)

    variants = list(problem.variants)
    model_index = {m.name: i for i, m in enumerate(problem.models)}
    v_model = np.array([model_index[v.model] for v in variants])
    v_acc = np.array([acc_index[v.accelerator] for v in variants])
    v_k = np.array([v.accelerators_per_replica for v in variants], dtype=float)
    v_cost = np.array([problem.variant_cost_per_hour(v) for v in variants])
    v_power = v_k * power[v_acc]
    v_min = np.array([v.min_replicas for v in variants], dtype=float)
    v_cur = np.array([v.current_replicas for v in variants], dtype=float)
    s = options.service_level
    notes: list[str] = []

    soft = np.zeros(len(variants), dtype=bool)
    for a, name in enumerate(names):
        on_a = v_acc == a
        need = float(v_k[on_a] @ v_min[on_a])
        if need > available[a]:
            soft |= on_a & (v_min > 0)
            notes.append(
                f"min_replicas on {name} need {need:g} accelerators but only {available[a]:g} exist; "
                "those minimums are kept only as far as inventory allows"
            )
    if cap_w is not None and float(v_power @ v_min) > cap_w:
        soft |= v_min > 0
        notes.append(
            f"min_replicas draw {float(v_power @ v_min):g} W, above the power cap of {cap_w:g} W; "
            "minimums are kept only as far as the cap allows"
        )

    workloads = {w.model: w for w in problem.workloads}
    hi = np.empty(len(variants))
    for i, v in enumerate(variants):
        bound = math.inf if v.max_replicas is None else float(v.max_replicas)
        if math.isfinite(available[v_acc[i]]):
            bound = min(bound, math.floor(available[v_acc[i]] / v_k[i]))
        if cap_w is not None and v_power[i] > 0:
            bound = min(bound, math.floor(cap_w / v_power[i] + 1e-9))
        w = workloads.get(v.model)
        need = 0.0
        if w is not None:
            need = sum(r / (s * caps[(v.name, b)]) for b, r in w.bucket_rates_rps().items() if (v.name, b) in caps)
        useful = max(float(math.ceil(need - 1e-9)), v_min[i], v_cur[i])
        hi[i] = max(min(bound, useful), 0.0 if soft[i] else v_min[i])
    hard_min = np.where(soft, 0.0, v_min)
    hi = np.maximum(hi, hard_min)

    v_change = options.change_penalty_per_replica + options.change_penalty_share * v_cost
    v_removal = v_change * options.removal_penalty_weight
    dearest = float(v_cost.max(initial=0.0)) + 2 * float(v_change.max(initial=0.0))
    dearest = max(dearest, 1e-6)
    priorities = [w.priority for w in problem.workloads] or [1.0]
    unmet_rps = UNMET_FACTOR * dearest / DEMAND_RESOLUTION_RPS
    shortfall_cost = MIN_SHORTFALL_FACTOR * dearest

    by_model: dict[int, list[int]] = {}
    for i in range(len(variants)):
        by_model.setdefault(int(v_model[i]), []).append(i)
    blocks = []
    for m, model in enumerate(problem.models):
        idx = np.array(by_model.get(m, []), dtype=int)
        if len(idx) == 0:
            w = workloads.get(model.name)
            if w is not None and w.arrival_rate_rps > 0:
                notes.append(f"model {model.name} has demand but no variants; all of it is unmet")
            continue
        w = workloads.get(model.name)
        rates = w.bucket_rates_rps() if w is not None else {}
        penalty = unmet_rps * (w.priority if w is not None else 1.0) / min(priorities)
        blocks.append(_block(model.name, idx, rates, penalty, variants, caps, s, hard_min, hi, v_cur, v_cost,
                             soft, shortfall_cost, v_min, v_change, v_removal))

    limited = np.array([a for a in range(len(names)) if math.isfinite(available[a])], dtype=int)
    return Formulation(
        problem=problem, options=options, accelerator_names=names, available=available,
        accelerator_power_w=power, variants=variants, variant_model=v_model, variant_accelerator=v_acc,
        variant_accelerators=v_k, variant_cost=v_cost, variant_power_w=v_power, variant_min=hard_min,
        variant_max=hi, variant_current=v_cur, variant_change_penalty=v_change,
        variant_removal_penalty=v_removal, soft_min=soft, blocks=blocks,
        limited=limited,
        power_cap_w=cap_w, notes=notes,
    )


def _block(model, idx, rates, unmet_penalty, variants, caps, s, lo, hi, cur, cost, soft, shortfall_cost,
           v_min, change_penalty, removal_penalty) -> ModelBlock:
    labels = tuple(b for b, r in rates.items() if r > 0)
    r = np.array([rates[b] for b in labels], dtype=float)
    nv, nb = len(idx), len(labels)
    fv, fb, fs, fc = [], [], [], []
    for j, gi in enumerate(idx):
        v = variants[gi]
        for b, label in enumerate(labels):
            c = caps.get((v.name, label), 0.0)
            if c > 0:
                fv.append(j), fb.append(b), fs.append(_ROLE_STAGE[v.role]), fc.append(c)
    fv, fb = np.array(fv, dtype=int), np.array(fb, dtype=int)
    fs, fc = np.array(fs, dtype=int), np.array(fc, dtype=float)
    nf = len(fv)
    disagg = bool(np.any(fs != STAGE_PD))
    pen = bool(np.any(change_penalty[idx] > 0))
    short_local = np.array([j for j, gi in enumerate(idx) if soft[gi]], dtype=int)
    ns = len(short_local)

    col_n = slice(0, nv)
    col_up = slice(nv, nv + (nv if pen else 0))
    col_down = slice(col_up.stop, col_up.stop + (nv if pen else 0))
    col_short = slice(col_down.stop, col_down.stop + ns)
    col_y = slice(col_short.stop, col_short.stop + nf)
    col_u = slice(col_y.stop, col_y.stop + nb)
    ncols = col_u.stop

    entries = _Entries()
    prefill = fs != STAGE_D
    decode = fs != STAGE_P
    # demand: every served request is prefilled once and decoded once
    for stage_ok in ([prefill, decode] if disagg else [prefill]):
        row = entries.rows_added(nb, 1.0, 1.0)
        entries.add(row + fb[stage_ok], col_y.start + np.nonzero(stage_ok)[0], 1.0)
        entries.add(row + np.arange(nb), col_u.start + np.arange(nb), 1.0)
    # load: routed work of a variant fits in its replicas at the service level
    row = entries.rows_added(nv, -np.inf, 0.0)
    entries.add(row + fv, col_y.start + np.arange(nf), r[fb] / (s * fc) if nf else 0.0)
    entries.add(row + np.arange(nv), col_n.start + np.arange(nv), -1.0)
    # a variant serving any of a bucket smaller than one replica needs a whole replica (strengthening)
    vub = np.nonzero(s * fc > r[fb])[0]
    row = entries.rows_added(len(vub), -np.inf, 0.0)
    entries.add(row + np.arange(len(vub)), col_y.start + vub, 1.0)
    entries.add(row + np.arange(len(vub)), col_n.start + fv[vub], -1.0)
    if pen:
        row = entries.rows_added(nv, cur[idx], cur[idx])
        entries.add(row + np.arange(nv), col_n.start + np.arange(nv), 1.0)
        entries.add(row + np.arange(nv), col_up.start + np.arange(nv), -1.0)
        entries.add(row + np.arange(nv), col_down.start + np.arange(nv), 1.0)
    if ns:
        row = entries.rows_added(ns, v_min[idx[short_local]], np.inf)
        entries.add(row + np.arange(ns), col_n.start + short_local, 1.0)
        entries.add(row + np.arange(ns), col_short.start + np.arange(ns), 1.0)
    matrix, row_lb, row_ub = entries.matrix(ncols)

    col_lb = np.zeros(ncols)
    col_ub = np.ones(ncols)
    col_lb[col_n] = lo[idx]
    col_ub[col_n] = hi[idx]
    if pen:
        col_ub[col_up] = hi[idx]
        col_ub[col_down] = cur[idx]
    col_ub[col_short] = v_min[idx[short_local]]
    # buckets nobody can serve stay unmet
    servable = np.zeros(nb, dtype=bool)
    servable[fb[prefill]] = True
    if disagg:
        dec_ok = np.zeros(nb, dtype=bool)
        dec_ok[fb[fs != STAGE_P]] = True
        servable &= dec_ok
    col_lb[col_u.start + np.nonzero(~servable)[0]] = 1.0
    integrality = np.zeros(ncols, dtype=np.uint8)
    integrality[col_n] = 1
    obj = np.zeros(ncols)
    obj[col_n] = cost[idx]
    if pen:
        obj[col_up] = change_penalty[idx]
        obj[col_down] = removal_penalty[idx]
    obj[col_short] = shortfall_cost
    obj[col_u] = unmet_penalty * r
    return ModelBlock(
        model=model, variants=idx, bucket_labels=labels, rates=r, unmet_penalty_per_rps=unmet_penalty,
        flow_variant=fv, flow_bucket=fb, flow_stage=fs, flow_capacity=fc, flow_work=r[fb] / (s * fc),
        col_n=col_n, col_up=col_up, col_down=col_down, col_short=col_short, short_variants=short_local,
        short_min=v_min[idx[short_local]], col_y=col_y, col_u=col_u,
        matrix=matrix, row_lb=row_lb, row_ub=row_ub, col_lb=col_lb,
        col_ub=col_ub, integrality=integrality, cost=obj, disaggregated=disagg,
    )


class _Entries:
    """Sparse rows collected as arrays, then assembled once."""

    def __init__(self):
        self.n_rows = 0
        self.rows, self.cols, self.vals, self.lb, self.ub = [], [], [], [], []

    def rows_added(self, count: int, lb, ub) -> int:
        first = self.n_rows
        self.n_rows += count
        self.lb.append(np.broadcast_to(np.asarray(lb, dtype=float), (count,)))
        self.ub.append(np.broadcast_to(np.asarray(ub, dtype=float), (count,)))
        return first

    def add(self, rows, cols, vals) -> None:
        rows = np.asarray(rows, dtype=int)
        self.rows.append(rows)
        self.cols.append(np.asarray(cols, dtype=int))
        self.vals.append(np.broadcast_to(np.asarray(vals, dtype=float), rows.shape))

    def matrix(self, n_cols: int):
        m = sp.csr_matrix((_concat(self.vals, float), (_concat(self.rows, int), _concat(self.cols, int))),
                          shape=(self.n_rows, n_cols))
        return m, _concat(self.lb, float), _concat(self.ub, float)


def _concat(parts, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
