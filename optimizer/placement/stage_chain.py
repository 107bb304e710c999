"""Fast construction of a layer placement as a chain of stages, by bisection on the target flow.

A *stage* is a set of nodes of one machine type in one region that all hold the same layers; a
chain of stages covering the model carries min(stage throughput, boundary link capacity). For a
target flow F, a type offers stages of m nodes holding any k layers with m * T(k) >= F; which
layer totals a pool of nodes can reach is a small knapsack, kept as bitsets (bit i = i layers).
Regions are visited one after another; where the chain crosses from region r to r', the last
stage before and the first stage after need m_last * m_first node pairs so that the pairs' links
carry F. Feasibility is monotone in F, so bisection over the candidate values of F (the m * T(k)
thresholds and the link limits) finds the best chain this family contains.

The family is narrower than all placements (no mixed-type stages, no flow sharing across
stages); the local search and the MILP look beyond it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import permutations


@dataclass(frozen=True)
class NodeClass:
    """Nodes that are interchangeable for placement: same machine type, same region."""

    machine: str
    region: str | None
    count: int


@dataclass(frozen=True)
class Stage:
    machine: str
    region: str | None
    size: int
    layers: int


@dataclass(frozen=True)
class ChainProblem:
    classes: tuple[NodeClass, ...]
    table: dict[str, tuple[float, ...]]
    num_layers: int
    pair_capacity: dict[tuple[str | None, str | None], float]
    coordinator_capacity: dict[str | None, float]

    def regions(self) -> list[str | None]:
        return sorted({c.region for c in self.classes}, key=lambda r: (r is None, r or ""))


def _bits(values) -> int:
    out = 0
    for v in values:
        out |= 1 << v
    return out


def _sumset(a: int, b: int, cap: int) -> int:
    if not a or not b:
        return 0
    out, i = 0, 0
    mask = (1 << (cap + 1)) - 1
    while a:
        if a & 1:
            out |= b << i
        a >>= 1
        i += 1
    return out & mask


def _members(bits: int) -> list[int]:
    out, i = [], 0
    while bits:
        if bits & 1:
            out.append(i)
        bits >>= 1
        i += 1
    return out


class OutOfTime(Exception):
    """The deadline passed in the middle of a feasibility check."""


class _Solver:
    """Feasibility of one target flow F, with reconstruction of a chain reaching it."""

    def __init__(self, problem: ChainProblem, flow: float, deadline: float = math.inf):
        self.p, self.f = problem, flow
        self.deadline = deadline
        self.L = problem.num_layers
        self.by_region: dict[str | None, list[NodeClass]] = {}
        for c in problem.classes:
            self.by_region.setdefault(c.region, []).append(c)
        self._reach: dict[tuple[str, int], int] = {}
        self._block: dict[tuple, int] = {}

    def kset(self, machine: str, size: int) -> int:
        row = self.p.table[machine]
        return _bits(k for k in range(1, min(len(row) - 1, self.L) + 1) if size * row[k] >= self.f * (1 - 1e-12))

    def reach(self, machine: str, nodes: int) -> int:
        """Layer totals reachable with at most `nodes` nodes of a type (any number of stages)."""
        key = (machine, nodes)
        if key not in self._reach:
            self._reach[key] = self._compute_reach(machine, nodes)
        return self._reach[key]

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime

    def _compute_reach(self, machine: str, nodes: int) -> int:
        exact = [1] + [0] * nodes
        for n in range(1, nodes + 1):
            self._check_time()
            acc = 0
            for m in range(1, n + 1):
                acc |= _sumset(exact[n - m], self.kset(machine, m), self.L)
            exact[n] = acc
        out = 0
        for bits in exact:
            out |= bits
        return out

    def need_pairs(self, a: str | None, b: str | None) -> int:
        cap = self.p.pair_capacity.get((a, b), math.inf)
        return 1 if cap >= self.f else max(1, math.ceil(self.f / max(cap, 1e-12) - 1e-12))

    def middle(self, region: str | None, used: tuple[int, ...]) -> int:
        total = 1
        for c, u in zip(self.by_region[region], used, strict=True):
            total = _sumset(total, self.reach(c.machine, c.count - u), self.L)
        return total

    def block(self, region: str | None, first_min: int, last_min: int) -> int:
        """Layer totals one region can cover as a non-empty block whose end stages are big enough."""
        key = (region, first_min, last_min)
        if key not in self._block:
            self._block[key] = self._compute_block(region, first_min, last_min)
        return self._block[key]

    def _compute_block(self, region: str | None, first_min: int, last_min: int) -> int:
        classes = self.by_region[region]
        intra = self.need_pairs(region, region)
        first_min, last_min = max(first_min, 1), max(last_min, 1)
        out = 0
        for stages in self._end_stage_choices(classes, first_min, last_min):
            self._check_time()
            used = [0] * len(classes)
            bits = 1
            for ci, m in stages:
                used[ci] += m
                bits = _sumset(bits, self.kset(classes[ci].machine, m), self.L)
            if any(u > c.count for u, c in zip(used, classes, strict=True)) or not bits:
                continue
            if len(stages) == 1:
                out |= bits
            elif intra == 1:
                out |= _sumset(bits, self.middle(region, tuple(used)), self.L)
        return out

    def _end_stage_choices(self, classes, first_min, last_min):
        for ci, c in enumerate(classes):
            for m in range(max(first_min, last_min), c.count + 1):
                yield ((ci, m),)
        for ci, c in enumerate(classes):
            for m1 in range(first_min, c.count + 1):
                for cj, d in enumerate(classes):
                    for m2 in range(last_min, d.count + 1):
                        if ci == cj and m1 + m2 > c.count:
                            continue
                        yield ((ci, m1), (cj, m2))

    def plans(self):
        """(region order, per-region (first_min, last_min)) combinations that respect crossings."""
        regions = self.p.regions()
        coord = self.p.coordinator_capacity
        for size in range(1, len(regions) + 1):
            for order in permutations(regions, size):
                head = max(1, math.ceil(self.f / max(coord.get(order[0], math.inf), 1e-12) - 1e-12))
                tail = max(1, math.ceil(self.f / max(coord.get(order[-1], math.inf), 1e-12) - 1e-12))
                crossings = [self.need_pairs(a, b) for a, b in zip(order, order[1:], strict=False)]
                for splits in _pair_splits(crossings):
                    firsts = [head] + [s[1] for s in splits]
                    lasts = [s[0] for s in splits] + [tail]
                    yield order, list(zip(firsts, lasts, strict=True))

    def feasible(self):
        for order, ends in self.plans():
            total = 1
            sets = []
            for region, (a, b) in zip(order, ends, strict=True):
                bits = self.block(region, a, b)
                sets.append(bits)
                total = _sumset(total, bits, self.L)
                if not total:
                    break
            if total >> self.L & 1:
                return order, ends, sets
        return None

    def build(self, order, ends, sets) -> list[Stage]:
        """A concrete chain: split L over the blocks, then each block into stages."""
        targets = _split_target(sets, self.L)
        chain: list[Stage] = []
        for region, (a, b), target in zip(order, ends, targets, strict=True):
            chain += self._build_block(region, a, b, target)
        return chain

    def _build_block(self, region, a, b, target) -> list[Stage]:
        classes = self.by_region[region]
        intra = self.need_pairs(region, region)
        for stages in self._end_stage_choices(classes, max(a, 1), max(b, 1)):
            self._check_time()
            used = [0] * len(classes)
            ksets = []
            for ci, m in stages:
                used[ci] += m
                ksets.append(self.kset(classes[ci].machine, m))
            if any(u > c.count for u, c in zip(used, classes, strict=True)):
                continue
            with_middle = len(stages) > 1
            if intra > 1 and with_middle:
                continue
            parts = ksets + ([self.reach(c.machine, c.count - u) for c, u in zip(classes, used, strict=True)]
                             if with_middle else [])
            split = _split_target(parts, target)
            if split is None:
                continue
            ends = [Stage(classes[ci].machine, region, m, k) for (ci, m), k in zip(stages, split, strict=False)]
            middle = []
            if with_middle:
                for c, u, k in zip(classes, used, split[len(stages):], strict=True):
                    middle += self._build_type(c, c.count - u, k)
            return [ends[0], *middle, *ends[1:]]
        raise AssertionError("a feasible block could not be rebuilt")

    def _build_type(self, c: NodeClass, nodes: int, target: int) -> list[Stage]:
        if target == 0:
            return []
        for m in range(1, nodes + 1):
            ks = self.kset(c.machine, m)
            for k in _members(ks):
                if k <= target and (self.reach(c.machine, nodes - m) >> (target - k)) & 1:
                    return [Stage(c.machine, c.region, m, k), *self._build_type(c, nodes - m, target - k)]
        raise AssertionError("reachable layer total could not be rebuilt")


def _pair_splits(crossings: list[int]):
    """Every way to meet each crossing's pair count q with (last stage size, first stage size)."""
    options = [[(m, math.ceil(q / m)) for m in range(1, q + 1)] for q in crossings]

    def rec(i):
        if i == len(options):
            yield []
            return
        for opt in options[i]:
            for rest in rec(i + 1):
                yield [opt, *rest]

    yield from rec(0)


def _split_target(sets: list[int], target: int) -> list[int] | None:
    """Pick one value from each bitset so that they sum to target (None when impossible)."""
    suffix = [1]
    for bits in reversed(sets):
        suffix.append(_sumset(suffix[-1], bits, target))
    suffix.reverse()
    if not (suffix[0] >> target) & 1:
        return None
    out, remaining = [], target
    for i, bits in enumerate(sets):
        for v in _members(bits):
            if v <= remaining and (suffix[i + 1] >> (remaining - v)) & 1:
                out.append(v)
                remaining -= v
                break
    return out


def candidate_flows(problem: ChainProblem) -> list[float]:
    """Values at which feasibility can change: m * T(k) for every type, size and layer count."""
    values = set()
    for c in problem.classes:
        row = problem.table[c.machine]
        for m in range(1, c.count + 1):
            values.update(m * t for t in row[1:] if t > 0)
    for cap in problem.pair_capacity.values():
        values.update(cap * q for q in range(1, 20))
    return sorted(v for v in values if math.isfinite(v) and v > 0)


def best_chain(problem: ChainProblem, deadline: float = math.inf) -> tuple[float, list[Stage], bool]:
    """The best chain of homogeneous stages: (the F it guarantees, its stages, whether the search
    finished before `deadline` (time.monotonic())); (0, [], ...) when none was found.

    Out of time, the bisection stops and the best chain proven so far is returned, so the answer is
    a valid lower bound, just not the best of the family.
    """
    values = candidate_flows(problem)
    lo, hi = 0, len(values) - 1
    best: tuple[float, list[Stage]] = (0.0, [])
    while lo <= hi:
        mid = (lo + hi) // 2
        solver = _Solver(problem, values[mid], deadline)
        try:
            found = solver.feasible()
            stages = solver.build(*found) if found else None
        except OutOfTime:
            return (*best, False)
        if stages is not None:
            best = (values[mid], stages)
            lo = mid + 1
        else:
            hi = mid - 1
    return (*best, True)
