"""Operator settings: defaults like HPA, clear errors naming the field, last good settings kept."""

from __future__ import annotations

import re

import pytest
import yaml
from variant_autoscaler.settings import (
    AcceleratorSettings,
    OperatorSettings,
    SettingsSource,
    SettingsStore,
    architecture_of,
    inventory_from_nodes,
    load_settings_file,
    settings_from_configmap,
)

from optimizer.problem import InputError


def configmap(text: str | None, name="va-settings", namespace="va-system") -> dict:
    return {"metadata": {"name": name, "namespace": namespace}, "data": {} if text is None else {"settings.yaml": text}}


GOOD = """
interval_s: 10
actuation_mode: metrics
scale_down_window_s: 60
max_change_per_cycle: 4
watched_namespaces: [team-a, team-b]
prometheus: {url: "https://prom.example:9090", bearer_token_file: /var/run/token, verify_tls: false, timeout_s: 3}
accelerators:
  - {name: H100, cost_per_hour: 4.5, available: 16}
  - {name: MI300X, cost_per_hour: 3.9, memory_gb: 192, product_labels: [AMD-Instinct-MI300X]}
models:
  - {name: meta-llama/Llama-3.1-8B-Instruct, slo: {ttft_s: 0.5, itl_s: 0.05}}
  - {name: custom/tiny, weight_gb: 2, kv_bytes_per_token: 65536, priority: 2}
default_slo: {ttft_s: 1.0, itl_s: 0.1, percentile: 95}
change_penalty: 0.5
kv_transfer_gb_s: 50
staleness_threshold_s: 45
"""


def test_defaults_follow_the_hpa_and_the_brief():
    s = OperatorSettings()
    assert (s.interval_s, s.scale_up_window_s, s.scale_down_window_s) == (30.0, 0.0, 60.0)
    assert s.actuation_mode == "direct"
    assert s.watched_namespaces == []


def test_a_full_configmap_is_read_with_every_field(tmp_path):
    s = settings_from_configmap(configmap(GOOD))
    assert s.interval_s == 10 and s.actuation_mode == "metrics" and s.max_change_per_cycle == 4
    assert s.prometheus.verify_tls is False and str(s.prometheus.bearer_token_file) == "/var/run/token"
    assert s.accelerator("H100").to_accelerator().memory_gb == 80
    assert s.accelerator("MI300X").to_accelerator(available=8).available == 8
    assert s.accelerator("H100").to_accelerator(available=8).available == 16  # explicit wins over discovery
    spec = s.model_spec("meta-llama/Llama-3.1-8B-Instruct")
    assert spec.name == "meta-llama/Llama-3.1-8B-Instruct" and 14 < spec.weight_gb < 18
    assert s.model_spec("custom/tiny").kv_bytes_per_token == 65536
    assert s.model_spec("unknown/model") is None
    path = tmp_path / "settings.yaml"
    path.write_text(GOOD)
    assert load_settings_file(path) == s


@pytest.mark.parametrize("text, field, words", [
    ("interval_s: -1", "interval_s", "greater than 0"),
    ("actuation_mode: sometimes", "actuation_mode", "direct"),
    ("accelerators: [{name: X9, cost_per_hour: 1}]", "accelerators[0]", "memory_gb is required"),
    ("models: [{name: m}]", "models[0]", "architecture"),
    ("prometheus: {url: prom:9090}", "prometheus", "http://"),
    ("watched_namespaces: [Bad_NS]", "", "not a valid namespace"),
    ("unknown_knob: 1", "unknown_knob", "Extra inputs"),
    ("[1, 2]", "", "mapping"),
    ("interval_s: [", "", "not valid YAML"),
])
def test_invalid_settings_name_the_field_and_the_reason(text, field, words):
    with pytest.raises(InputError) as info:
        settings_from_configmap(configmap(text))
    assert info.value.source == "configmap va-system/va-settings key settings.yaml"
    assert info.value.field == field
    assert words in info.value.reason


def test_an_invalid_update_keeps_the_last_good_settings():
    store = SettingsStore()
    assert store.update_from_configmap(configmap(GOOD)) is None
    good = store.current
    error = store.update_from_configmap(configmap("interval_s: 0"))
    assert "interval_s" in error and store.last_error == error
    assert store.current is good
    assert store.update_from_configmap(configmap(yaml.safe_dump({"interval_s": 5}))) is None
    assert store.current.interval_s == 5 and store.last_error is None


@pytest.mark.parametrize("data, words", [({"config.yaml": GOOD}, "missing (it has ['config.yaml'])"),
                                         ({}, "missing (it has no data)"), ({"settings.yaml": "  \n"}, "empty")])
def test_a_renamed_key_or_an_empty_value_is_an_error_not_defaults(data, words):
    with pytest.raises(InputError, match=re.escape(words)):
        settings_from_configmap({"metadata": {"name": "s", "namespace": "ns"}, "data": data})
    assert settings_from_configmap(configmap("{}")) == OperatorSettings()  # all defaults, said explicitly


def test_the_source_comes_from_arguments_then_environment():
    env = {"VARIANT_AUTOSCALER_SETTINGS_CONFIGMAP": "from-env", "POD_NAMESPACE": "va-system"}
    src = SettingsSource.from_env(environ=env)
    assert (src.file, src.configmap, src.namespace) == (None, "from-env", "va-system")
    assert SettingsSource.from_env(configmap="cli", namespace="x", environ=env).configmap == "cli"


def test_model_ids_map_to_known_architectures():
    assert architecture_of("meta-llama/Llama-3.1-70B-Instruct").name == "Llama-3.1-70B"
    assert architecture_of("meta-llama/llama-3.1-8b").name == "Llama-3.1-8B"
    assert architecture_of("mistral/whatever") is None


def test_inventory_is_discovered_from_node_labels_and_allocatable():
    accs = [AcceleratorSettings(name="H100", cost_per_hour=1), AcceleratorSettings(name="L4", cost_per_hour=1),
            AcceleratorSettings(name="MI300X", cost_per_hour=1, memory_gb=192, product_labels=["AMD-MI300X"])]

    def node(product, gpus, unschedulable=False):
        return {"metadata": {"labels": {"nvidia.com/gpu.product": product} if product else {}},
                "spec": {"unschedulable": unschedulable}, "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}}}

    nodes = [node("NVIDIA-H100-80GB-HBM3", 8), node("NVIDIA-H100-80GB-HBM3", 8), node("NVIDIA-L4", 4),
             node("NVIDIA-L4", 4, unschedulable=True), node("AMD-MI300X", 8), node("Tesla-T4", 2), node(None, 0)]
    assert inventory_from_nodes(nodes, accs) == {"H100": 16, "L4": 4, "MI300X": 8}
