"""Integer replica counts for one model from its LP relaxation, without another solver call.

Why: a per-model MILP costs tens of milliseconds, and most models' LP solutions are a few cheap
moves away from a good integer solution. Two candidates are built and the cheaper kept:

* ceil: round every replica count up; the LP routing stays feasible.
* floor + cover: round down, shrink the routing that no longer fits, then cover what is left with
  spare capacity and, where that runs out, with the replica that covers the most of it per dollar.

The result is always a feasible block solution (or None when the cover cannot finish within the
variants' upper bounds), so it can serve as a primal column; it proves nothing about optimality.
"""

from __future__ import annotations

import numpy as np

from optimizer.allocation_formulation import STAGE_D, STAGE_P, ModelBlock

_EPS = 1e-9
_MAX_ADDED = 64


def round_block(block: ModelBlock, x_lp: np.ndarray, priced: np.ndarray, current: np.ndarray) -> np.ndarray:
    """The cheaper (at `priced` costs) of the ceil and floor-and-cover roundings of `x_lp`."""
    n_lp = x_lp[block.col_n]
    lo, hi = block.col_lb[block.col_n], block.col_ub[block.col_n]
    best = _complete(block, np.minimum(np.ceil(n_lp - 1e-7), hi), x_lp[block.col_y].copy(),
                     x_lp[block.col_u].copy(), current)
    covered = _floor_and_cover(block, x_lp, priced, lo, hi)
    if covered is not None:
        cand = _complete(block, covered[0], covered[1], covered[2], current)
        if priced @ cand < priced @ best - _EPS:
            best = cand
    return best


def _floor_and_cover(block: ModelBlock, x_lp, priced, lo, hi):
    work = block.flow_work
    fv, fb, fs = block.flow_variant, block.flow_bucket, block.flow_stage
    nv, nb = len(block.variants), len(block.rates)
    n = np.maximum(np.floor(x_lp[block.col_n] + 1e-7), lo)
    y = np.clip(x_lp[block.col_y], 0.0, None).copy()
    u = np.clip(x_lp[block.col_u], 0.0, 1.0).copy()
    load = np.bincount(fv, weights=y * work, minlength=nv)
    shrink = np.where(load > n + _EPS, n / np.maximum(load, _EPS), 1.0)
    y *= shrink[fv]
    load = np.bincount(fv, weights=y * work, minlength=nv)
    spare = np.maximum(n - load, 0.0)
    pre = fs != STAGE_D
    dec = fs != STAGE_P
    need_pre = np.maximum((1 - u) - np.bincount(fb[pre], weights=y[pre], minlength=nb), 0.0)
    need_dec = np.maximum((1 - u) - np.bincount(fb[dec], weights=y[dec], minlength=nb), 0.0) if block.disaggregated \
        else need_pre.copy()
    unit_cost = priced[block.col_n]
    for _ in range(_MAX_ADDED + 1):
        _route(block, work, y, spare, need_pre, need_dec)
        if need_pre.max(initial=0.0) <= 1e-7 and need_dec.max(initial=0.0) <= 1e-7:
            return n, y, u
        w = _best_addition(block, work, spare, need_pre, need_dec, unit_cost, n, hi)
        if w is None:
            return None
        n[w] += 1
        spare[w] += 1.0
    return None


def _route(block: ModelBlock, work, y, spare, need_pre, need_dec) -> None:
    """Pour the uncovered shares into spare capacity, most capacity-efficient flows first."""
    fv, fb, fs = block.flow_variant, block.flow_bucket, block.flow_stage
    order = np.argsort(work, kind="stable")
    for f in order:
        v, b, stage = fv[f], fb[f], fs[f]
        if spare[v] <= _EPS:
            continue
        if stage == STAGE_P:
            want = need_pre[b] if block.disaggregated else 0.0
        elif stage == STAGE_D:
            want = need_dec[b]
        else:
            want = min(need_pre[b], need_dec[b]) if block.disaggregated else need_pre[b]
        if want <= _EPS:
            continue
        take = min(want, spare[v] / work[f])
        y[f] += take
        spare[v] -= take * work[f]
        if stage != STAGE_D:
            need_pre[b] -= take
        if stage != STAGE_P or not block.disaggregated:
            need_dec[b] -= take
        if not block.disaggregated:
            need_dec[b] = need_pre[b]


def _best_addition(block: ModelBlock, work, spare, need_pre, need_dec, unit_cost, n, hi):
    """The variant whose next replica covers the most uncovered demand per dollar."""
    fv, fb, fs = block.flow_variant, block.flow_bucket, block.flow_stage
    rates = block.rates
    best, best_ratio = None, np.inf
    for v in np.nonzero(n < hi)[0]:
        mine = fv == v
        stage = fs[mine]
        want = np.where(stage == STAGE_P, need_pre[fb[mine]],
                        np.where(stage == STAGE_D, need_dec[fb[mine]], np.minimum(need_pre[fb[mine]], need_dec[fb[mine]])))
        if want.max(initial=0.0) <= _EPS:
            continue
        # one replica, filled with the most efficient of its uncovered shares first
        order = np.argsort(work[mine])
        room, covered = 1.0 + spare[v], 0.0
        for k in order:
            if room <= _EPS:
                break
            take = min(want[k], room / work[mine][k])
            covered += take * rates[fb[mine][k]]
            room -= take * work[mine][k]
        if covered <= _EPS:
            continue
        ratio = max(unit_cost[v], _EPS) / covered
        if ratio < best_ratio:
            best, best_ratio = v, ratio
    return best


def _complete(block: ModelBlock, n, y, u, current) -> np.ndarray:
    """A full block column from replica counts and routing: change and shortfall columns filled in."""
    x = np.zeros(block.n_cols)
    x[block.col_n] = n
    if block.col_up.stop > block.col_up.start:
        x[block.col_up] = np.maximum(n - current, 0)
        x[block.col_down] = np.maximum(current - n, 0)
    x[block.col_short] = np.maximum(block.short_min - n[block.short_variants], 0)
    x[block.col_y] = y
    x[block.col_u] = u
    return x
