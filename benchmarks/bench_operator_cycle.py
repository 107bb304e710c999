"""One control cycle for 1,000 VariantAutoscalings over 100 models, and the operator's memory.

Target (issue 4): <= 2 s per cycle excluding Prometheus latency. The collector's own work for 1,000
variants is measured in bench_collector.py; here the cycle is fed pre-collected observations (the
collector's own result objects, `variant_autoscaler_testbed.observations`) and does everything
else for real, over HTTP against the emulated cluster (real CRD server on etcd): list the 1,000
resources, read 1,000 Deployments and their pods, parse, build one joint problem (datasheet
profiles: 10 variants per model = 5 accelerator types x 1 or 2 per replica, 4 length buckets),
capacity table, allocation, transition plan, status and scale writes, export.

The resources are handed to the cycle as the operator's kopf index holds them (the operator lists
them from the API only on its first cycle and every 20th); the time to list them from the API is
printed apart. The operator runs in a child process (imports of kopf, the kubernetes client and
the optimizer included), so its RSS is the operator's own, not the emulated cluster's. The first
cycle writes 1,000 statuses and scales many targets; later cycles write only what changed. The child
runs with MALLOC_ARENA_MAX=2, as the operator image should: without it glibc's per-thread arenas
(the API calls run in a thread pool) let RSS creep up by ~45 MiB over six cycles.

The optimizer runs with its own default limit (2 s, which the operator's settings follow). Every
cycle after the first starts warm from the last one (the controller's memory). To compare, the same
controller then runs as many cycles cold (its warm start dropped before each one): both series
come from the same process on the same cluster, each with its median and p90 cycle time, the
optimizer's share and the proven gap per cycle.

    .venv/bin/python -m pytest -q benchmarks/bench_operator_cycle.py -s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODELS, NAMESPACES, CYCLES = 100, 10, 6
ACCELERATORS = {"H100": (4.0, 96), "A100-80G": (2.6, 96), "A100-40G": (1.9, 96), "L4": (0.8, 160), "V100": (1.0, 96)}
BUCKETS = [(128, 128, 0.4), (512, 256, 0.3), (2048, 256, 0.2), (4096, 512, 0.1)]
GROUP, VERSION, PLURAL = "autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings"


def model_name(m: int) -> str:
    return f"fleet/llama-3.1-8b-{m:03d}"


def namespace(m: int) -> str:
    return f"bench-{m % NAMESPACES}"


def objects() -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(namespace, Deployment) and (namespace, VariantAutoscaling) for 100 models x 10 variants."""
    deployments, variants = [], []
    for m in range(MODELS):
        for acc in ACCELERATORS:
            for per in (1, 2):
                name = f"m{m:03d}-{acc.lower()}-x{per}"
                deployments.append((namespace(m), {
                    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                    "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                             "template": {"metadata": {"labels": {"app": name}},
                                          "spec": {"containers": [{"name": "vllm", "image": "vllm"}]}}}}))
                variants.append((namespace(m), {
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "VariantAutoscaling", "metadata": {"name": name},
                    "spec": {"scaleTargetRef": {"name": name}, "modelID": model_name(m), "accelerator": acc,
                             "acceleratorCount": per, "minReplicas": 0, "maxBatch": 128}}))
    return deployments, variants


def settings() -> dict:
    return {
        "accelerators": [{"name": n, "cost_per_hour": c, "available": a} for n, (c, a) in ACCELERATORS.items()],
        "default_slo": {"ttft_s": 1.5, "itl_s": 0.06, "percentile": 90},
        "watched_namespaces": [f"bench-{i}" for i in range(NAMESPACES)],
    }


def demand() -> dict[str, float]:
    return {model_name(m): 2.0 + (m % 10) * 2.0 for m in range(MODELS)}


# ----------------------------------------------------------------------------------------------
# The operator side (child process).


def settings_of(path: str) -> list[str]:
    import yaml

    return yaml.safe_load(Path(path).read_text())["watched_namespaces"]


def rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def worker(kubeconfig: str, settings_file: str, cycles: int, profile: str | None = None) -> dict:
    import variant_autoscaler.operator  # noqa: F401 - the operator process imports kopf and its handlers
    from kubernetes import config
    from variant_autoscaler.actuator import KubeGateway
    from variant_autoscaler.controller import Controller, ControllerDeps
    from variant_autoscaler.exporter import Exporter
    from variant_autoscaler.settings import SettingsStore, load_settings_file
    from variant_autoscaler_testbed.observations import Demand

    from optimizer.workload import LengthBucket

    baseline = rss_mb()[0]
    mix = [LengthBucket(input_tokens=i, output_tokens=o, share=s) for i, o, s in BUCKETS]
    feed = Demand(demand(), mix=mix)
    collected: dict[tuple[str, ...], object] = {}

    def pre_collected(selectors):
        """The observations for these variants, built once: the cycle must not pay for making them."""
        key = tuple(s.name for s in selectors)
        if key not in collected:
            collected[key] = feed.collect(selectors)
        return collected[key]

    gateway = KubeGateway(config.new_client_from_config(config_file=kubeconfig))
    controller = Controller(ControllerDeps(gateway=gateway, settings=SettingsStore(load_settings_file(settings_file)),
                                           exporter=Exporter(), collect=pre_collected))
    out = []
    for k in range(2 * cycles):
        cold = k >= cycles
        if cold:
            controller.memory.warm_start = None  # the comparison series: every cycle starts cold
        t = time.perf_counter()
        resources = asyncio.run(gateway.list_variant_autoscalings(settings_of(settings_file)))
        list_s = time.perf_counter() - t
        if profile and k == cycles // 2:
            import cProfile  # one steady warm cycle, the controller's own (event-loop thread) work

            with cProfile.Profile() as prof:
                report = asyncio.run(controller.cycle(resources))
            prof.dump_stats(profile)
        else:
            report = asyncio.run(controller.cycle(resources))
        out.append({"ok": report.ok, "error": report.error, "variants": len(report.variants),
                    "duration_s": report.duration_s, "optimizer_s": report.optimizer_s,
                    "status": report.optimizer_status, "cost": report.cost_per_hour,
                    "scaled": sum(v.scaled for v in report.variants.values()), "rss_mb": rss_mb()[0],
                    "phases": report.phases_s, "list_s": list_s, "gap": report.optimizer_gap,
                    "warm": report.optimizer_warm_started, "series": "cold" if cold else "warm"})
    scrape = controller.deps.exporter.render()
    return {"baseline_rss_mb": baseline, "cycles": out, "hwm_mb": rss_mb()[1], "metrics_bytes": len(scrape)}


# ----------------------------------------------------------------------------------------------
# The benchmark (pytest).


def _populate(cluster) -> float:
    from kubernetes import client

    api = cluster.api_client()
    apps, custom = client.AppsV1Api(api), client.CustomObjectsApi(api)
    deployments, variants = objects()
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda d: apps.create_namespaced_deployment(d[0], d[1], _preload_content=False), deployments))
        list(pool.map(lambda v: custom.create_namespaced_custom_object(GROUP, VERSION, v[0], PLURAL, v[1],
                                                                       _preload_content=False), variants))
    api.close()
    return time.monotonic() - started


def test_one_cycle_for_1000_variant_autoscalings(tmp_path):
    import pytest
    import yaml
    from variant_autoscaler_testbed.cluster import EmulatedCluster
    from variant_autoscaler_testbed.crd_server import SubstrateUnavailable, crd_server_binary

    try:
        crd_server_binary()
    except SubstrateUnavailable as err:
        pytest.skip(f"../shared not present: {err}")
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(settings()))
    with EmulatedCluster(namespaces=[f"bench-{i}" for i in range(NAMESPACES)], start_delay_s=0.0) as cluster:
        setup_s = _populate(cluster)
        profile = ["--profile", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []
        proc = subprocess.run([sys.executable, __file__, "--kubeconfig", str(cluster.kubeconfig_path),
                               "--settings", str(tmp_path / "settings.yaml"), "--cycles", str(CYCLES), *profile],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    cycles = result["cycles"]
    print(f"\n1,000 VariantAutoscalings over {MODELS} models in {NAMESPACES} namespaces "
          f"(created in {setup_s:.1f} s); pre-collected observations, emulated API over HTTP")
    print(f"{'cycle':>5} {'start':>5} {'total s':>8} {'optimizer s':>12} {'other s':>8} {'scaled':>7} {'RSS MiB':>8} "
          f"{'API list s':>10} {'gap %':>6}  status")
    for i, c in enumerate(cycles, 1):
        print(f"{i:>5} {'warm' if c['warm'] else 'cold':>5} {c['duration_s']:>8.3f} {c['optimizer_s']:>12.3f} "
              f"{c['duration_s'] - c['optimizer_s']:>8.3f} {c['scaled']:>7} {c['rss_mb']:>8.1f} {c['list_s']:>10.3f} "
              f"{100 * c['gap']:>6.2f}  {c['status']} cost/h {c['cost']:.1f}")
    for i, c in enumerate(cycles, 1):
        print(f"  cycle {i} phases: " + ", ".join(f"{k} {v:.3f}" for k, v in c["phases"].items()))
    # steady state: the warm series without its first (cold, status-writing) cycle; the cold series whole
    for series, steady in (("warm", [c for c in cycles if c["series"] == "warm"][1:]),
                           ("cold", [c for c in cycles if c["series"] == "cold"])):
        print(f"steady-state cycle, {series} starts ({len(steady)} cycles): {_summary(steady)}")
    print(f"operator RSS {cycles[-1]['rss_mb']:.0f} MiB (after imports {result['baseline_rss_mb']:.0f} MiB, "
          f"peak {result['hwm_mb']:.0f} MiB); /metrics {result['metrics_bytes'] / 1024:.0f} KiB")
    assert all(c["ok"] and c["variants"] == MODELS * 10 for c in cycles)
    assert all(c["warm"] == (c["series"] == "warm" and i > 0) for i, c in enumerate(cycles))


def _summary(steady: list[dict]) -> str:
    def pick(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))]

    total = [c["duration_s"] for c in steady]
    opt = sum(c["optimizer_s"] for c in steady) / max(sum(total), 1e-9)
    gaps = " ".join(f"{100 * c['gap']:.2f}" for c in steady)
    return (f"median {pick(total, 0.5):.3f} s, p90 {pick(total, 0.9):.3f} s, optimizer {100 * opt:.0f} % of it; "
            f"proven gap % per cycle: {gaps}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="operator side of the cycle benchmark (run by pytest)")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--settings", required=True)
    parser.add_argument("--cycles", type=int, default=CYCLES)
    parser.add_argument("--profile", help="cProfile one steady warm cycle (the middle one) into this file")
    args = parser.parse_args()
    print(json.dumps(worker(args.kubeconfig, args.settings, args.cycles, args.profile)))
