"""HexGen-2-style prefill/decode grouping: GPUs -> serving groups -> roles, scored by max flow.

For every GPU type the GPUs are split into as many groups as memory allows (each holds the
weights plus KV room; every GPU lands in exactly one group, or is idle when its type cannot form
one). The method, as in HexGen-2:

1. Spectral partition of the bandwidth graph: GPUs ordered by the Fiedler vector (GPUs joined by
   fast links end up adjacent), cut into consecutive groups.
2. Kernighan-Lin refinement of every pair of groups on the same graph (swaps keep sizes), kept
   only where it does not lower the max flow.
3. Roles: every assignment when there are few groups, else greedy flips; the best by max flow of
   source -> P -> KV links -> D -> sink (requests/s).
4. Iteration: move a GPU between groups, swap two GPUs, or flip a role -- groups on the minimum
   cut first -- and keep the best improving move until none improves.

The baselines of the ablation (``random_grouping``, ``greedy_grouping``) use the same evaluator,
so the comparison isolates the grouping method. ``GroupingResult.variants`` turns the groups into
``optimizer.fleet.Variant`` objects that ``plan`` can size.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import defaultdict
from typing import Literal

import networkx as nx
from networkx.algorithms.community import kernighan_lin_bisection
from networkx.algorithms.flow import edmonds_karp
from pydantic import BaseModel, ConfigDict, Field

from optimizer.fleet import Role, Variant
from optimizer.pd_flow import analyze, build_pd_graph
from optimizer.placement.cluster import Cluster, ModelDescription
from optimizer.placement.serving_groups import GroupModel, replica_profile
from optimizer.placement.throughput import LayerTimeSource

EXHAUSTIVE_ROLE_LIMIT = 12
MAX_ROUNDS = 200

Group = tuple[tuple[str, ...], Role]


class ServingGroup(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    accelerator: str
    machine: str
    role: Role
    gpus: list[str]
    prefill_rps: float
    decode_rps: float
    decode_batch: int
    memory_gb: float


class KVTransfer(BaseModel):
    model_config = ConfigDict(frozen=True)

    prefill: str
    decode: str
    requests_per_s: float
    share: float


class GroupingResult(BaseModel):
    """Groups, roles, the flow through them and what it implies for the rest of the product."""

    model_config = ConfigDict(frozen=True)

    method: str
    model: str
    groups: list[ServingGroup]
    idle_gpus: list[str] = Field(description="GPUs of types too small (in total) to hold the model.")
    max_flow_rps: float
    tokens_per_s: float = Field(description="max flow x (input + output tokens) of the mean request.")
    bottleneck: str
    min_cut: list[str]
    kv_schedule: list[KVTransfer]
    cost_per_hour: float
    ttft_s: float | None = Field(description="Prefill latency + KV transfer of the busiest P->D pair.")
    itl_s: float | None = Field(description="Decode step at the planned batch on the busiest decode group.")
    history: list[tuple[str, float]] = Field(default_factory=list, description="(step, max flow) as it improved.")
    variants: list[Variant] = Field(default_factory=list)
    status: Literal["complete", "time_limit"] = Field(
        default="complete", description="time_limit: the search was cut short; the grouping is the best found.")


def pd_max_flow(model: GroupModel, groups: list[Group]) -> float:
    """Max flow (requests/s) of source -> P -> D -> sink for these groups."""
    prefill = [g for g, r in groups if r == Role.PREFILL]
    decode = [g for g, r in groups if r == Role.DECODE]
    if not prefill or not decode:
        return 0.0
    graph = nx.DiGraph()
    for i, p in enumerate(prefill):
        graph.add_edge("s", ("p", i), capacity=model.rates(p).prefill_rps)
        for j, d in enumerate(decode):
            graph.add_edge(("p", i), ("d", j), capacity=model.kv_rps(p, d))
    for j, d in enumerate(decode):
        graph.add_edge(("d", j), "t", capacity=model.rates(d).decode_rps)
    return float(nx.maximum_flow_value(graph, "s", "t", flow_func=edmonds_karp))


def gpus_by_type(model: GroupModel) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for gid in sorted(model.gpus, key=lambda i: (model.gpus[i].node.index, model.gpus[i].slot)):
        out[model.gpus[gid].accelerator].append(gid)
    return dict(out)


def _group_count(model: GroupModel, ids: list[str]) -> tuple[int, int]:
    g = model.min_group_size([model.gpus[i] for i in ids])
    return (0, 0) if g is None else (len(ids) // g, g)


def _bandwidth_graph(model: GroupModel, ids: list[str]) -> nx.Graph:
    graph = nx.Graph()
    graph.add_nodes_from(ids)
    for a, b in itertools.combinations(ids, 2):
        ga, gb = model.gpus[a], model.gpus[b]
        bw = (ga.node.machine.intra_node.bytes_per_s if ga.node.index == gb.node.index
              else model.cluster.link(ga.node, gb.node).bytes_per_s)
        graph.add_edge(a, b, weight=bw / 1e9)
    return graph


def _chunks(order: list[str], count: int) -> list[list[str]]:
    base, extra = divmod(len(order), count)
    out, i = [], 0
    for c in range(count):
        size = base + (1 if c < extra else 0)
        out.append(order[i:i + size])
        i += size
    return out


def spectral_partition(model: GroupModel, seed: int = 0) -> tuple[list[tuple[str, ...]], list[str]]:
    """Groups per GPU type from the Fiedler ordering of the bandwidth graph; (groups, idle GPUs)."""
    groups, idle = [], []
    for ids in gpus_by_type(model).values():
        count, _ = _group_count(model, ids)
        if count == 0:
            idle += ids
            continue
        graph = _bandwidth_graph(model, ids)
        if len(ids) > 2 and count > 1:
            order = list(nx.spectral_ordering(graph, weight="weight", seed=seed, method="tracemin_lu"))
        else:
            order = list(ids)
        groups += [tuple(c) for c in _chunks(order, count)]
    return groups, idle


def kl_refine(model: GroupModel, groups: list[tuple[str, ...]], seed: int = 0,
              deadline: float = math.inf) -> list[tuple[str, ...]]:
    """Kernighan-Lin on every pair of same-type groups: keep GPUs joined by fast links together."""
    groups = list(groups)
    for i, j in itertools.combinations(range(len(groups)), 2):
        if time.monotonic() > deadline:
            break
        a, b = groups[i], groups[j]
        if model.gpus[a[0]].accelerator != model.gpus[b[0]].accelerator:
            continue
        graph = _bandwidth_graph(model, list(a) + list(b))
        left, right = kernighan_lin_bisection(graph, partition=(set(a), set(b)), weight="weight", seed=seed)
        if len(left) == len(a) and len(right) == len(b):
            groups[i], groups[j] = model.ordered(left), model.ordered(right)
    return groups


def best_roles(model: GroupModel, groups: list[tuple[str, ...]],
               deadline: float = math.inf) -> tuple[list[Group], float]:
    """Roles maximising the max flow: exhaustive for few groups, else greedy single flips (until `deadline`)."""
    n = len(groups)
    if n < 2:
        return [(g, Role.DECODE) for g in groups], 0.0
    best: tuple[list[Group], float] = ([], -1.0)
    if n <= EXHAUSTIVE_ROLE_LIMIT:
        for mask in range(1, 2 ** n - 1):
            if best[0] and time.monotonic() > deadline:
                break
            cand = [(g, Role.PREFILL if mask >> i & 1 else Role.DECODE) for i, g in enumerate(groups)]
            v = pd_max_flow(model, cand)
            if v > best[1] + 1e-12:
                best = (cand, v)
        return best
    cand = [(g, Role.PREFILL if i % 2 == 0 else Role.DECODE) for i, g in enumerate(groups)]
    value = pd_max_flow(model, cand)
    for _ in range(MAX_ROUNDS):
        improved = False
        for i in range(n):
            if time.monotonic() > deadline:
                return cand, value
            flipped = list(cand)
            flipped[i] = (cand[i][0], Role.DECODE if cand[i][1] == Role.PREFILL else Role.PREFILL)
            v = pd_max_flow(model, flipped)
            if v > value * (1 + 1e-12):
                cand, value, improved = flipped, v, True
        if not improved:
            break
    return cand, value


def _cut_groups(model: GroupModel, groups: list[Group]) -> set[int]:
    """Indices of groups with an edge on the minimum cut nearest the source."""
    graph = nx.DiGraph()
    for i, (g, r) in enumerate(groups):
        if r == Role.PREFILL:
            graph.add_edge("s", i, capacity=model.rates(g).prefill_rps)
            for j, (h, q) in enumerate(groups):
                if q == Role.DECODE:
                    graph.add_edge(i, j, capacity=model.kv_rps(g, h))
        else:
            graph.add_edge(i, "t", capacity=model.rates(g).decode_rps)
    if "s" not in graph or "t" not in graph:
        return set(range(len(groups)))
    _, (side, _) = nx.minimum_cut(graph, "s", "t", flow_func=edmonds_karp)
    out = set()
    for u, v in graph.edges:
        if u in side and v not in side:
            out |= {x for x in (u, v) if isinstance(x, int)}
    return out or set(range(len(groups)))


def _moves(model: GroupModel, groups: list[Group], focus: set[int]):
    """Neighbouring groupings: role flips, single-GPU moves and swaps between same-type groups."""
    order = sorted(range(len(groups)), key=lambda i: (i not in focus, i))
    for i in order:
        g, r = groups[i]
        flipped = list(groups)
        flipped[i] = (g, Role.DECODE if r == Role.PREFILL else Role.PREFILL)
        yield "flip", flipped
    for i in order:
        for j in range(len(groups)):
            (a, ra), (b, rb) = groups[i], groups[j]
            if i == j or model.gpus[a[0]].accelerator != model.gpus[b[0]].accelerator:
                continue
            need = model.min_group_size([model.gpus[x] for x in a + b]) or math.inf
            for x in a:
                if len(a) - 1 >= need:
                    moved = list(groups)
                    moved[i] = (model.ordered(set(a) - {x}), ra)
                    moved[j] = (model.ordered(set(b) | {x}), rb)
                    yield "move", moved
                if j > i:
                    for y in b:
                        swapped = list(groups)
                        swapped[i] = (model.ordered(set(a) - {x} | {y}), ra)
                        swapped[j] = (model.ordered(set(b) - {y} | {x}), rb)
                        yield "swap", swapped


def local_search(model: GroupModel, groups: list[Group], value: float, deadline: float,
                 history: list[tuple[str, float]]) -> tuple[list[Group], float]:
    """First-improvement search over flips, moves and swaps until no move improves."""
    for _ in range(MAX_ROUNDS):
        focus = _cut_groups(model, groups)
        for kind, cand in _moves(model, groups, focus):
            if time.monotonic() > deadline:
                return groups, value
            v = pd_max_flow(model, cand)
            if v > value * (1 + 1e-9):
                groups, value = cand, v
                history.append((kind, v))
                break
        else:
            break
    return groups, value


def _perturb(model: GroupModel, groups: list[Group], rng: random.Random, steps: int) -> list[Group]:
    for _ in range(steps):
        moves = list(_moves(model, groups, set()))
        if not moves:
            break
        groups = rng.choice(moves)[1]
    return groups


def spectral_kl_grouping(model: GroupModel, *, seed: int = 0, time_limit_s: float = 10.0,
                         restarts: int = 200) -> GroupingResult:
    """The HexGen-2-style method: spectral partition, KL refinement, roles, iterative moves.

    The move search stops in local optima (a role flip often pays only together with a swap),
    so it restarts from small random perturbations of the best grouping, up to `restarts` times.
    """
    deadline = time.monotonic() + time_limit_s
    rng = random.Random(seed)
    parts, idle = spectral_partition(model, seed)
    history: list[tuple[str, float]] = []
    groups, value = best_roles(model, parts, deadline)
    history.append(("spectral", value))
    refined, refined_value = best_roles(model, kl_refine(model, parts, seed, deadline), deadline)
    if refined_value >= value:
        groups, value = refined, refined_value
    history.append(("kernighan-lin", value))
    groups, value = local_search(model, groups, value, deadline, history)
    cut_short = time.monotonic() > deadline
    for _ in range(restarts):
        if time.monotonic() > deadline:
            break
        start = _perturb(model, groups, rng, steps=3)
        cand, v = local_search(model, start, pd_max_flow(model, start), deadline, [])
        if v > value * (1 + 1e-9):
            groups, value = cand, v
            history.append(("restart", v))
    result = describe(model, "spectral+KL", groups, idle, history)
    # Restarts run until the deadline by design; only a first descent cut short is a time-limit answer.
    return result.model_copy(update={"status": "time_limit"}) if cut_short else result


def random_grouping(model: GroupModel, seed: int) -> GroupingResult:
    """Baseline: per type, GPUs shuffled into the same number of groups; roles at random."""
    rng = random.Random(seed)
    groups, idle = [], []
    for ids in gpus_by_type(model).values():
        count, _ = _group_count(model, ids)
        if count == 0:
            idle += ids
            continue
        shuffled = list(ids)
        rng.shuffle(shuffled)
        groups += [model.ordered(c) for c in _chunks(shuffled, count)]
    roles = [rng.choice([Role.PREFILL, Role.DECODE]) for _ in groups]
    if len(groups) >= 2 and len(set(roles)) == 1:
        roles[rng.randrange(len(groups))] = Role.DECODE if roles[0] == Role.PREFILL else Role.PREFILL
    pairs = list(zip(groups, roles, strict=True))
    return describe(model, "random", pairs, idle, [("random", pd_max_flow(model, pairs))])


def greedy_grouping(model: GroupModel) -> GroupingResult:
    """Baseline: fastest GPUs first, in listing order, minimal groups; prefill to the fastest groups."""
    speed = {}
    for gid, gpu in model.gpus.items():
        times = model.times.get(gpu.node.machine.name)
        speed[gid] = 0.0 if times is None else 1.0 / max(times.decode_ms_per_layer(16), 1e-12)
    groups, idle = [], []
    for ids in sorted(gpus_by_type(model).values(), key=lambda ids: -speed[ids[0]]):
        count, size = _group_count(model, ids)
        if count == 0:
            idle += ids
            continue
        ordered = sorted(ids, key=lambda i: -speed[i])
        for c in range(count):
            chunk = ordered[c * size:(c + 1) * size] if c < count - 1 else ordered[c * size:]
            groups.append(model.ordered(chunk))
    groups.sort(key=lambda g: -model.rates(g).prefill_rps)
    roles = [Role.DECODE] * len(groups)
    for i in range(len(groups) - 1):
        p = sum(model.rates(g).prefill_rps for g, r in zip(groups, roles, strict=True) if r == Role.PREFILL)
        d = sum(model.rates(g).decode_rps for g, r in zip(groups, roles, strict=True) if r == Role.DECODE)
        if p >= d:
            break
        roles[i] = Role.PREFILL
    pairs = list(zip(groups, roles, strict=True))
    return describe(model, "greedy", pairs, idle, [("greedy", pd_max_flow(model, pairs))])


def describe(model: GroupModel, method: str, groups: list[Group], idle: list[str],
             history: list[tuple[str, float]]) -> GroupingResult:
    """Name the groups, analyse the flow (optimizer.pd_flow) and derive variants, cost and latency."""
    named: list[ServingGroup] = []
    counter: dict[str, int] = defaultdict(int)
    for ids, role in groups:
        gpu = model.gpus[ids[0]]
        tag = f"{role.value}-{gpu.accelerator}-{counter[(role, gpu.accelerator)]}"
        counter[(role, gpu.accelerator)] += 1
        rates = model.rates(ids)
        named.append(ServingGroup(
            name=tag, accelerator=gpu.accelerator, machine=gpu.node.machine.name, role=role, gpus=list(ids),
            prefill_rps=rates.prefill_rps, decode_rps=rates.decode_rps, decode_batch=rates.decode_batch,
            memory_gb=rates.memory_gb))
    prefill = {g.name: g.prefill_rps for g in named if g.role == Role.PREFILL}
    decode = {g.name: g.decode_rps for g in named if g.role == Role.DECODE}
    cost = sum(model.gpus[i].node.machine.cost_per_gpu_hour for g in named for i in g.gpus)
    tokens = model.input_tokens + model.output_tokens
    if not prefill or not decode:
        return GroupingResult(method=method, model=model.model.name, groups=named, idle_gpus=idle, max_flow_rps=0.0,
                              tokens_per_s=0.0, bottleneck="no prefill or no decode group", min_cut=[],
                              kv_schedule=[], cost_per_hour=cost, ttft_s=None, itl_s=None, history=history)
    by_name = {g.name: g for g in named}
    kv_bytes = model.kv_bytes_per_request
    links = {(p, d): min(model.kv_rps(tuple(by_name[p].gpus), tuple(by_name[d].gpus)), 1e18) * kv_bytes
             for p in prefill for d in decode}
    analysis = analyze(build_pd_graph(prefill, decode, links, kv_bytes))
    schedule = [KVTransfer(prefill=s.prefill, decode=s.decode, requests_per_s=s.flow, share=s.share)
                for s in analysis.kv_schedule]
    busiest = max(schedule, key=lambda s: s.requests_per_s, default=None)
    ttft = itl = None
    if busiest is not None and busiest.requests_per_s > 0:
        p, d = by_name[busiest.prefill], by_name[busiest.decode]
        ttft = model.rates(tuple(p.gpus)).prefill_latency_s + model.kv_transfer_s(tuple(p.gpus), tuple(d.gpus))
        itl = model.rates(tuple(d.gpus)).decode_step_s
    result = GroupingResult(
        method=method, model=model.model.name, groups=named, idle_gpus=idle, max_flow_rps=analysis.max_flow,
        tokens_per_s=analysis.max_flow * tokens, bottleneck=analysis.bottleneck,
        min_cut=[f"{e.u}->{e.v}" for e in analysis.min_cut], kv_schedule=schedule, cost_per_hour=cost,
        ttft_s=ttft, itl_s=itl, history=history)
    return result.model_copy(update={"variants": variants_for(model, named)})


def variants_for(model: GroupModel, groups: list[ServingGroup]) -> list[Variant]:
    """One variant per (GPU type, group size, role) with as many replicas as there are such groups."""
    patterns: dict[tuple[str, int, Role], list[ServingGroup]] = defaultdict(list)
    for g in groups:
        patterns[(g.accelerator, len(g.gpus), g.role)].append(g)
    out = []
    for (acc, size, role), members in sorted(patterns.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2].value)):
        machine = members[0].machine
        times: LayerTimeSource = model.times[machine]
        out.append(Variant(
            name=f"{model.model.name}-{acc}-x{size}-{role.value}".lower(), model=model.model.name, accelerator=acc,
            accelerators_per_replica=size, max_batch=max(1, min(g.decode_batch for g in members)), role=role,
            min_replicas=0, max_replicas=len(members), current_replicas=len(members),
            profile=replica_profile(times, model.model.num_layers / size)))
    return out


def grouping_model(cluster: Cluster, model: ModelDescription, times: dict[str, LayerTimeSource]) -> GroupModel:
    return GroupModel(cluster, model, times)
