"""The cluster description: node expansion, link resolution and units."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from optimizer.placement.cluster import ClusterSpec, load_cluster

CLUSTERS = Path(__file__).resolve().parents[1] / "examples" / "clusters"


def test_reference_clusters_have_the_published_node_counts():
    counts = {p.stem: load_cluster(p).counts_by_type() for p in CLUSTERS.glob("helix_*.yaml")}
    assert counts["helix_single24"] == {"A100": 4, "L4": 8, "T4": 12}
    assert counts["helix_3region24"] == {"A100": 4, "L4": 8, "T4": 12}
    assert counts["helix_hetero42"] == {"A100": 4, "V100": 6, "L4": 8, "L4x2": 4, "T4": 10, "T4x2": 6, "T4x4": 4}
    assert counts["helix_small10"] == {"L4": 4, "T4": 6}


def test_links_resolve_region_cross_region_and_explicit_overrides():
    c = load_cluster(CLUSTERS / "helix_3region24.yaml")
    a100, l4_r2, t4_r2, l4_r3 = (c.node(n) for n in ("r1-a100-0", "r2-l4-0", "r2-t4-3", "r3-l4-0"))
    assert c.link(l4_r2, t4_r2).bytes_per_s == pytest.approx(1.25e9)
    assert c.link(a100, l4_r3).bytes_per_s == pytest.approx(12.5e6)
    assert c.link(a100, l4_r3).latency_s == pytest.approx(0.05)
    spec = c.spec.model_dump()
    spec["network"]["links"] = [{"a": "region-1", "b": "region-3", "bandwidth": {"gbps": 80}},
                                {"a": "r2-l4-0", "b": "r2-t4-3", "bandwidth": {"gb_s": 3}}]
    c2 = load_cluster_from(spec)
    assert c2.link(c2.node("r3-l4-0"), c2.node("r1-a100-0")).bytes_per_s == pytest.approx(10e9)
    assert c2.link(c2.node("r2-t4-3"), c2.node("r2-l4-0")).bytes_per_s == pytest.approx(3e9)
    assert c2.link(c2.node("r2-t4-3"), c2.node("r2-t4-4")).bytes_per_s == pytest.approx(1.25e9)


def load_cluster_from(spec: dict):
    from optimizer.placement.cluster import Cluster

    return Cluster(ClusterSpec.model_validate(spec))


def test_unknown_references_are_rejected_with_their_field():
    spec = load_cluster(CLUSTERS / "helix_small10.yaml").spec.model_dump()
    spec["nodes"][0]["region"] = "mars"
    with pytest.raises(ValidationError, match=r"nodes\[0\]\.region: unknown region 'mars'"):
        ClusterSpec.model_validate(spec)
    spec = load_cluster(CLUSTERS / "helix_small10.yaml").spec.model_dump()
    spec["machine_types"][0]["models"]["llama-7b"] = {}
    with pytest.raises(ValidationError, match=r"unknown model\(s\) \['llama-7b'\]"):
        ClusterSpec.model_validate(spec)
