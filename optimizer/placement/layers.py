"""Helix-style layer placement: contiguous layer ranges on nodes, maximising the token max flow.

The pipeline, each step bounded in time:

1. ``stage_chain.best_chain`` -- bisection on the target flow over chains of homogeneous stages,
   region crossings included (milliseconds to a second on tens of nodes; on hundreds it can take
   minutes, so it stops at 60 % of the time limit with the best chain proven so far, or, if it
   proved none, a greedy chain of single nodes each holding as many layers as it can).
2. Local search on the concrete placement, every candidate scored by an independent max flow of
   the Helix-style graph (``flow_graph``): idle nodes join the bottleneck stage, layer boundaries
   move by one between neighbouring stages.
3. ``layer_milp.prove_or_improve`` with what time is left: fixed-target MILPs that either find a
   better placement or prove a target unreachable.

``status`` says whether every step ran to its end ("complete") or the time limit cut one short
("time_limit": the placement is the best found, valid, and its max flow and bound are exact).

The reported upper bound is the smaller of the closed-form capacity bound (valid for any link
rule) and what the MILP proved (valid for exact adjacency, which is the default rule here and the
one Helix's published graphs use).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from optimizer.placement.bounds import layer_capacity_bound
from optimizer.placement.cluster import Cluster, ModelDescription, Node
from optimizer.placement.flow_graph import (
    FlowResult,
    LayerPlacement,
    NodeRange,
    build_layer_graph,
    max_flow_value,
    solve_flow,
)
from optimizer.placement.layer_milp import Slot, prove_or_improve
from optimizer.placement.stage_chain import ChainProblem, NodeClass, Stage, best_chain
from optimizer.placement.throughput import NodeThroughputModel

_MAX_SEARCH_ROUNDS = 50


class BoundReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    capacity_bound: float = Field(description="Closed form, any link rule (bounds.layer_capacity_bound).")
    milp_bound: float | None = Field(description="Lowest target the MILP proved unreachable; None if none.")
    upper_bound: float
    milp_steps: list[tuple[float, str, float]] = Field(description="(target, outcome, seconds) per MILP solve.")


class LayerPlacementResult(BaseModel):
    """A placement, its max flow (independently computed), the bound and where the time went."""

    model_config = ConfigDict(frozen=True)

    cluster: str
    model: str
    partial_inference: bool
    placement: LayerPlacement
    max_flow: float
    bound: BoundReport
    gap: float = Field(description="(upper bound - max flow) / upper bound.")
    method: str = Field(description="Which step produced the placement.")
    status: Literal["complete", "time_limit"] = Field(
        description="complete: every step ran to its end; time_limit: the limit cut the search short.")
    elapsed_s: float
    timeline: list[tuple[float, str, float]] = Field(description="(seconds, step, max flow) as it improved.")
    node_throughput: dict[str, float] = Field(description="Inference tokens/s of each used node with its layers.")
    flow: FlowResult


@dataclass
class _Chain:
    """A placement as ordered stages of concrete nodes (all nodes of a stage hold the same layers)."""

    stages: list[tuple[list[str], int]]

    def placement(self, model: ModelDescription) -> LayerPlacement:
        ranges, start = [], 0
        for nodes, k in self.stages:
            ranges += [NodeRange(node=n, start=start, layers=k) for n in nodes]
            start += k
        return LayerPlacement(model=model.name, num_layers=model.num_layers, ranges=ranges)


def node_classes(cluster: Cluster, throughput: NodeThroughputModel) -> dict[tuple[str, str | None], list[Node]]:
    """Nodes grouped by (machine type, region), skipping machines that cannot hold a layer."""
    out: dict[tuple[str, str | None], list[Node]] = {}
    for n in cluster.nodes:
        if throughput.max_layers(n.machine.name) >= 1:
            out.setdefault((n.machine.name, n.region), []).append(n)
    return out


def chain_problem(cluster: Cluster, model: ModelDescription, throughput: NodeThroughputModel) -> ChainProblem:
    classes = node_classes(cluster, throughput)
    wire = model.token_bytes + model.activation_bytes_per_token
    by_region: dict[str | None, list[Node]] = {}
    for (_, region), nodes in classes.items():
        by_region.setdefault(region, []).extend(nodes)
    pair: dict[tuple[str | None, str | None], float] = {}
    for ra, na in by_region.items():
        for rb, nb in by_region.items():
            caps = [cluster.link(a, b).bytes_per_s / wire for a in na for b in nb if a.index != b.index]
            pair[(ra, rb)] = min(caps) if caps else math.inf
    coord = {r: cluster.coordinator_link().bytes_per_s / model.token_bytes for r in by_region}
    return ChainProblem(
        classes=tuple(NodeClass(m, r, len(ns)) for (m, r), ns in sorted(classes.items(), key=lambda kv: str(kv[0]))),
        table={m: tuple(row) for m, row in throughput.table.items()},
        num_layers=model.num_layers, pair_capacity=pair, coordinator_capacity=coord,
    )


def _concrete(stages, classes) -> _Chain:
    pools = {key: [n.name for n in nodes] for key, nodes in classes.items()}
    return _Chain([(
        [pools[(s.machine, s.region)].pop(0) for _ in range(s.size)], s.layers) for s in stages])


def _from_slots(slots: dict[Slot, int], problem: ChainProblem, classes, model: ModelDescription) -> LayerPlacement:
    pools = {(c.machine, c.region): [n.name for n in classes[(c.machine, c.region)]] for c in problem.classes}
    ranges = []
    for slot, count in sorted(slots.items(), key=lambda kv: (kv[0].start, kv[0].layers, kv[0].cls)):
        c = problem.classes[slot.cls]
        for _ in range(count):
            ranges.append(NodeRange(node=pools[(c.machine, c.region)].pop(0), start=slot.start, layers=slot.layers))
    return LayerPlacement(model=model.name, num_layers=model.num_layers, ranges=ranges)


class _Scorer:
    def __init__(self, cluster, model, throughput, partial):
        self.args = (cluster, model)
        self.throughput, self.partial = throughput, partial
        self.calls = 0

    def __call__(self, placement: LayerPlacement) -> float:
        self.calls += 1
        g = build_layer_graph(*self.args, placement, self.throughput, partial=self.partial)
        return max_flow_value(g)


def greedy_chain(problem: ChainProblem) -> list[Stage]:
    """Single-node stages, fastest nodes first, each holding as many layers as it serves ([] if L is not covered)."""
    def most_layers(machine: str) -> int:
        row = problem.table[machine]
        return max((k for k in range(1, len(row)) if row[k] > 0), default=0)

    stages, left = [], problem.num_layers
    by_speed = sorted(problem.classes, key=lambda c: -max(problem.table[c.machine], default=0.0))
    for c in by_speed:
        k = most_layers(c.machine)
        for _ in range(c.count if k else 0):
            if left == 0:
                break
            stages.append(Stage(c.machine, c.region, 1, min(k, left)))
            left -= stages[-1].layers
    return stages if left == 0 else []


def _improve_chain(chain: _Chain, score, value: float, idle: list[str], layer_limit: dict[str, int],
                   model: ModelDescription, deadline: float) -> tuple[_Chain, float, bool]:
    """First-improvement local search: an idle node joins a stage, or one layer moves across a boundary.

    Returns the chain, its score and whether the search converged (False: the deadline stopped it).
    """

    def fits(names: list[str], k: int) -> bool:
        return 1 <= k and all(k <= layer_limit[n] for n in names)

    idle = list(idle)
    for _ in range(_MAX_SEARCH_ROUNDS):
        trials = []
        for name in idle:
            trials += [(name, _Chain(chain.stages[:i] + [(nodes + [name], k)] + chain.stages[i + 1:]))
                       for i, (nodes, k) in enumerate(chain.stages) if fits([name], k)]
        for i in range(len(chain.stages) - 1):
            (a, ka), (b, kb) = chain.stages[i], chain.stages[i + 1]
            trials += [(None, _Chain(chain.stages[:i] + [(a, ka + d), (b, kb - d)] + chain.stages[i + 2:]))
                       for d in (1, -1) if fits(a, ka + d) and fits(b, kb - d)]
        for joined, trial in trials:
            if time.monotonic() > deadline:
                return chain, value, False
            v = score(trial.placement(model))
            if v > value * (1 + 1e-9):
                chain, value = trial, v
                if joined is not None:
                    idle.remove(joined)
                break
        else:
            break
    return chain, value, True


def place_layers(cluster: Cluster, model: ModelDescription, throughput: NodeThroughputModel, *,
                 time_limit_s: float = 60.0, partial: bool = False, use_milp: bool = True) -> LayerPlacementResult:
    """Best placement found within the time limit, with its independently computed max flow and bound."""
    began = time.monotonic()
    deadline = began + time_limit_s
    timeline: list[tuple[float, str, float]] = []
    classes = node_classes(cluster, throughput)
    layer_limit = {n.name: throughput.max_layers(n.machine.name) for ns in classes.values() for n in ns}
    problem = chain_problem(cluster, model, throughput)
    score = _Scorer(cluster, model, throughput, partial)

    target, stages, complete = best_chain(problem, deadline=began + 0.6 * time_limit_s)
    method = "stage-chain"
    if not stages and not complete:
        stages, method = greedy_chain(problem), "greedy chain (stage-chain search out of time)"
    if not stages:
        raise ValueError(f"no placement of {model.name} covers all {model.num_layers} layers on {cluster.name}")
    chain = _concrete(stages, classes)
    best = chain.placement(model)
    value = score(best)
    timeline.append((time.monotonic() - began, method, value))

    used = {r.node for r in best.ranges}
    idle = [n.name for nodes in classes.values() for n in nodes if n.name not in used]
    # A chain search cut short leaves the local search more of the limit to repair the chain.
    search_until = began + (max(min(0.5, time_limit_s), 0.3 * time_limit_s) if complete else 0.8 * time_limit_s)
    chain, improved, converged = _improve_chain(chain, score, value, idle, layer_limit, model, search_until)
    complete = complete and converged
    if improved > value:
        best, value, method = chain.placement(model), improved, method + " + local search"
        timeline.append((time.monotonic() - began, method, value))

    counts = {}
    for (machine, _), nodes in classes.items():
        counts[machine] = counts.get(machine, 0) + len(nodes)
    capacity = layer_capacity_bound(throughput, counts, model.num_layers)
    milp_bound, steps = None, []
    left = deadline - time.monotonic()
    if use_milp and left > 1.0 and value < capacity * (1 - 1e-4):
        outcome = prove_or_improve(list(problem.classes), problem.table, model.num_layers,
                                   value, capacity, left)
        steps = outcome.steps
        if outcome.upper_bound < capacity and not partial:
            milp_bound = outcome.upper_bound
        if outcome.best_slots:
            candidate = _from_slots(outcome.best_slots, problem, classes, model)
            v = score(candidate)
            if v > value * (1 + 1e-9):
                best, value, method = candidate, v, "MILP"
                timeline.append((time.monotonic() - began, method, value))
    upper = min(capacity, milp_bound) if milp_bound is not None else capacity
    upper = max(upper, value)
    g = build_layer_graph(cluster, model, best, throughput, partial=partial)
    flow = solve_flow(g)
    node_tp = {r.node: throughput.throughput(cluster.node(r.node).machine.name, r.layers) for r in best.ranges}
    return LayerPlacementResult(
        cluster=cluster.name, model=model.name, partial_inference=partial, placement=best.sorted(),
        max_flow=flow.max_flow,
        bound=BoundReport(capacity_bound=capacity, milp_bound=milp_bound, upper_bound=upper, milp_steps=steps),
        gap=(upper - flow.max_flow) / upper if upper > 0 else 0.0, method=method,
        status="complete" if complete else "time_limit",
        elapsed_s=time.monotonic() - began, timeline=timeline, node_throughput=node_tp, flow=flow,
    )
