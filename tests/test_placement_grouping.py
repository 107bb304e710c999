"""P/D grouping: a partition of the GPUs that fits memory, honest flows, refinements that never hurt."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from variant_autoscaler.commands.place import plan_fragment

from optimizer.fleet import Role, Variant
from optimizer.pd_flow import build_pd_graph, max_flow_value
from optimizer.placement.cluster import Cluster, ClusterSpec, load_cluster
from optimizer.placement.grouping import (
    _bandwidth_graph,
    best_roles,
    greedy_grouping,
    grouping_model,
    kl_refine,
    random_grouping,
    spectral_kl_grouping,
    spectral_partition,
)
from optimizer.placement.throughput import layer_time_sources
from optimizer.problem import Problem

CLUSTERS = Path(__file__).resolve().parents[1] / "examples" / "clusters"


def grouping_for(cluster: Cluster, model: str | None = None):
    m = cluster.model(model)
    return grouping_model(cluster, m, layer_time_sources(cluster, m))


def two_site_cluster() -> Cluster:
    """8 one-GPU nodes of one type on two sites with a slow link between them: topology matters."""
    prof = {"kind": "parametric", "decode_base_s": 0.004, "decode_per_seq_s": 3e-5, "prefill_base_s": 0.0,
            "prefill_per_token_s": 3e-5}
    spec = {
        "name": "two-site",
        "models": [{"name": "m", "num_layers": 40, "layer_weight_gb": 1.0, "kv_bytes_per_token_layer": 4096,
                    "activation_bytes_per_token": 8192}],
        "machine_types": [{"name": "g", "accelerator": "G24", "gpu_memory_gb": 24, "cost_per_hour": 1.0,
                           "nic": {"gb_s": 10}, "models": {"m": {"usable_memory_gb": 20, "layer_profile": prof}}}],
        "nodes": [{"type": "g", "count": 4, "region": "east", "prefix": "e"},
                  {"type": "g", "count": 4, "region": "west", "prefix": "w"}],
        "network": {"default": {"gb_s": 1}, "regions": [{"name": "east", "intra": {"gb_s": 10}},
                                                        {"name": "west", "intra": {"gb_s": 10}}],
                    "cross_region": {"gbps": 0.1, "latency_ms": 40}},
    }
    return Cluster(ClusterSpec.model_validate(spec))


CASES = [
    (load_cluster(CLUSTERS / "helix_small10.yaml"), None),
    (load_cluster(CLUSTERS / "helix_3region24.yaml"), "llama-30b"),
    (load_cluster(CLUSTERS / "helix_single24.yaml"), "llama-2-70b"),
    (two_site_cluster(), None),
]


@pytest.mark.parametrize("cluster,model", CASES, ids=lambda x: getattr(x, "name", str(x)))
def test_partition_covers_every_gpu_once_and_fits_memory(cluster, model):
    gm = grouping_for(cluster, model)
    result = spectral_kl_grouping(gm, time_limit_s=2)
    placed = [g for group in result.groups for g in group.gpus] + result.idle_gpus
    assert Counter(placed) == Counter(list(gm.gpus)), "every GPU exactly once (in a group or idle)"
    need = gm.model.total_weight_gb + (gm.input_tokens + gm.output_tokens) * gm.model.kv_bytes_per_token / 1e9
    for group in result.groups:
        assert len({gm.gpus[i].accelerator for i in group.gpus}) == 1, "one GPU type per group (one variant)"
        assert sum(gm.usable_gb(gm.gpus[i]) for i in group.gpus) >= need
        assert group.decode_batch >= 1
    for gid in result.idle_gpus:
        same = [i for i in gm.gpus if gm.gpus[i].accelerator == gm.gpus[gid].accelerator]
        assert sum(gm.usable_gb(gm.gpus[i]) for i in same) < need, "idle only when the whole type is too small"


@pytest.mark.parametrize("cluster,model", CASES, ids=lambda x: getattr(x, "name", str(x)))
def test_reported_flow_equals_an_independent_max_flow(cluster, model):
    gm = grouping_for(cluster, model)
    result = spectral_kl_grouping(gm, time_limit_s=2)
    prefill = {g.name: g.prefill_rps for g in result.groups if g.role == Role.PREFILL}
    decode = {g.name: g.decode_rps for g in result.groups if g.role == Role.DECODE}
    by = {g.name: g.gpus for g in result.groups}
    links = {(p, d): gm.kv_rps(by[p], by[d]) * gm.kv_bytes_per_request for p in prefill for d in decode}
    independent = max_flow_value(build_pd_graph(prefill, decode, links, gm.kv_bytes_per_request),
                                 algorithm="preflow_push")
    assert result.max_flow_rps == pytest.approx(independent, rel=1e-9)
    assert result.max_flow_rps > 0
    assert sum(s.share for s in result.kv_schedule) == pytest.approx(1.0)


@pytest.mark.parametrize("cluster,model", CASES, ids=lambda x: getattr(x, "name", str(x)))
def test_kl_refinement_never_lowers_flow_and_search_is_monotone(cluster, model):
    gm = grouping_for(cluster, model)
    parts, _ = spectral_partition(gm)
    refined = kl_refine(gm, parts)
    assert sorted(map(len, refined)) == sorted(map(len, parts)), "KL swaps keep group sizes"
    for before, after in ((parts, refined),):
        def cut(groups):
            graph = _bandwidth_graph(gm, [g for grp in groups for g in grp])
            where = {g: i for i, grp in enumerate(groups) for g in grp}
            return sum(d["weight"] for a, b, d in graph.edges(data=True) if where[a] != where[b])
        assert cut(after) <= cut(before) + 1e-9
    result = spectral_kl_grouping(gm, time_limit_s=2)
    values = [v for _, v in result.history]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False)), values
    assert result.max_flow_rps >= best_roles(gm, parts)[1] - 1e-12


def test_moves_beat_the_pure_bandwidth_partition_and_the_baselines_on_two_sites():
    """Spectral+KL alone keeps each site's GPUs together, so every KV cache crosses the slow link;
    the move search learns to pair P and D stages on the same site (KV >> activations)."""
    gm = grouping_for(two_site_cluster())
    ours = spectral_kl_grouping(gm, time_limit_s=3)
    parts, _ = spectral_partition(gm)
    assert all(len({gm.gpus[i].node.region for i in p}) == 1 for p in parts)
    assert ours.max_flow_rps > 2 * best_roles(gm, parts)[1]
    randoms = [random_grouping(gm, s).max_flow_rps for s in range(8)]
    assert ours.max_flow_rps > sum(randoms) / len(randoms)
    assert ours.max_flow_rps >= greedy_grouping(gm).max_flow_rps


def test_variants_are_plan_ready():
    cluster = load_cluster(CLUSTERS / "helix_3region24.yaml")
    gm = grouping_for(cluster, "llama-30b")
    result = spectral_kl_grouping(gm, time_limit_s=2)
    assert result.variants and all(isinstance(v, Variant) for v in result.variants)
    assert {v.role for v in result.variants} == {Role.PREFILL, Role.DECODE}
    assert sum(v.current_replicas for v in result.variants) == len(result.groups)
    fragment = plan_fragment(cluster, result)
    problem = Problem.model_validate({**fragment, "workloads": [], "slos": []})
    for v in problem.variants:
        assert v.profile.decode_step_s(v.max_batch) > v.profile.decode_step_s(1) > 0
        assert problem.accelerator(v.accelerator).available >= v.accelerators_per_replica * v.max_replicas
