"""Integer replica counts for one model from its LP relaxation, without another solver call.

Why: a per-model MILP costs tens of milliseconds, and when the clock runs out before every model
has had one, the answer must still be a sensible allocation. Two candidates are built and the
cheaper kept:

* ceil: round every replica count up; the LP routing stays feasible.
* floor + cover: round down, shrink the routing that no longer fits, then cover what is left with
  spare capacity and then either with as few replicas of one variant as do it alone, or greedily
  with the replica that covers the most of it per dollar, whichever is cheaper.
* one variant (or one P and one D variant) alone carrying the whole model, which is what wins
  when a model's demand sits just above a whole replica of its LP favourite.

Given a budget of coupling rows (accelerators left per type, watts left), no replica is added that
would overdraw it; demand that cannot be covered then stays unmet. The result is always a feasible
block solution; it proves nothing about optimality.
"""

from __future__ import annotations

import numpy as np

from optimizer.allocation_formulation import STAGE_D, STAGE_P, ModelBlock

_EPS = 1e-9
_MAX_ADDED = 256


def round_block(block: ModelBlock, x_lp: np.ndarray, priced: np.ndarray, current: np.ndarray,
                usage: np.ndarray | None = None, budget: np.ndarray | None = None) -> np.ndarray:
    """The cheaper (at `priced` costs) of the ceil and floor-and-cover roundings of `x_lp`.

    `usage` (coupling rows x variants) and `budget` (per coupling row) limit what may be added.
    """
    n_lp = x_lp[block.col_n]
    lo, hi = block.col_lb[block.col_n], block.col_ub[block.col_n]
    best = None
    ceil = np.minimum(np.ceil(n_lp - 1e-7), hi)
    if budget is None or np.all(usage @ ceil <= budget + 1e-9):
        best = _complete(block, ceil, x_lp[block.col_y].copy(), x_lp[block.col_u].copy(), current)
    floor = np.maximum(np.floor(n_lp + 1e-7), lo)
    y = np.clip(x_lp[block.col_y], 0.0, None)
    u = np.clip(x_lp[block.col_u], 0.0, 1.0)
    starts = [(floor, y, u), (lo.copy(), np.zeros_like(y), u)]
    flows = _Flows(block)  # once for the four roundings below: it depends on the block alone
    for n0, y0, u0 in starts:
        for greedy in (False, True):
            n, y1, u1 = _floor_and_cover(block, n0.copy(), y0.copy(), u0.copy(), priced, hi, usage, budget, greedy,
                                         flows)
            cand = _complete(block, n, y1, u1, current)
            if best is None or priced @ cand < priced @ best - _EPS:
                best = cand
    return best


def _floor_and_cover(block: ModelBlock, n, y, u, priced, hi, usage, budget, greedy: bool, flows=None):
    """Shrink the routing to fit `n`, then add replicas until the demand `1 - u` is covered again.

    `flows`: the block's `_Flows`, when the caller already built them."""
    work = block.flow_work
    fv, fb, fs = block.flow_variant, block.flow_bucket, block.flow_stage
    nv, nb = len(block.variants), len(block.rates)
    load = np.bincount(fv, weights=y * work, minlength=nv)
    shrink = np.where(load > n + _EPS, n / np.maximum(load, _EPS), 1.0)
    y *= shrink[fv]
    load = np.bincount(fv, weights=y * work, minlength=nv)
    spare = np.maximum(n - load, 0.0)
    pre = fs != STAGE_D
    dec = fs != STAGE_P
    need_pre = np.maximum((1 - u) - np.bincount(fb[pre], weights=y[pre], minlength=nb), 0.0)
    need_dec = np.maximum((1 - u) - np.bincount(fb[dec], weights=y[dec], minlength=nb), 0.0) \
        if block.disaggregated else need_pre.copy()
    left = None if budget is None else budget - usage @ n
    flows = flows if flows is not None else _Flows(block)
    _route(flows, y, spare, need_pre, need_dec)
    if not greedy:
        _cover_alone(block, work, y, spare, need_pre, need_dec, priced[block.col_n], n, hi, usage, left)
    unit_cost = priced[block.col_n].tolist()
    for _ in range(_MAX_ADDED):
        _route(flows, y, spare, need_pre, need_dec)
        if need_pre.max(initial=0.0) <= 1e-7 and need_dec.max(initial=0.0) <= 1e-7:
            break
        allowed = n < hi
        if left is not None:
            allowed &= np.all(usage <= left[:, None] + 1e-9, axis=0)
        w = _best_addition(flows, spare, need_pre, need_dec, unit_cost, allowed)
        if w is None:
            break
        n[w] += 1
        spare[w] += 1.0
        if left is not None:
            left = left - usage[:, w]
    # whatever is still uncovered is unmet; the side served more gives back its P- or D-only share
    served = np.minimum(np.bincount(fb[pre], weights=y[pre], minlength=nb),
                        np.bincount(fb[dec], weights=y[dec], minlength=nb) if block.disaggregated else np.inf)
    served = np.minimum(served, 1.0)
    for side, only in ((pre, STAGE_P), (dec, STAGE_D)):
        excess = np.bincount(fb[side], weights=y[side], minlength=nb) - served
        for f in np.nonzero(fs == only)[0]:
            cut = min(y[f], max(excess[fb[f]], 0.0))
            y[f] -= cut
            excess[fb[f]] -= cut
    return n, y, 1.0 - served


def _cover_alone(block: ModelBlock, work, y, spare, need_pre, need_dec, unit_cost, n, hi, usage, left) -> None:
    """Cover each stage's uncovered shares with replicas of the one variant that does it cheapest."""
    fv, fb, fs = block.flow_variant, block.flow_bucket, block.flow_stage
    stages = [(need_pre, STAGE_P), (need_dec, STAGE_D)] if block.disaggregated else [(need_pre, None)]
    plans = []
    for need, role in stages:
        best = None
        for v in np.unique(fv):
            mine = fv == v
            if role is not None and fs[mine][0] not in (role,):
                continue
            missing = need > 1e-7
            served = np.zeros(len(need), dtype=bool)
            served[fb[mine]] = True
            if np.any(missing & ~served):
                continue
            extra = max(float(np.dot(need[fb[mine]], work[mine])) - spare[v], 0.0)
            k = int(np.ceil(extra - 1e-9))
            if n[v] + k > hi[v] or (left is not None and np.any(usage[:, v] * k > left + 1e-9)):
                continue
            if best is None or k * unit_cost[v] < best[0]:
                best = (k * unit_cost[v], v, k)
        plans.append(best)
    if block.disaggregated:
        # a PD variant may carry both stages at once
        joint = None
        both = np.minimum(need_pre, need_dec)
        if np.allclose(need_pre, need_dec, atol=1e-7):
            for v in np.unique(fv[fs == 0]):
                mine = fv == v
                served = np.zeros(len(both), dtype=bool)
                served[fb[mine]] = True
                if np.any((both > 1e-7) & ~served):
                    continue
                k = int(np.ceil(max(float(np.dot(both[fb[mine]], work[mine])) - spare[v], 0.0) - 1e-9))
                if n[v] + k > hi[v] or (left is not None and np.any(usage[:, v] * k > left + 1e-9)):
                    continue
                if joint is None or k * unit_cost[v] < joint[0]:
                    joint = (k * unit_cost[v], v, k)
        split = None if None in plans else sum(p[0] for p in plans)
        if joint is not None and (split is None or joint[0] <= split):
            plans = [joint]
    for plan in plans:
        if plan is None:
            continue
        _, v, k = plan
        if left is not None and np.any(usage[:, v] * k > left + 1e-9):
            continue
        n[v] += k
        spare[v] += k
        if left is not None:
            left -= usage[:, v] * k


class _Flows:
    """A block's flows as Python lists (the pouring loops run on scalars), prepared once per rounding."""

    def __init__(self, block: ModelBlock):
        work = block.flow_work
        self.disaggregated = block.disaggregated
        self.variant, self.bucket = block.flow_variant.tolist(), block.flow_bucket.tolist()
        self.stage, self.work, self.rates = block.flow_stage.tolist(), work.tolist(), block.rates.tolist()
        self.by_work = np.argsort(work, kind="stable").tolist()
        self.of_variant: dict[int, list[int]] = {}  # a variant's flows, least work first
        for v in np.unique(block.flow_variant).tolist():
            mine = np.nonzero(block.flow_variant == v)[0]
            self.of_variant[v] = mine[np.argsort(work[mine])].tolist()


def _route(flows: _Flows, y, spare, need_pre, need_dec) -> None:
    """Pour the uncovered shares into spare capacity, most capacity-efficient flows first."""
    fv, fb, fs, work = flows.variant, flows.bucket, flows.stage, flows.work
    ys, room, pre, dec = y.tolist(), spare.tolist(), need_pre.tolist(), need_dec.tolist()
    for f in flows.by_work:
        v, b, stage = fv[f], fb[f], fs[f]
        if room[v] <= _EPS:
            continue
        if stage == STAGE_P:
            want = pre[b]
        elif stage == STAGE_D:
            want = dec[b]
        else:
            want = min(pre[b], dec[b])
        if want <= _EPS:
            continue
        take = min(want, room[v] / work[f])
        ys[f] += take
        room[v] -= take * work[f]
        if stage != STAGE_D:
            pre[b] -= take
        if stage != STAGE_P:
            dec[b] -= take
        if not flows.disaggregated:
            dec[b] = pre[b]
    y[:], spare[:], need_pre[:], need_dec[:] = ys, room, pre, dec


def _best_addition(flows: _Flows, spare, need_pre, need_dec, unit_cost, allowed):
    """The allowed variant whose next replica covers the most uncovered demand (rps) per dollar."""
    fb, fs, work, rates = flows.bucket, flows.stage, flows.work, flows.rates
    pre, dec = need_pre.tolist(), need_dec.tolist()
    best, best_ratio = None, np.inf
    for v in np.nonzero(allowed)[0].tolist():
        mine = flows.of_variant.get(v)
        if not mine:
            continue
        want = [pre[fb[f]] if fs[f] == STAGE_P else dec[fb[f]] if fs[f] == STAGE_D else min(pre[fb[f]], dec[fb[f]])
                for f in mine]
        if max(want, default=0.0) <= _EPS:
            continue
        room, covered = 1.0 + float(spare[v]), 0.0
        for k, f in enumerate(mine):
            if room <= _EPS:
                break
            take = min(want[k], room / work[f])
            covered += take * rates[fb[f]]
            room -= take * work[f]
        ratio = max(unit_cost[v], _EPS) / max(covered, _EPS)
        if covered > _EPS and ratio < best_ratio:
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
    x[block.col_u] = np.maximum(u, block.col_lb[block.col_u])
    return x
