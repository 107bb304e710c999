"""The collector's TLS, CA and credential options against the real Prometheus with TLS on (issue 10 part 3).

Prometheus serves HTTPS from `--web.config.file` (tls_server_config with a certificate for 127.0.0.1
signed by a CA made here with the openssl CLI) and asks for basic auth (`basic_auth_users`; its web
config has no bearer-token option, so a bearer token alone is refused with 401). Checked: the collector
verifies Prometheus's certificate against `ca_file` and gets real answers; with another CA, with no CA
(the system's trust store) or over plain http it fails with a reason in words; `verify_tls: false` skips
the check; wrong credentials give 401. Through the operator: a wrong CA sets MetricsAvailable False,
reason PrometheusError, message saying it is a TLS error; a bearer token alone gives 401; the right CA and basic
auth (the settings ConfigMap fixed) clear it; the password and the bearer token appear in no log line, Event,
status or /metrics. URL credentials and a bearer token together are refused (the token would never be sent).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from operator_harness import L4_PROFILE, Kube, OperatorThread, settings_dict, variant, wait_until
from variant_autoscaler.collector import PrometheusQueries, PrometheusSettings, QueryFailure
from variant_autoscaler.operator import RunOptions
from variant_autoscaler_testbed.prometheus import free_port

USER, PASSWORD = "va", "tls-test-password"
# bcrypt of PASSWORD (Python's crypt, METHOD_BLOWFISH): Prometheus's basic_auth_users takes bcrypt hashes only
PASSWORD_BCRYPT = "$2b$12$Srt46quPjc3PRHhSEdukHOuRBXOf8z7DGb1SIMAUqT7bGFPUt7VEa"
TOKEN = "tls-test-bearer-0123456789abcdef"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _ca(cwd: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "1", "-subj", f"/CN=variant-autoscaler {name}",
             cwd=cwd)


@pytest.fixture(scope="module")
def tls_prometheus(tmp_path_factory):
    """(https URL, the CA that signed its certificate, another CA); Prometheus with TLS and basic auth."""
    if shutil.which("openssl") is None or shutil.which("prometheus") is None:
        pytest.skip("needs the openssl and prometheus binaries (make system-deps)")
    d = tmp_path_factory.mktemp("prom-tls")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
             "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "1", "-extfile", "san.ext", cwd=d)
    (d / "web.yml").write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(d / "server.crt"), "key_file": str(d / "server.key")},
        "basic_auth_users": {USER: PASSWORD_BCRYPT}}))
    (d / "prometheus.yml").write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}}))
    port = free_port()
    log = (d / "prometheus.log").open("ab")
    proc = subprocess.Popen(["prometheus", f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", f"--web.config.file={d / 'web.yml'}",
                             "--log.level=warn"], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    url = f"https://127.0.0.1:{port}"
    good = PrometheusSettings(url=f"https://{USER}:{PASSWORD}@127.0.0.1:{port}", ca_file=d / "ca.crt", timeout_s=2)
    try:
        wait_until(lambda: proc.poll() is None and _answers(good), timeout_s=30,
                   what=f"Prometheus with TLS to answer ({(d / 'prometheus.log').read_text()[-500:]})")
        yield url, d / "ca.crt", d / "other-ca.crt"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _answers(settings: PrometheusSettings) -> bool:
    try:
        return _one(settings) == 1.0
    except QueryFailure:
        return False


def _one(settings: PrometheusSettings) -> float:
    queries = PrometheusQueries(settings)
    try:
        [sample] = queries.run({"one": "vector(1)"})["one"]
    finally:
        queries.close()
    return sample[1]


def _failure(settings: PrometheusSettings) -> str:
    with pytest.raises(QueryFailure) as err:
        _one(settings)
    return str(err.value)


def _with_auth(url: str) -> str:
    return url.replace("https://", f"https://{USER}:{PASSWORD}@")


def test_the_collector_verifies_prometheus_against_the_ca_file(tls_prometheus):
    url, ca, _ = tls_prometheus
    assert _one(PrometheusSettings(url=_with_auth(url), ca_file=ca, timeout_s=2)) == 1.0


def test_another_ca_no_ca_or_plain_http_fail_with_a_reason_in_words(tls_prometheus):
    url, _, other = tls_prometheus
    for settings in (PrometheusSettings(url=_with_auth(url), ca_file=other, timeout_s=2),
                     PrometheusSettings(url=_with_auth(url), timeout_s=2)):
        reason = _failure(settings)
        masked = url.replace("https://", "https://***@")  # the URL named, its password masked
        assert reason.startswith(f"TLS error talking to Prometheus at {masked}: "), reason
        assert "certificate verify failed" in reason, reason
        assert PASSWORD not in reason, reason
    reason = _failure(PrometheusSettings(url=_with_auth(url).replace("https:", "http:"), timeout_s=2))
    assert "Prometheus" in reason and PASSWORD not in reason, reason


def test_verify_tls_false_skips_the_certificate_check(tls_prometheus):
    url, _, other = tls_prometheus
    assert _one(PrometheusSettings(url=_with_auth(url), verify_tls=False, ca_file=other, timeout_s=2)) == 1.0


def test_wrong_credentials_are_refused_and_never_quoted(tls_prometheus, tmp_path):
    """A bearer token alone (Prometheus's web config has only basic auth) and a wrong password: 401, and
    the reason quotes neither the token (given inline or in a file) nor the password."""
    url, ca, _ = tls_prometheus
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    for settings in (PrometheusSettings(url=url, ca_file=ca, bearer_token=TOKEN, timeout_s=2),
                     PrometheusSettings(url=url, ca_file=ca, bearer_token_file=token_file, timeout_s=2),
                     PrometheusSettings(url=url.replace("https://", f"https://{USER}:wrong-{PASSWORD}@"), ca_file=ca,
                                        timeout_s=2)):
        reason = _failure(settings)
        assert "401" in reason or "Unauthorized" in reason, reason
        assert TOKEN not in reason and PASSWORD not in reason, reason


def test_url_credentials_and_a_bearer_token_together_are_refused():
    """requests would replace the bearer header by the URL's basic auth: the token silently never sent."""
    with pytest.raises(ValueError, match="basic auth would replace the token") as err:
        PrometheusSettings(url=f"https://{USER}:{PASSWORD}@127.0.0.1:9090", bearer_token=TOKEN)
    assert PASSWORD not in str(err.value) and TOKEN not in str(err.value)


class _Tap(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_operator_condition_on_a_wrong_ca_then_the_right_one(tls_prometheus, emulated_cluster, kube_api,
                                                              kube_namespace):
    """The operator with TLS settings from its ConfigMap: another CA gives MetricsAvailable False, reason
    PrometheusError, a message saying TLS; a bearer token alone gives 401; the right CA and basic auth reach Prometheus (the reason turns to
    MetricsMissing: this Prometheus scrapes no model server). No secret reaches a log, Event, status or /metrics."""
    from kubernetes import client

    url, ca, other = tls_prometheus
    kube = Kube(kube_api, kube_namespace)
    kube.deploy("tls-l4", 1)
    kube.apply_variant(variant("tls-l4", "tls-l4", profile=L4_PROFILE, min_replicas=1))

    def settings_text(ca_file: Path, **auth) -> str:
        return yaml.safe_dump(settings_dict(interval_s=1, watched_namespaces=[kube_namespace], prometheus={
            "url": _with_auth(url), "ca_file": str(ca_file), "timeout_s": 2, **auth}))

    kube.core.create_namespaced_config_map(kube_namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="tls-settings"), data={"settings.yaml": settings_text(other)}))
    port = free_port()
    options = RunOptions(settings_configmap="tls-settings", operator_namespace=kube_namespace,
                         kubeconfig=emulated_cluster.kubeconfig_path, metrics_host="127.0.0.1", metrics_port=port,
                         standalone=True, namespaces=(kube_namespace,), instance="tls-test")
    tap = _Tap()
    logging.getLogger().addHandler(tap)
    try:
        with OperatorThread(options) as op:
            cond = wait_until(lambda: (c := kube.condition("tls-l4", "MetricsAvailable") or {}).get("reason")
                              == "PrometheusError" and c, timeout_s=30, what="PrometheusError on the wrong CA")
            assert cond["status"] == "False" and "TLS error" in cond["message"], cond
            assert "certificate verify failed" in cond["message"], cond
            assert kube.replicas("tls-l4") == 1
            # a bearer token alone (the right CA): this Prometheus asks for basic auth, so 401 through the operator's
            # error path, where a token would leak if anything dumped the request
            kube.core.patch_namespaced_config_map("tls-settings", kube_namespace, {"data": {
                "settings.yaml": settings_text(ca, url=url, bearer_token=TOKEN)}})
            cond = wait_until(lambda: (c := kube.condition("tls-l4", "MetricsAvailable") or {}).get("reason")
                              == "PrometheusError" and "401" in c["message"] and c, timeout_s=30,
                              what="PrometheusError 401 with a bearer token alone")
            assert "TLS" not in cond["message"], cond
            kube.core.patch_namespaced_config_map("tls-settings", kube_namespace,
                                                  {"data": {"settings.yaml": settings_text(ca)}})
            cond = wait_until(lambda: (c := kube.condition("tls-l4", "MetricsAvailable") or {}).get("reason")
                              == "MetricsMissing" and c, timeout_s=30, what="Prometheus reached with the right CA")
            assert "TLS" not in cond["message"], cond
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                metrics = resp.read().decode()
        assert op.error is None
    finally:
        logging.getLogger().removeHandler(tap)
    events = kube.core.list_namespaced_event(kube_namespace).items
    written = [*tap.lines, metrics, json.dumps(kube.variant("tls-l4").get("status") or {}),
               *(f"{e.reason} {e.message}" for e in events)]
    assert tap.lines and events
    assert not [w for w in written if PASSWORD in w], "the Prometheus password was written somewhere"
    assert not [w for w in written if TOKEN in w], "the Prometheus bearer token was written somewhere"
