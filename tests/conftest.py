"""Shared pytest fixtures.

Emulated Kubernetes (variant_autoscaler_testbed): `emulated_cluster` is one cluster for the whole
session (etcd + the real CRD server + the emulated core API + the emulated kubelet, CRDs from
crds/ installed), with $KUBECONFIG pointing at it while it runs; `kube_api` is a
`kubernetes.client.ApiClient` for it; `kube_namespace` is a fresh namespace per test, deleted
afterwards. Kubelet hooks can be set per test: `emulated_cluster.kubelet.on_pod_start = hook`.
"""

from __future__ import annotations

import os
import uuid

import pytest


@pytest.fixture(scope="session")
def emulated_cluster():
    """The emulated cluster, started once per session (about 2 s); skipped without ../shared."""
    from variant_autoscaler_testbed.cluster import EmulatedCluster
    from variant_autoscaler_testbed.crd_server import SubstrateUnavailable, crd_server_binary

    try:
        crd_server_binary()
    except SubstrateUnavailable as err:
        pytest.skip(f"../shared not present: {err}")
    cluster = EmulatedCluster(start_delay_s=0.2)
    cluster.__enter__()
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig_path)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        cluster.__exit__(None, None, None)


@pytest.fixture(scope="session")
def kube_api(emulated_cluster):
    """A `kubernetes.client.ApiClient` bound to the emulated cluster's kubeconfig."""
    client = emulated_cluster.api_client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def kube_namespace(kube_api):
    """A namespace of its own for one test, so tests never see each other's objects."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        core.delete_namespace(name)


@pytest.fixture(scope="session")
def helm():
    """The real helm binary (bin/helm from `make system-deps`, or on PATH); skipped, saying how to get it."""
    from chart_tools import generator

    gen = generator()
    try:
        return gen.find_helm()
    except gen.HelmMissing as err:
        pytest.skip(str(err))
