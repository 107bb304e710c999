"""The exporter serves every documented metric over HTTP in the plain text format, from one snapshot."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from variant_autoscaler.exporter import (
    METRIC_NAMES,
    AcceleratorUse,
    DecisionSnapshot,
    Exporter,
    MetricsServer,
    ModelReading,
    RoutingWeight,
    VariantReading,
)


def _snapshot(*variants: VariantReading) -> DecisionSnapshot:
    return DecisionSnapshot(
        variants=list(variants),
        models=[ModelReading(model="llama", arrival_rate_rps=12.5, normalized_load=0.8, unmet_demand_rps=1.5)],
        routing=[RoutingWeight(model="llama", bucket="128x256", namespace="ns", variant=v.name, weight=0.5)
                 for v in variants],
        accelerators=[AcceleratorUse(accelerator="H100", in_use=6, available=8),
                      AcceleratorUse(accelerator="L4", in_use=2, available=None)],
        cost_per_hour=42.0,
    )


def _variant(name: str, desired: int, current: int, **kw) -> VariantReading:
    return VariantReading(namespace="ns", name=name, model="llama", accelerator="H100", role="both",
                          current_replicas=current, ready_replicas=current, desired_replicas=desired,
                          normalized_load=0.7, capacity_per_replica_rps=3.0, **kw)


async def _scrape(url: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], await resp.text()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _families(text: str) -> set[str]:
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name + ("_total" if fam.type == "counter" else ""))
    return names


def test_scrape_serves_every_documented_metric_in_plain_text():
    async def scenario():
        exporter = Exporter()
        exporter.publish(_snapshot(_variant("a", 3, 2), _variant("b", 0, 0)), at=1000.0)
        exporter.optimizer_duration.observe(0.2)
        exporter.cycle_duration.observe(0.4)
        exporter.count_error("PrometheusUnreachable")
        exporter.count_scaling("ns", "a", "up")
        exporter.set_active(True)
        server = await MetricsServer(exporter).start()
        try:
            return await _scrape(server.url)
        finally:
            await server.stop()

    content_type, text = asyncio.run(scenario())
    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type
    assert set(METRIC_NAMES) <= _families(text), set(METRIC_NAMES) - _families(text)
    s = _samples(text)
    wva = (("accelerator_type", "H100"), ("namespace", "ns"), ("variant_name", "a"))
    assert s[("wva_desired_replicas", wva)] == 3
    assert s[("wva_current_replicas", wva)] == 2
    assert s[("wva_desired_ratio", wva)] == 1.5
    zero = (("accelerator_type", "H100"), ("namespace", "ns"), ("variant_name", "b"))
    assert s[("wva_desired_ratio", zero)] == 0.0
    assert s[("variant_autoscaler_last_successful_cycle_timestamp_seconds", ())] == 1000.0
    assert s[("variant_autoscaler_cycle_errors_total", (("reason", "PrometheusUnreachable"),))] == 1
    assert s[("variant_autoscaler_inventory_available", (("accelerator", "H100"),))] == 8
    assert ("variant_autoscaler_inventory_available", (("accelerator", "L4"),)) not in s
    assert s[("variant_autoscaler_unmet_demand_rps", (("model", "llama"),))] == 1.5
    assert s[("variant_autoscaler_active", ())] == 1.0


def test_vllm_style_names_survive_a_real_parser_and_vanished_variants_leave_no_series():
    exporter = Exporter()
    exporter.publish(_snapshot(_variant("a", 3, 2), _variant("b", 1, 1)))
    before = _samples(exporter.render().decode())
    exporter.publish(_snapshot(_variant("a", 4, 3)), success=False)
    after = _samples(exporter.render().decode())
    key_b = ("variant_autoscaler_desired_replicas",
             (("accelerator", "H100"), ("model", "llama"), ("namespace", "ns"), ("role", "both"), ("variant", "b")))
    assert key_b in before and key_b not in after
    key_a = (key_b[0], tuple((k, "a" if k == "variant" else v) for k, v in key_b[1]))
    assert after[key_a] == 4
    assert ("variant_autoscaler_last_successful_cycle_timestamp_seconds", ()) in before
    assert after[("variant_autoscaler_last_successful_cycle_timestamp_seconds", ())] == \
        before[("variant_autoscaler_last_successful_cycle_timestamp_seconds", ())]
