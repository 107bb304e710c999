"""How fast the emulated cluster is: start-up, API round trips on the core API and through the proxy
to the real CRD server, and Deployment replicas to ready pods. Prints figures; asserts nothing.

Run: .venv/bin/python benchmarks/bench_emulated_cluster.py [--resources 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

from variant_autoscaler_testbed.cluster import EmulatedCluster

GROUP, VERSION, PLURAL = "autoscaling.variant-autoscaler.io", "v1alpha1", "variantautoscalings"


def timed(fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def report(label: str, samples: list[float]) -> None:
    ms = sorted(s * 1e3 for s in samples)
    print(f"{label:<44} n={len(ms):<5} median {statistics.median(ms):7.2f} ms   p95 {ms[int(0.95 * (len(ms) - 1))]:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resources", type=int, default=200)
    parser.add_argument("--pods", type=int, default=50)
    args = parser.parse_args()
    from kubernetes import client

    t0 = time.perf_counter()
    with EmulatedCluster(start_delay_s=0.0, namespaces=["bench"]) as cluster:
        print(f"{'start-up (etcd + CRD server + core + CRDs)':<44} {time.perf_counter() - t0:7.2f} s")
        api = cluster.api_client()
        core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
        n = args.resources
        report("create ConfigMap (core API)", timed(lambda i: core.create_namespaced_config_map(
            "bench", client.V1ConfigMap(metadata=client.V1ObjectMeta(name=f"cm-{i}"), data={"k": "v"})), n))
        report("get ConfigMap (core API)", timed(lambda i: core.read_namespaced_config_map(f"cm-{i}", "bench"), n))
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VariantAutoscaling",
                "spec": {"scaleTargetRef": {"name": "d"}, "modelID": "m"}}
        report("create VariantAutoscaling (proxied, etcd)", timed(lambda i: custom.create_namespaced_custom_object(
            GROUP, VERSION, "bench", PLURAL, {**body, "metadata": {"name": f"va-{i}"}}), n))
        report("patch VA status (proxied, etcd)", timed(lambda i: custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, "bench", PLURAL, f"va-{i}", {"status": {"desiredReplicas": i % 7}}), n))
        t1 = time.perf_counter()
        listed = custom.list_namespaced_custom_object(GROUP, VERSION, "bench", PLURAL)
        print(f"{'list ' + str(len(listed['items'])) + ' VariantAutoscalings':<44} {1e3 * (time.perf_counter() - t1):7.2f} ms")
        dep = client.V1Deployment(metadata=client.V1ObjectMeta(name="d"), spec=client.V1DeploymentSpec(
            replicas=0, selector=client.V1LabelSelector(match_labels={"app": "d"}),
            template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels={"app": "d"}), spec=client.V1PodSpec(
                containers=[client.V1Container(name="c", image="i")]))))
        apps.create_namespaced_deployment("bench", dep)
        t2 = time.perf_counter()
        apps.patch_namespaced_deployment_scale("d", "bench", {"spec": {"replicas": args.pods}})
        for _ in range(6000):
            if (apps.read_namespaced_deployment("d", "bench").status.ready_replicas or 0) == args.pods:
                break
            time.sleep(0.01)
        print(f"{f'scale 0 -> {args.pods} pods, all ready (no start delay)':<44} {time.perf_counter() - t2:7.2f} s")
        t3 = time.perf_counter()
    print(f"{'shut-down':<44} {time.perf_counter() - t3:7.2f} s")


if __name__ == "__main__":
    main()
