"""Warm start of the allocation from the previous control cycle's solution.

Why: the operator re-plans the whole fleet every cycle, and between two cycles demand and inventory
barely move, so the inventory prices, most models' per-model optima and the allocation itself are
nearly what they were. Starting from them, a cycle proves its gap with little or no per-model MILP
work instead of rebuilding everything from the LP relaxation.

What is carried (`WarmStart`, no Kubernetes in it; the controller keeps the last one in memory):

* the coupling-row prices at which the per-model results below were computed (per accelerator type,
  and per watt of a power cap), by name, so prices from a differently shaped inventory still apply
  where the names match (0 elsewhere). Any prices >= 0 give a valid Lagrangian bound, so stale
  prices can only weaken the bound, never make it wrong.
* per model, its last per-model result (column and proven bound) with a fingerprint of everything
  that result depends on: the model's block (demand, capacities, bounds, current replicas, costs),
  its coupling usage, the prices and the per-model gap. A result is reused only when the fingerprint
  is identical, i.e. when re-solving would compute the very same thing; anything else is re-solved.
* the previous replicas per variant, repaired to the new bounds, demand and inventory
  (`repaired_columns`) and offered to the master as one more column per model: a good incumbent at
  once. The master MILP re-checks the inventory rows, so a stale plan can never overdraw stock.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

from optimizer.allocation_formulation import Formulation
from optimizer.allocation_rounding import _complete, _floor_and_cover


@dataclass(frozen=True)
class CachedBlock:
    """One model's per-model result at the prices of its fingerprint."""

    fingerprint: bytes
    x: np.ndarray  # block column (replicas, routing, unmet)
    bound: float  # proven lower bound of the priced per-model problem
    exact: bool  # x is within the per-model gap of that bound


@dataclass(frozen=True)
class WarmStart:
    """What one allocation hands the next one (see module doc). Safe to reuse on any other problem."""

    prices: dict[str, float] = field(default_factory=dict)  # coupling row name -> price ($/h per unit)
    replicas: dict[str, int] = field(default_factory=dict)  # variant name -> replicas decided
    blocks: dict[str, CachedBlock] = field(default_factory=dict)  # model name -> per-model result
    # model name -> (fingerprint of its block without prices, every column known for it): feasible again
    # as they are whenever the block is unchanged, whatever the prices
    columns: dict[str, tuple[bytes, tuple[np.ndarray, ...]]] = field(default_factory=dict)
    problem: bytes = b""  # fingerprint of the whole problem (every block and the stock) ...
    lower_bound: float = float("-inf")  # ... and the bound proven for it: still proven if nothing changed


def row_names(form: Formulation) -> list[str]:
    """Names of the coupling rows in `form.coupling_rhs` order."""
    names = [f"accelerator/{form.accelerator_names[a]}" for a in form.limited]
    if form.power_cap_w is not None:
        names.append("power_w")
    return names


def prices_for(form: Formulation, warm: WarmStart) -> np.ndarray | None:
    """The warm prices as a vector over this problem's coupling rows; None if they name none of them (cold start)."""
    names = row_names(form)
    if not names:
        return np.zeros(0)  # nothing couples the models: the per-model results still carry over
    if not any(n in warm.prices for n in names):
        return None
    return np.array([_price(warm.prices.get(n, 0.0)) for n in names])


def _price(value) -> float:
    """A usable price: finite and >= 0 (anything else prices the row at 0, which keeps every bound valid)."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        return 0.0
    return p if math.isfinite(p) and p > 0 else 0.0


def _count(value) -> float:
    """A usable replica count: finite and >= 0, else 0."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        return 0.0
    return n if math.isfinite(n) and n > 0 else 0.0


class Fingerprints:
    """Per-block hashes of everything a per-model result depends on; prices are added per call."""

    def __init__(self, form: Formulation, usage: list[np.ndarray], block_gap: float):
        self._base = []
        whole = hashlib.blake2b(digest_size=20)
        for block, u in zip(form.blocks, usage, strict=True):
            h = hashlib.blake2b(digest_size=20)
            for arr in (block.matrix.data, block.matrix.indices, block.matrix.indptr, block.row_lb, block.row_ub,
                        block.col_lb, block.col_ub, block.integrality, block.cost, u):
                a = np.ascontiguousarray(arr)
                h.update(str((a.dtype.str, a.shape)).encode())
                h.update(a.tobytes())
            h.update(np.float64(block_gap).tobytes())
            self._base.append(h)
            whole.update(block.model.encode() + b"\0" + h.digest())
        whole.update(np.ascontiguousarray(form.coupling_rhs, dtype=np.float64).tobytes())
        self.problem = whole.digest()
        self.blocks = [h.digest() for h in self._base]

    def of(self, index: int, prices: np.ndarray) -> bytes:
        h = self._base[index].copy()
        h.update(np.ascontiguousarray(prices, dtype=np.float64).tobytes())
        return h.digest()


def repaired_columns(form: Formulation, usage: list[np.ndarray], warm: WarmStart, prices: np.ndarray,
                     deadline: float | None = None) -> dict[int, np.ndarray]:
    """The previous replicas of every model, made a feasible column of this problem, all fitting stock together.

    Each model keeps its previous replica counts, clipped to this problem's bounds; its current
    demand is routed into them, and what they cannot carry is covered with replicas from stock left
    (else left unmet). Models are taken lowest unmet penalty first, and each may use only the stock
    the others' previous replicas leave, so that together the columns never exceed the inventory
    (with an inventory cut, the first ones give replicas up). Models none of whose variants appear in
    the warm start get no column, nor do those left when the clock passes `deadline` (a
    `time.perf_counter()` instant; the columns built by then still fit together).
    """
    rhs = form.coupling_rhs
    start: dict[int, np.ndarray] = {}
    for i, block in enumerate(form.blocks):
        names = [form.variants[g].name for g in block.variants]
        if not any(n in warm.replicas for n in names):
            continue
        lo, hi = block.col_lb[block.col_n], block.col_ub[block.col_n]
        prev = np.array([_count(warm.replicas.get(n, 0)) for n in names])
        start[i] = np.clip(np.rint(prev), lo, hi)
    reserved = sum((usage[i] @ n for i, n in start.items()), np.zeros(len(rhs)))
    used = np.zeros(len(rhs))
    out: dict[int, np.ndarray] = {}
    order = sorted(start, key=lambda i: (form.blocks[i].unmet_penalty_per_rps * form.blocks[i].rates.sum(), i))
    for i in order:
        if deadline is not None and time.perf_counter() > deadline:
            break
        block, n = form.blocks[i], start[i].copy()
        reserved = reserved - usage[i] @ n
        budget = rhs - reserved - used
        _trim(n, block.col_lb[block.col_n], usage[i], budget)
        priced = form.priced_cost(block, prices)
        current = form.variant_current[block.variants]
        best = None
        y0, u0 = np.zeros(len(block.flow_variant)), np.zeros(len(block.rates))
        for greedy in (False, True):
            n1, y1, u1 = _floor_and_cover(block, n.copy(), y0.copy(), u0.copy(), priced, block.col_ub[block.col_n],
                                          usage[i] if len(rhs) else None, np.maximum(budget, 0.0) if len(rhs) else None,
                                          greedy)
            cand = _complete(block, n1, y1, u1, current)
            if best is None or priced @ cand < priced @ best:
                best = cand
        used = used + usage[i] @ best[block.col_n]
        out[i] = best
    return out


def _trim(n: np.ndarray, lo: np.ndarray, usage: np.ndarray, budget: np.ndarray) -> None:
    """Drop replicas (never below `lo`) until `usage @ n <= budget` on every row that allows it.

    Bounded: each step removes one replica, and there are at most sum(n - lo) of them.
    """
    for _ in range(int(np.sum(n - lo)) + 1):
        over = usage @ n - np.maximum(budget, 0.0) > 1e-9
        if not np.any(over):
            return
        weight = usage[over].sum(axis=0) * (n > lo)
        if not np.any(weight > 0):
            return  # only hard minimums left on the overdrawn rows: inventory always holds those
        n[int(np.argmax(weight))] -= 1

