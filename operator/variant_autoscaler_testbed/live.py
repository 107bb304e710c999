"""`make live`: the whole system on one machine, with a load ramp to watch it work.

Starts, on 127.0.0.1 and in this one process: the emulated cluster (real CRD server on etcd,
emulated core API and kubelet), a real Prometheus, one emulated vLLM server per pod the kubelet
runs, an inference gateway in front of them, the operator itself (kopf, standalone), and a load
ramp. The gateway is flow-controlled by default: it polls the operator's /metrics, holds requests
while the pool's published saturation is >= 1.0 (503 after a hold timeout; a stale signal counts as
1.0) and sends each request to the variant the routing weights pick for its length bucket
(`variant_autoscaler_testbed.gateway`); `--gateway weighted` follows the weights without
holding, `--gateway least-outstanding` is the plain least-outstanding gateway. At the end it prints how many requests were held, released and
refused. Three variants of one model compete: a cheap-per-hour T4 variant that cannot meet the ITL
target, an L4 variant (cheapest per request/s at the SLO) and a fast, dear H100 variant, on an
inventory where the L4 pool is small, so a high enough load spills over to H100.

Bounded: it stops by itself after --duration seconds (default 300), or at Ctrl-C. While it runs,
it prints where to scrape the operator's /metrics, the Prometheus UI, a kubeconfig for kubectl,
and every reconcile (scale events and a one-line summary per cycle).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

from variant_autoscaler_testbed.cluster import EmulatedCluster
from variant_autoscaler_testbed.gateway import FlowControlSettings
from variant_autoscaler_testbed.load import LoadSpec, generate_load
from variant_autoscaler_testbed.model_pods import ModelGateway, ModelPods, model_server_annotation
from variant_autoscaler_testbed.prometheus import PrometheusServer, free_port

NAMESPACE = "demo"
MODEL = "demo/chat-1b"
GROUP, VERSION, PLURAL = "autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings"
VARIANTS = {  # name: (accelerator, profile (CRD form), initial replicas, minReplicas)
    "chat-t4": ("T4", {"decodeBaseSeconds": 0.12, "decodePerSeqSeconds": 0.01, "prefillPerTokenSeconds": 0.0006}, 0, 0),
    "chat-l4": ("L4", {"decodeBaseSeconds": 0.04, "decodePerSeqSeconds": 0.004, "prefillPerTokenSeconds": 0.0002}, 1, 1),
    "chat-h100": ("H100", {"decodeBaseSeconds": 0.02, "decodePerSeqSeconds": 0.0012,
                           "prefillPerTokenSeconds": 0.00005}, 0, 0),
}
SETTINGS = {
    "interval_s": 5, "rate_window_s": 20, "staleness_threshold_s": 20, "scale_down_window_s": 45,
    "accelerators": [{"name": "T4", "cost_per_hour": 0.3, "available": 8},
                     {"name": "L4", "cost_per_hour": 1.0, "available": 3},
                     {"name": "H100", "cost_per_hour": 8.0, "available": 2}],
    "models": [{"name": MODEL, "weight_gb": 2.0, "kv_bytes_per_token": 131072.0}],
    "default_slo": {"ttft_s": 0.6, "itl_s": 0.09, "percentile": 90},
    "watched_namespaces": [NAMESPACE],
}
GATEWAY_MODES = ("flow", "weighted", "least-outstanding")
HOLD_TIMEOUT_S = 10.0  # below the load generator's drain time, so a request held at the end is answered


def flow_settings(metrics_port: int, hold: bool = True) -> FlowControlSettings:
    """The gateway follows the operator: poll each second, grace of three cycles, bounded holds."""
    return FlowControlSettings(metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", poll_interval_s=1.0,
                               stale_after_s=3 * SETTINGS["interval_s"], hold_timeout_s=HOLD_TIMEOUT_S, hold=hold)


MIX = [{"prompt_tokens": 100, "max_tokens": 40, "weight": 3}, {"prompt_tokens": 400, "max_tokens": 20}]


def ramp(duration_s: float) -> list[dict]:
    """Quiet, a rise in steps to a peak beyond the L4 pool, then quiet again; scaled to the duration."""
    shape = [(0.12, 0.5), (0.12, 2.0), (0.12, 4.0), (0.2, 9.0), (0.12, 4.0), (0.32, 0.5)]
    return [{"duration_s": duration_s * share, "rate_rps": rate} for share, rate in shape]


def _objects() -> tuple[list[dict], list[dict]]:
    from variant_autoscaler.resources import profile_from_document

    deployments, variants = [], []
    for name, (acc, profile, replicas, low) in VARIANTS.items():
        server = {"model": MODEL, "profile": profile_from_document({"parametric": profile}, "p").model_dump(),
                  "max_batch": 32}
        meta = {"labels": {"app": name}, "annotations": model_server_annotation(server)}
        deployments.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                                     "template": {"metadata": meta, "spec": {"containers": [
                                         {"name": "vllm", "image": "vllm/vllm-openai"}]}}}})
        variants.append({"apiVersion": f"{GROUP}/{VERSION}", "kind": "VariantAutoscaling", "metadata": {"name": name},
                         "spec": {"scaleTargetRef": {"kind": "Deployment", "name": name}, "modelID": MODEL,
                                  "accelerator": acc, "minReplicas": low, "maxBatch": 32,
                                  "profile": {"parametric": profile}}})
    return deployments, variants


async def run_live(duration_s: float, metrics_port: int, kubeconfig_out: Path | None,
                   gateway_mode: str = "flow") -> None:
    from kubernetes import client
    from variant_autoscaler.commands.run import run_operator
    from variant_autoscaler.operator import RunOptions

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    work = Path(tempfile.mkdtemp(prefix="va-live-"))
    prometheus = await asyncio.to_thread(PrometheusServer([]).start)
    cluster = EmulatedCluster(namespaces=[NAMESPACE], start_delay_s=3.0)
    try:
        async with cluster:
            pods = ModelPods(cluster.kubelet, prometheus).install()
            flow = (None if gateway_mode == "least-outstanding"
                    else flow_settings(metrics_port, hold=gateway_mode == "flow"))
            gateway = await ModelGateway(pods, flow=flow).start()
            settings = {**SETTINGS, "prometheus": {"url": prometheus.url, "timeout_s": 3}}
            (work / "settings.yaml").write_text(yaml.safe_dump(settings))
            kubeconfig = cluster.kubeconfig_path
            if kubeconfig_out is not None:
                kubeconfig_out.write_text(kubeconfig.read_text())
                kubeconfig = kubeconfig_out
            api = cluster.api_client()
            apps, custom = client.AppsV1Api(api), client.CustomObjectsApi(api)
            deployments, variants = _objects()
            for d in deployments:
                await asyncio.to_thread(apps.create_namespaced_deployment, NAMESPACE, d)
            for v in variants:
                await asyncio.to_thread(custom.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, PLURAL, v)
            options = RunOptions(settings_file=work / "settings.yaml", kubeconfig=cluster.kubeconfig_path,
                                 metrics_host="127.0.0.1", metrics_port=metrics_port, standalone=True,
                                 namespaces=(NAMESPACE,), instance="live")
            print(f"""
variant-autoscaler live run for {duration_s:g} s (Ctrl-C stops)
  operator metrics : http://127.0.0.1:{metrics_port}/metrics   (e.g. curl -s ... | grep -E 'normalized_load|wva_desired')
  Prometheus       : {prometheus.url}/graph
  inference gateway: {gateway.url}/v1/completions  (model {MODEL!r}; {gateway.mode})
  kubectl          : export KUBECONFIG={kubeconfig}; kubectl get va -n {NAMESPACE} -w
  load ramp        : {', '.join(f"{p['rate_rps']:g} req/s x {p['duration_s']:.0f} s" for p in ramp(duration_s))}
  reconcile log below (scale events and one line per cycle)
""", file=sys.stderr, flush=True)
            operator = asyncio.create_task(run_operator(options, stop_flag=stop))
            operator.add_done_callback(lambda _task: stop.set())  # kopf takes over Ctrl-C in the main thread
            spec = LoadSpec(targets=[gateway.url], model=MODEL, phases=ramp(duration_s), mix=MIX,
                            max_requests=100_000, max_duration_s=duration_s, drain_timeout_s=10)
            load = asyncio.create_task(generate_load(spec, stop))
            watch = asyncio.create_task(_print_replicas(apps, stop))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=duration_s)
            stop.set()
            report = await load
            print(f"load: {report.sent} sent, {report.ok} ok, {report.failed} failed"
                  + (f" ({', '.join(f'{k} {n}' for k, n in sorted(report.errors.items()))})" if report.errors else ""),
                  file=sys.stderr)
            quantiles = gateway.latency_quantiles()
            if quantiles:
                print("gateway-side latency of the requests answered 200 (arrival at the gateway to reply, holds "
                      "included): " + ", ".join(f"p{q * 100:g} {s:.2f} s" for q, s in quantiles.items()),
                      file=sys.stderr)
            if gateway.gate is not None:
                print(f"gateway ({gateway.mode}, on the operator's /metrics): {gateway.gate.counts.summary()}",
                      file=sys.stderr)
            else:
                print(f"gateway (least-outstanding): per pod {dict(sorted(gateway.routed.items()))}", file=sys.stderr)
            await gateway.stop()  # before the operator goes, so its last polls do not log a missing /metrics
            await asyncio.wait_for(operator, timeout=30)
            watch.cancel()
            await pods.stop_all()
            pods.uninstall()
    finally:
        await asyncio.to_thread(prometheus.stop)
        if kubeconfig_out is not None:
            kubeconfig_out.unlink(missing_ok=True)


async def _print_replicas(apps, stop: asyncio.Event) -> None:
    """One line whenever the replicas of the demo Deployments change (bounded by `stop`)."""
    last = None
    started = time.monotonic()
    while not stop.is_set():
        items = (await asyncio.to_thread(apps.list_namespaced_deployment, NAMESPACE)).items
        now = {d.metadata.name: (d.spec.replicas, d.status.ready_replicas or 0) for d in items}
        if now != last:
            text = ", ".join(f"{n} {r} ({ready} ready)" for n, (r, ready) in sorted(now.items()))
            print(f"[{time.monotonic() - started:6.1f} s] replicas: {text}", file=sys.stderr, flush=True)
            last = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m variant_autoscaler_testbed.live", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds to run (default 300)")
    parser.add_argument("--metrics-port", type=int, default=0, help="operator /metrics port (default: a free one)")
    parser.add_argument("--kubeconfig", type=Path, help="also write the kubeconfig here (removed on exit)")
    parser.add_argument("--gateway", choices=GATEWAY_MODES, default="flow",
                        help="flow: follow the operator's saturation and routing weights (default); weighted: "
                             "the weights without holding; least-outstanding: the plain gateway")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("kopf", "aiohttp", "urllib3", "kubernetes", "variant_autoscaler_testbed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    asyncio.run(run_live(args.duration, args.metrics_port or free_port(), args.kubeconfig, args.gateway))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
