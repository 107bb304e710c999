"""Layer placement: Helix's throughput model and graph reproduced, placements complete, flows honest."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import networkx as nx
import pytest
from networkx.algorithms.flow import preflow_push

from optimizer.placement.bounds import layer_capacity_bound
from optimizer.placement.cluster import Cluster, ClusterSpec, load_cluster
from optimizer.placement.flow_graph import (
    SINK,
    SOURCE,
    LayerPlacement,
    NodeRange,
    build_layer_graph,
    max_flow_value,
)
from optimizer.placement.layers import place_layers
from optimizer.placement.throughput import NodeThroughputModel, layer_time_sources

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CLUSTERS = ROOT / "examples" / "clusters"
HELIX_PROFILES = SHARED / "data" / "profiles" / "helix"
HELIX_GRAPH = SHARED / "data" / "maxflow" / "helix_single24_llama70b.json"
HELIX_MAX_FLOW = 1289.5557702751464


def needs_shared(path: Path):
    if not path.exists():
        pytest.skip(f"../shared not present: {path} is needed for this comparison with Helix")


def model_with(cluster_file: str, profiles: Path | None = None, model: str | None = None):
    cluster = load_cluster(CLUSTERS / cluster_file)
    m = cluster.model(model)
    return cluster, m, NodeThroughputModel(cluster, m, layer_time_sources(cluster, m, profiles))


def recover_helix_placement(graph: dict, throughput: NodeThroughputModel):
    """Helix node id -> (machine, layers, start), read off its published graph."""
    caps = {(e["u"], e["v"]): e["capacity"] for e in graph["edges"]}
    ids = sorted({u.split("_")[0] for u, _ in caps if u.endswith("_start")}, key=int)
    kind = {}
    for i in ids:
        cap = caps[(f"{i}_start", f"{i}_end")]
        best = min(((abs(row[k] / cap - 1), machine, k) for machine, row in throughput.table.items()
                    for k in range(1, len(row))), key=lambda t: t[0])
        kind[i] = best
    start = {i: 0 for i in ids if ("0_out", f"{i}_in") in caps}
    for _ in range(len(ids)):
        for (u, v) in caps:
            if u.endswith("_out") and v.endswith("_in") and u != "0_out" and v != "1_in":
                a, b = u.split("_")[0], v.split("_")[0]
                if a in start:
                    expected = start[a] + kind[a][2]
                    assert start.setdefault(b, expected) == expected, f"node {b}: two different starts"
    return ids, kind, start, caps


def test_node_throughputs_reproduce_helix_graph_capacities():
    needs_shared(HELIX_GRAPH)
    _, _, tm = model_with("helix_single24.yaml", HELIX_PROFILES)
    graph = json.loads(HELIX_GRAPH.read_text())
    _, kind, _, _ = recover_helix_placement(graph, tm)
    worst = max(err for err, _, _ in kind.values())
    assert worst < 1e-4, f"a reconstructed node throughput is {worst:.2%} off Helix's"
    counts = {}
    for _, machine, _ in kind.values():
        counts[machine] = counts.get(machine, 0) + 1
    assert counts == {"A100": 4, "L4": 8, "T4": 12}


def test_our_graph_of_helix_placement_matches_helix_graph_and_max_flow():
    needs_shared(HELIX_GRAPH)
    cluster, model, tm = model_with("helix_single24.yaml", HELIX_PROFILES)
    graph = json.loads(HELIX_GRAPH.read_text())
    ids, kind, start, caps = recover_helix_placement(graph, tm)
    assert set(start) == set(ids), "every Helix node gets a start layer from its links"
    pools = {m: [n.name for n in cluster.nodes if n.machine.name == m] for m in ("A100", "L4", "T4")}
    name = {i: pools[kind[i][1]].pop(0) for i in ids}
    placement = LayerPlacement(model=model.name, num_layers=model.num_layers, ranges=[
        NodeRange(node=name[i], start=start[i], layers=kind[i][2]) for i in ids])
    assert not placement.uncovered_layers()
    ours = build_layer_graph(cluster, model, placement, tm)
    rename = {f"{i}_{part}": f"{name[i]}.{part}" for i in ids for part in ("in", "start", "end", "out")}
    rename.update({"0_out": "coordinator.out", "1_in": "coordinator.in", "source": SOURCE, "sink": SINK})
    theirs = {(rename[u], rename[v]): c for (u, v), c in caps.items()}
    assert set(theirs) == set(ours.edges), "same nodes and links as Helix's graph"
    for (u, v), cap in theirs.items():
        assert ours.edges[u, v]["capacity"] == pytest.approx(cap, rel=1e-4), (u, v)
    assert max_flow_value(ours) == pytest.approx(HELIX_MAX_FLOW, rel=1e-4)


def test_stage_chain_reaches_helix_proven_optimum_on_its_10_node_cluster():
    needs_shared(HELIX_PROFILES)
    cluster, model, tm = model_with("helix_small10.yaml", HELIX_PROFILES)
    result = place_layers(cluster, model, tm, time_limit_s=5, use_milp=False)
    assert result.max_flow == pytest.approx(286.587, abs=0.01)


def test_single_cluster_beats_helix_milp_and_meets_the_bound():
    needs_shared(HELIX_PROFILES)
    cluster, model, tm = model_with("helix_single24.yaml", HELIX_PROFILES)
    result = place_layers(cluster, model, tm, time_limit_s=10, use_milp=False)
    assert result.max_flow > 1289.56
    assert result.max_flow == pytest.approx(result.bound.capacity_bound, rel=1e-6), "proven optimal"


@pytest.mark.parametrize("cluster_file,model", [("helix_small10.yaml", None), ("helix_3region24.yaml", "llama-2-70b")])
def test_placement_is_contiguous_complete_within_memory_and_flow_is_honest(cluster_file, model):
    cluster, m, tm = model_with(cluster_file, model=model)
    result = place_layers(cluster, m, tm, time_limit_s=3, use_milp=False)
    p = result.placement
    assert p.uncovered_layers() == []
    names = [r.node for r in p.ranges]
    assert len(names) == len(set(names)) and set(names) <= {n.name for n in cluster.nodes}
    for r in p.ranges:
        assert 0 <= r.start < r.end <= m.num_layers
        assert r.layers <= tm.max_layers(cluster.node(r.node).machine.name)
    rebuilt = nx.DiGraph()
    for e in result.flow.edges:
        rebuilt.add_edge(e["u"], e["v"], capacity=e["capacity"])
    independent = nx.maximum_flow_value(rebuilt, SOURCE, SINK, flow_func=preflow_push)
    assert result.max_flow == pytest.approx(independent, rel=1e-9)
    fresh = build_layer_graph(cluster, m, p, tm)
    assert max_flow_value(fresh) == pytest.approx(result.max_flow, rel=1e-9)
    assert 0 < result.max_flow <= result.bound.upper_bound * (1 + 1e-9)


def _tiny_cluster() -> Cluster:
    fast = {"kind": "parametric", "decode_base_s": 0.002, "decode_per_seq_s": 2e-5,
            "prefill_base_s": 0.0, "prefill_per_token_s": 1e-5}
    slow = {**fast, "decode_base_s": 0.007, "decode_per_seq_s": 6e-5, "prefill_per_token_s": 6e-5}
    spec = {
        "name": "tiny",
        "models": [{"name": "m", "num_layers": 5, "layer_weight_gb": 2.0, "kv_bytes_per_token_layer": 4096,
                    "activation_bytes_per_token": 8192}],
        "machine_types": [
            {"name": "big", "accelerator": "A", "gpu_memory_gb": 16, "nic": {"gb_s": 10},
             "models": {"m": {"max_layers": 3, "usable_memory_gb": 14, "layer_profile": fast}}},
            {"name": "small", "accelerator": "B", "gpu_memory_gb": 12, "nic": {"gb_s": 10},
             "models": {"m": {"max_layers": 3, "usable_memory_gb": 10, "layer_profile": slow}}},
        ],
        "nodes": [{"type": "big", "count": 1}, {"type": "small", "count": 2}],
        "network": {"default": {"gb_s": 1}},
    }
    return Cluster(ClusterSpec.model_validate(spec))


def _brute_force(cluster, model, tm, partial: bool) -> float:
    options = [None] + [(s, k) for k in range(1, 4) for s in range(0, model.num_layers - k + 1)]
    best = 0.0
    for combo in itertools.product(options, repeat=len(cluster.nodes)):
        ranges = [NodeRange(node=n.name, start=o[0], layers=o[1]) for n, o in zip(cluster.nodes, combo, strict=True)
                  if o is not None and o[1] <= tm.max_layers(n.machine.name)]
        if not ranges:
            continue
        p = LayerPlacement(model=model.name, num_layers=model.num_layers, ranges=ranges)
        best = max(best, max_flow_value(build_layer_graph(cluster, model, p, tm, partial=partial)))
    return best


def test_tiny_cluster_placement_is_optimal_and_bound_holds_for_both_link_rules():
    cluster = _tiny_cluster()
    model = cluster.model()
    tm = NodeThroughputModel(cluster, model, layer_time_sources(cluster, model))
    exact_opt = _brute_force(cluster, model, tm, partial=False)
    partial_opt = _brute_force(cluster, model, tm, partial=True)
    bound = layer_capacity_bound(tm, cluster.counts_by_type(), model.num_layers)
    assert exact_opt > 0 and partial_opt >= exact_opt
    assert bound >= partial_opt * (1 - 1e-9)
    result = place_layers(cluster, model, tm, time_limit_s=20)
    assert result.max_flow == pytest.approx(exact_opt, rel=2e-3)
    assert result.bound.upper_bound >= exact_opt * (1 - 1e-9)
