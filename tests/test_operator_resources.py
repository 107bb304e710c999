"""Parsing VariantAutoscalings, including llm-d WVA manifests, into what the control loop uses."""

from __future__ import annotations

import pytest
from variant_autoscaler.cli import main
from variant_autoscaler.resources import InvalidResource, parse_variant, profile_from_document, wva_slo_class

from optimizer.fleet import Role


def va(**spec) -> dict:
    return {"apiVersion": "autoscaling.variant-autoscaler.io/v1alpha1", "kind": "VariantAutoscaling",
            "metadata": {"name": "v", "namespace": "ns", "uid": "u-1", "generation": 3},
            "spec": {"scaleTargetRef": {"name": "dep"}, "modelID": "meta/llama-3.1-8b", **spec}}


def test_defaults_and_identity():
    p = parse_variant(va())
    assert (p.key, p.generation, p.ref.uid) == ("ns/v", 3, "u-1")
    assert (p.target.kind, p.target.name, p.min_replicas, p.max_replicas) == ("Deployment", "dep", 1, None)
    assert p.role is Role.BOTH and p.accelerator is None and p.profile is None


def test_wva_variant_profile_in_milliseconds_becomes_seconds():
    p = parse_variant(va(accelerator="A100", variantProfile={
        "maxBatchSize": 256, "perfParms": {"decodeParms": {"alpha": "20.58", "beta": "0.41"},
                                           "prefillParms": {"gamma": "5.2", "delta": "0.1"}}}))
    assert p.max_batch == 256
    assert p.profile.decode_base_s == pytest.approx(0.02058)
    assert p.profile.decode_per_seq_s == pytest.approx(0.00041)
    assert p.profile.prefill_per_token_s == pytest.approx(0.0001)


def test_wva_model_profile_picks_the_entry_of_the_accelerator():
    accs = [{"acc": "A100", "accCount": 1, "maxBatchSize": 64,
             "perfParms": {"decodeParms": {"alpha": "10", "beta": "1"}, "prefillParms": {"gamma": "1", "delta": "0.2"}}},
            {"acc": "H100", "accCount": 2, "maxBatchSize": 128,
             "perfParms": {"decodeParms": {"alpha": "5", "beta": "0.5"}, "prefillParms": {"gamma": "1", "delta": "0.1"}}}]
    p = parse_variant(va(acceleratorType="H100", modelProfile={"accelerators": accs}))
    assert (p.accelerator, p.accelerator_count, p.max_batch) == ("H100", 2, 128)
    assert p.profile.decode_base_s == pytest.approx(0.005)
    with pytest.raises(InvalidResource, match="set spec.accelerator"):
        parse_variant(va(modelProfile={"accelerators": accs}))


def test_inline_profiles_in_crd_and_optimizer_forms_agree():
    camel = profile_from_document({"parametric": {"decodeBaseSeconds": 0.01, "prefillPerTokenSeconds": 1e-4}}, "p")
    snake = profile_from_document({"kind": "parametric", "decode_base_s": 0.01, "prefill_per_token_s": 1e-4}, "p")
    assert camel == snake
    tab = profile_from_document({"tabulated": {"decodePoints": [{"batch": 1, "timeSeconds": 0.01},
                                                                 {"batch": 8, "timeSeconds": 0.02}],
                                               "prefillPoints": [{"tokens": 100, "timeSeconds": 0.01},
                                                                 {"tokens": 1000, "timeSeconds": 0.08}]}}, "p")
    assert tab.decode_step_s(8) == pytest.approx(0.02)


@pytest.mark.parametrize("spec, field", [
    ({"modelID": ""}, "spec.modelID"),
    ({"scaleTargetRef": {}}, "spec.scaleTargetRef.name"),
    ({"minReplicas": 3, "maxReplicas": 2}, "spec.minReplicas"),
    ({"accelerator": "A100", "acceleratorType": "H100"}, "spec.acceleratorType"),
    ({"variantCost": "cheap"}, "spec.variantCost"),
    ({"role": "router"}, "spec.role"),
    ({"profile": {"parametric": {"decodeBaseSeconds": -1, "prefillPerTokenSeconds": 1}}}, "spec.profile"),
    ({"slo": {"ttftSeconds": 0, "itlSeconds": 0.1}}, "spec.slo.ttft_s"),
    ({"behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 0}]}}},
     "spec.behavior.scaleUp.policies[0].periodSeconds"),
    ({"behavior": {"scaleDown": {"stabilizationWindowSeconds": -1}}}, "spec.behavior.scaleDown.stabilizationWindowSeconds"),
    ({"behavior": {"scaleDown": {"window": 5}}}, "spec.behavior.scaleDown.window"),
    ({"behavior": [1]}, "spec.behavior"),
])
def test_invalid_specs_name_the_field(spec, field):
    with pytest.raises(InvalidResource) as info:
        parse_variant(va(**spec))
    assert info.value.field.startswith(field)


def test_wva_service_class_configmap_entry():
    text = "name: Premium\npriority: 1\ndata:\n  - model: meta/llama-3.1-8b\n    slo-tpot: 24\n    slo-ttft: 500\n"
    slo = wva_slo_class(text, "meta/llama-3.1-8b", "spec.sloClassRef")
    assert (slo.ttft_s, slo.itl_s) == (0.5, 0.024)
    with pytest.raises(InvalidResource, match="no entry for model"):
        wva_slo_class(text, "other/model", "spec.sloClassRef")


def test_run_with_a_bad_settings_file_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "settings.yaml"
    bad.write_text("interval_s: -1\n")
    assert main(["run", "--settings", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}: interval_s: Input should be greater than 0"


def test_pod_index_matches_the_pods_a_scan_of_every_pod_matches():
    """`PodIndex.matching` (read_targets' label index) gives the very pods, in order, that `selector_matches`
    over every pod gives, for matchLabels, matchExpressions, empty, absent and malformed selectors."""
    from variant_autoscaler.actuator import PodIndex, selector_matches

    def pod(name, **labels):
        return {"metadata": {"name": name, "labels": labels}}

    pods = [pod("a1", app="a", tier="gpu"), pod("b1", app="b"), pod("a2", app="a"), pod("x"),
            {"metadata": {"name": "nolabels"}}, {"metadata": {"name": "odd", "labels": {"app": ["a"]}}},
            pod("c1", app="c", tier="gpu"), pod("a3", app="a", tier="cpu")]
    selectors = [
        {"matchLabels": {"app": "a"}}, {"matchLabels": {"app": "a", "tier": "gpu"}}, {"matchLabels": {"app": "zz"}},
        {"matchLabels": {"tier": "gpu"}, "matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["c"]}]},
        {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a", "b"]}]},
        {"matchLabels": {"app": ["a"]}}, {"matchLabels": {}}, {}, None,
    ]
    index = PodIndex(pods)
    for sel in selectors:
        scan = [p for p in pods if selector_matches(sel, (p.get("metadata") or {}).get("labels") or {})]
        assert index.matching(sel) == scan, sel
    assert [p["metadata"]["name"] for p in index.matching({"matchLabels": {"app": "a"}})] == ["a1", "a2", "a3"]
    assert [p["metadata"]["name"] for p in index.matching({"matchLabels": {"app": ["a"]}})] == ["odd"]
    assert PodIndex([]).matching({"matchLabels": {"app": "a"}}) == []
