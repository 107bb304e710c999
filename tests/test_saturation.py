"""The llm-d router's saturation contract, computed from the capacity model (variant_autoscaler.saturation)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from variant_autoscaler.exporter import DecisionSnapshot, Exporter
from variant_autoscaler.resources import INFERENCE_POOL_ANNOTATION, InvalidResource, parse_variant
from variant_autoscaler.saturation import PoolSaturation, StageLoad, pool_saturation


def load(role: str, used: float, ready: int, *, pool: str = "chat", fresh: bool = True, ns: str = "serving"):
    return StageLoad(namespace=ns, pool=pool, model="m", role=role, used_replicas=used, ready_replicas=ready,
                     fresh=fresh)


def by_stage(rows: list[PoolSaturation], pool: str = "chat") -> dict[str, float]:
    return {r.stage: r.saturation for r in rows if r.pool == pool}


def test_aggregated_pool_is_demand_over_ready_capacity_on_every_stage():
    rows = pool_saturation([load("both", 1.5, 2), load("both", 0.9, 1)])
    assert by_stage(rows) == {"prefill": pytest.approx(0.8), "decode": pytest.approx(0.8),
                              "effective": pytest.approx(0.8)}


def test_disaggregated_pool_reports_each_stage_and_the_bottleneck_as_effective():
    rows = pool_saturation([load("prefill", 1.8, 2), load("decode", 1.2, 3)])
    assert by_stage(rows) == {"prefill": pytest.approx(0.9), "decode": pytest.approx(0.4),
                              "effective": pytest.approx(0.9)}


def test_demand_without_ready_replicas_stops_dispatch_and_stale_metrics_fail_closed():
    assert by_stage(pool_saturation([load("both", 2.5, 0)])) == {"prefill": 2.5, "decode": 2.5, "effective": 2.5}
    assert by_stage(pool_saturation([load("both", 0.2, 0)]))["effective"] == 1.0
    assert by_stage(pool_saturation([load("both", 0.0, 0)]))["effective"] == 0.0
    stale = pool_saturation([load("both", 0.1, 4, fresh=False), load("both", 0.1, 4)])
    assert by_stage(stale) == {"prefill": 1.0, "decode": 1.0, "effective": 1.0}


def test_pools_and_namespaces_are_kept_apart():
    rows = pool_saturation([load("both", 1.0, 4, pool="a"), load("both", 3.0, 3, pool="b"),
                            load("both", 2.0, 2, pool="a", ns="other")])
    assert by_stage(rows, "a") != {} and by_stage(rows, "b")["effective"] == pytest.approx(1.0)
    keys = {(r.namespace, r.pool) for r in rows}
    assert keys == {("serving", "a"), ("serving", "b"), ("other", "a")}


@given(st.lists(st.tuples(st.sampled_from(["prefill", "decode", "both"]), st.floats(0, 50), st.integers(0, 20)),
                min_size=1, max_size=8))
def test_effective_is_the_busiest_stage_and_never_negative(members):
    rows = by_stage(pool_saturation([load(r, u, n) for r, u, n in members]))
    assert all(v >= 0 for v in rows.values())
    assert rows["effective"] == max(v for k, v in rows.items() if k != "effective")
    doubled = by_stage(pool_saturation([load(r, 2 * u, n) for r, u, n in members]))
    assert doubled["effective"] >= rows["effective"]


def test_exported_with_inference_pool_labels():
    exporter = Exporter()
    exporter.publish(DecisionSnapshot(pools=pool_saturation([load("prefill", 1.8, 2), load("decode", 1.2, 3)])))
    text = exporter.render().decode()
    assert 'variant_autoscaler_pool_saturation{inference_pool="chat",namespace="serving",stage="prefill"} 0.9' in text
    assert 'variant_autoscaler_pool_saturation{inference_pool="chat",namespace="serving",stage="effective"} 0.9' in text


def _va(annotations: dict) -> dict:
    return {"apiVersion": "autoscaling.variant-autoscaler.io/v1alpha1", "kind": "VariantAutoscaling",
            "metadata": {"name": "chat-l4", "namespace": "serving", "annotations": annotations},
            "spec": {"scaleTargetRef": {"name": "chat-l4"}, "modelID": "m", "accelerator": "L4"}}


def test_pool_name_comes_from_the_annotation_and_is_bounded():
    assert parse_variant(_va({INFERENCE_POOL_ANNOTATION: "chat-pool"})).inference_pool == "chat-pool"
    assert parse_variant(_va({})).inference_pool is None
    with pytest.raises(InvalidResource, match="253 characters"):
        parse_variant(_va({INFERENCE_POOL_ANNOTATION: "x" * 300}))
