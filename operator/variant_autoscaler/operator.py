"""The kopf operator: startup, an index over VariantAutoscalings, the global loop, health probes.

Why the loop is not a per-object handler: one decision covers every variant of every model
(`controller.Controller.cycle`), so one task runs it every `interval_s`, and a VariantAutoscaling
spec change only wakes it early. The `@kopf.index` keeps every VariantAutoscaling as last watched:
that is the cycle's global view, with no API call (listing 1,000 resources with their status costs
a second on a busy API server). The first cycle, and every `RELIST_EVERY`-th, lists from the API
instead, as a safety net against an index that is still filling or out of step.

Two replicas never actuate at once: kopf peering (a ClusterKopfPeering, or a KopfPeering per
watched namespace, named `variant-autoscaler`) pauses every replica but the one with the highest
priority, and the loop applies kopf's own rule to the same peering object before each cycle and
again right before it writes: it runs only when no other live peer has a priority >= its own.
Each replica picks a random priority unless one is given, so exactly one wins; a newcomer waits
`PEERING_GRACE_S` before its first cycle so the old leader sees it first. Equal priorities (two
replicas given the same --priority) would pause everyone, as kopf does; `variant-autoscaler run`
gives kopf its instance name as identity, so a tie goes to the smallest identity and the other
replica steps down one priority and writes it to the peering object at once.

Configuration comes from `RunOptions` (the `run` command's flags, or environment variables when
kopf's own CLI or `kopf.testing.KopfRunner` starts this module).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import os
import random
import time
from datetime import UTC, datetime
from pathlib import Path

import kopf
from pydantic import BaseModel, ConfigDict, Field

from variant_autoscaler.actuator import GROUP, PLURAL, VERSION, ApiCallFailed, KubeGateway, RetryPolicy
from variant_autoscaler.controller import Controller, ControllerDeps, CycleReport, served_namespaces
from variant_autoscaler.exporter import Exporter, MetricsServer
from variant_autoscaler.settings import (
    OperatorSettings,
    SettingsSource,
    SettingsStore,
    load_settings_file,
)

log = logging.getLogger("variant_autoscaler.operator")

PEERING_NAME = "variant-autoscaler"

# The handlers live in a registry of their own, not kopf's process-wide default, so that importing
# this module (tests, benchmarks, `run`) never adds handlers to another kopf operator in the process.
registry = kopf.OperatorRegistry()
PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"
PEERING_GRACE_S = 5.0
MIN_CYCLE_GAP_S = 1.0
RELIST_EVERY = 20
READY_AFTER_CYCLES = 3  # readiness fails when the last successful cycle is older than this many intervals
READY_MIN_S = 10.0
ENV_PREFIX = "VARIANT_AUTOSCALER_"
API_ERROR_BACKOFFS_S = (1.0, 2.0, 5.0, 10.0)


class RetryForever:
    """kopf's `networking.error_backoffs` that never run out: the given sleeps, then the last one forever.

    kopf gives a request up once its backoffs are exhausted, and a watch that gives up ends the
    operator (rc=1); an API server restart can last longer than any finite list. kopf iterates this
    once per request; every retry calls `on_retry(consecutive failures of that request)`.
    """

    def __init__(self, delays_s: tuple[float, ...], on_retry=None):
        self.delays_s = tuple(delays_s)
        self.on_retry = on_retry

    def __iter__(self):
        for failures, delay in enumerate(itertools.chain(self.delays_s, itertools.repeat(self.delays_s[-1]))):
            if failures and self.on_retry is not None:
                self.on_retry(failures)
            yield delay


class RunOptions(BaseModel):
    """How this operator process runs (flags of `variant-autoscaler run`, or VARIANT_AUTOSCALER_* env)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings_file: Path | None = None
    settings_configmap: str | None = None
    operator_namespace: str = "default"
    namespaces: tuple[str, ...] = Field(default=(), description="Watched namespaces; empty: cluster-wide.")
    metrics_host: str = Field(default_factory=lambda: default_metrics_host(),
                              description="Address of /metrics: $POD_IP (downward API) if set, else loopback; "
                                          "never all interfaces unless asked for.")
    metrics_port: int = Field(default=8080, ge=0, lt=65536)
    kubeconfig: Path | None = None
    peering: str = PEERING_NAME
    standalone: bool = False
    priority: int | None = None
    peering_grace_s: float = PEERING_GRACE_S
    api_error_backoffs_s: tuple[float, ...] = Field(
        default=API_ERROR_BACKOFFS_S, min_length=1,
        description="kopf's sleeps between failed API requests; the last one repeats forever (never give up).")
    instance: str = Field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}-{random.randrange(16**4):04x}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RunOptions:
        env = dict(os.environ if environ is None else environ)
        src = SettingsSource.from_env(environ=env)

        def get(name: str) -> str | None:
            return env.get(ENV_PREFIX + name) or None

        values: dict = {"settings_file": src.file, "settings_configmap": src.configmap,
                        "operator_namespace": src.namespace}
        if get("NAMESPACES"):
            values["namespaces"] = tuple(n for n in get("NAMESPACES").split(",") if n)
        if get("METRICS_PORT"):
            values["metrics_port"] = int(get("METRICS_PORT"))
        if get("METRICS_HOST"):
            values["metrics_host"] = get("METRICS_HOST")
        if get("KUBECONFIG") or env.get("KUBECONFIG"):
            values["kubeconfig"] = Path(get("KUBECONFIG") or env["KUBECONFIG"])
        if get("PEERING_GRACE_S"):
            values["peering_grace_s"] = float(get("PEERING_GRACE_S"))
        if get("INSTANCE"):
            values["instance"] = get("INSTANCE")
        return cls(**values)


def default_metrics_host(environ: dict[str, str] | None = None) -> str:
    """$POD_IP (the chart sets it from status.podIP), else 127.0.0.1."""
    env = os.environ if environ is None else environ
    return env.get("POD_IP") or "127.0.0.1"


def initial_settings(options: RunOptions) -> OperatorSettings:
    """Settings at startup: the file if given (errors are fatal here: there is no last good yet)."""
    if options.settings_file is not None:
        return load_settings_file(options.settings_file)
    return OperatorSettings()


def live_peers(status: dict | None, now: datetime | None = None) -> dict[str, int]:
    """identity -> priority of the peers of one peering object whose lifetime has not run out."""
    now = now or datetime.now(UTC)
    out = {}
    for identity, info in (status or {}).items():
        if not isinstance(info, dict):
            continue
        try:
            seen = datetime.fromisoformat(str(info.get("lastseen")).replace("Z", "+00:00"))
            lifetime = float(info.get("lifetime", 60))
            prio = int(info.get("priority", 0))
        except (TypeError, ValueError):
            continue
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
        if (seen - now).total_seconds() + lifetime > 0:
            out[str(identity)] = prio
    return out


def tie_winner(status: dict | None, priority: int, identity: str, now: datetime | None = None) -> str | None:
    """The peer that keeps `priority` when several live peers share it: the smallest identity.
    None when nobody else has our priority."""
    same = sorted(i for i, p in live_peers(status, now).items() if p == priority)
    others = [i for i in same if i != identity]
    return min([identity, *others]) if others else None


def peer_is_active(status: dict | None, priority: int, now: datetime | None = None,
                   identity: str | None = None) -> bool:
    """kopf's rule on one peering object: active iff the only live peer with priority >= ours is us.

    Without our identity (kopf's CLI started us), a peer is identified by its priority: if two ever
    share it, both stay paused, as kopf does. With it (`variant-autoscaler run` gives kopf its
    instance name), a tie goes to the smallest identity; the other steps down (`Runtime.is_active`).
    """
    peers = live_peers(status, now)
    if any(p > priority for i, p in peers.items() if i != identity):
        return False
    if identity is None:
        return sum(p == priority for p in peers.values()) == 1
    return peers.get(identity) == priority and tie_winner(status, priority, identity, now) in (None, identity)


class Runtime:
    """Everything one operator instance owns (kept in kopf's per-operator memo, never in globals)."""

    def __init__(self, options: RunOptions, kopf_settings: kopf.OperatorSettings, identity: str | None = None):
        from kubernetes import client as kube_client

        self.options = options
        self.kopf_settings = kopf_settings
        self.priority = kopf_settings.peering.priority
        self.identity: str | None = identity  # kopf's identity of this replica, when we gave it to kopf
        self.peering_name = kopf_settings.peering.name
        api_client = kube_client.ApiClient(configuration=kube_configuration(options))
        configmap_source = options.settings_file is None and bool(options.settings_configmap)
        self.store = SettingsStore(initial_settings(options), loaded=not configmap_source)
        s = self.store.current
        self.gateway = KubeGateway(api_client, user_agent=f"variant-autoscaler/{options.instance}",
                                   retry=RetryPolicy(attempts=s.api_retries + 1, first_delay_s=s.api_backoff_s))
        self.exporter = Exporter()
        self.metrics = MetricsServer(self.exporter, host=options.metrics_host, port=options.metrics_port,
                                     ready=self.readiness)
        self.started_at = time.monotonic()
        self.loop_seen_at: float | None = None
        self.last_ok_at: float | None = None
        self.wake = asyncio.Event()
        self.generations: dict[tuple[str, str], int] = {}
        self.task: asyncio.Task | None = None
        self.last_report: CycleReport | None = None
        self.active = False
        self.first_seen_self: float | None = None
        self.index: kopf.Index | None = None
        self.cycles_done = 0
        self._collector = None
        self._collector_key = None
        configmap = None
        if options.settings_file is None and options.settings_configmap:
            configmap = (options.operator_namespace, options.settings_configmap)
        self.controller = Controller(ControllerDeps(
            gateway=self.gateway, settings=self.store, exporter=self.exporter, collect=self._collect,
            pod_load=self._pod_load, fit_profiles=self._fit, settings_configmap=configmap,
            namespaces=tuple(options.namespaces)))

    # -- metrics side: the collector follows the settings in force

    def collector(self):
        from variant_autoscaler.collector import Collector, CollectorSettings

        s = self.store.current
        scope = tuple(served_namespaces(self.options.namespaces, s.watched_namespaces) or ())
        key = (s.prometheus, s.rate_window_s, s.staleness_threshold_s, s.variant_label, scope)
        if self._collector is None or key != self._collector_key:
            if self._collector is not None:
                self._collector.close()
            self._collector = Collector(CollectorSettings(
                prometheus=s.prometheus, rate_window_s=s.rate_window_s, staleness_threshold_s=s.staleness_threshold_s,
                staleness_lookback_s=max(600.0, s.staleness_threshold_s), variant_label=s.variant_label,
                namespaces=scope))
            self._collector_key = key
        return self._collector

    def _collect(self, selectors):
        return self.collector().collect(selectors)

    def _fit(self, selectors):
        from variant_autoscaler.online_profile import OnlineProfileFitter

        return OnlineProfileFitter(self.collector()).fit(selectors)

    def _pod_load(self, namespaces: list[str]) -> dict[tuple[str, str], float]:
        """Requests in flight per pod (running + waiting), one query for all pods."""
        c = self.collector()
        m, s = c.settings.metrics, c.settings
        sel = c.series_selector()
        query = (f"sum by ({s.namespace_label}, {s.pod_label}) ({m.running}{sel}) + "
                 f"sum by ({s.namespace_label}, {s.pod_label}) ({m.waiting}{sel})")
        raw = c.queries.run({"pod_load": query})
        out = {}
        for labels, value in raw["pod_load"]:
            ns, pod = labels.get(s.namespace_label, ""), labels.get(s.pod_label, "")
            if ns in namespaces and value == value:
                out[(ns, pod)] = float(value)
        return out

    def note_api_retry(self, failures: int) -> None:
        """One of kopf's requests (a watch, a peering write) failed again and will be retried."""
        self.exporter.count_error("KubernetesApiRetried")
        if failures == len(self.options.api_error_backoffs_s):
            log.warning("the Kubernetes API failed %d times in a row for one request; retrying every %g s "
                        "until it answers (the operator never gives up)", failures,
                        self.options.api_error_backoffs_s[-1])

    def readiness(self) -> tuple[bool, str]:
        """Ready while the control loop is alive: the active peer finished a successful cycle within
        READY_AFTER_CYCLES intervals (at least READY_MIN_S); a standby replica's loop went round as
        recently. A stuck loop (a hung API call, a wedged solver) or cycles that keep failing turn it
        unready, so a rollout stops and the Service stops routing /metrics scrapes to it."""
        now = time.monotonic()
        s = self.store.current
        limit = max(READY_AFTER_CYCLES * s.interval_s, 2 * s.optimizer_time_limit_s, READY_MIN_S)
        if not self.active:
            seen = self.loop_seen_at or self.started_at
            age = now - seen
            return (age <= limit, f"standby, loop last ran {age:.0f} s ago (limit {limit:.0f} s)")
        if self.last_ok_at is None:
            age = now - self.started_at
            return (age <= limit, f"active, no successful cycle yet ({age:.0f} s since start, limit {limit:.0f} s)")
        age = now - self.last_ok_at
        return (age <= limit, f"active, last successful cycle {age:.0f} s ago (limit {limit:.0f} s)")

    # -- leadership

    async def is_active(self) -> bool:
        if self.options.standalone or self.kopf_settings.peering.standalone:
            return True
        names = [] if self.kopf_settings.peering.clusterwide else list(self.options.namespaces)
        bodies = []
        try:
            if not names:
                bodies.append(await self.gateway.read_cluster_object(PEERING_GROUP, PEERING_VERSION,
                                                                     "clusterkopfpeerings", self.peering_name))
            else:
                for ns in names:
                    bodies.append(await self._read_namespaced_peering(ns))
        except ApiCallFailed as err:
            log.warning("cannot read the peering object, not acting this cycle: %s", err)
            return False
        if any(b is None for b in bodies):
            return False
        now = datetime.now(UTC)
        if self.identity is not None and any(tie_winner(b.get("status"), self.priority, self.identity, now)
                                             not in (None, self.identity) for b in bodies):
            await self._step_down(names)
        if not all(peer_is_active(b.get("status"), self.priority, now, self.identity) for b in bodies):
            self.first_seen_self = None
            return False
        if self.first_seen_self is None:
            self.first_seen_self = time.monotonic()
        return time.monotonic() - self.first_seen_self >= self.options.peering_grace_s

    async def _step_down(self, namespaces: list[str]) -> None:
        """Another live replica has our priority and a smaller identity: it keeps the priority, we take
        one less and write it to the peering object(s) at once (kopf's own keepalive would take up to
        a minute), so kopf resumes the winner and pauses us instead of pausing both forever."""
        old, new = self.priority, self.priority - 1
        self.priority = self.kopf_settings.peering.priority = new
        log.warning("peering %r: priority %d is also held by a replica with a smaller identity, which keeps it; "
                    "this replica (%s) steps down to %d. Give replicas distinct --priority values, or none.",
                    self.peering_name, old, self.identity, new)
        entry = {"status": {self.identity: {"priority": new, "lifetime": int(self.kopf_settings.peering.lifetime),
                                            "lastseen": datetime.now(UTC).isoformat()}}}
        gw = self.gateway

        def patch() -> None:
            if not namespaces:
                gw._json(f"patch clusterkopfpeering {self.peering_name}", gw.custom.patch_cluster_custom_object,
                         PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", self.peering_name, entry,
                         _content_type="application/merge-patch+json", idempotent_on_conflict=True)
            for ns in namespaces:
                gw._json(f"patch kopfpeering {ns}/{self.peering_name}", gw.custom.patch_namespaced_custom_object,
                         PEERING_GROUP, PEERING_VERSION, ns, "kopfpeerings", self.peering_name, entry,
                         _content_type="application/merge-patch+json", idempotent_on_conflict=True)
        try:
            await gw._in_thread(patch)
        except ApiCallFailed as err:
            log.warning("cannot write the lower priority now (kopf's keepalive will): %s", err)

    async def _read_namespaced_peering(self, namespace: str) -> dict | None:
        gw = self.gateway

        def call():
            try:
                return gw._json(f"read kopfpeering {namespace}/{self.peering_name}",
                                gw.custom.get_namespaced_custom_object, PEERING_GROUP, PEERING_VERSION, namespace,
                                "kopfpeerings", self.peering_name)
            except ApiCallFailed as err:
                if err.status == 404:
                    return None
                raise
        return await gw._in_thread(call)

    async def ensure_peering(self) -> None:
        if self.options.standalone or self.kopf_settings.peering.standalone:
            return
        body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "metadata": {"name": self.peering_name}}
        try:
            if self.kopf_settings.peering.clusterwide or not self.options.namespaces:
                await self.gateway.ensure_cluster_object(PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings",
                                                         {**body, "kind": "ClusterKopfPeering"})
            else:
                gw = self.gateway
                for ns in self.options.namespaces:
                    def create(ns=ns):
                        try:
                            gw._json(f"create kopfpeering {ns}/{self.peering_name}",
                                     gw.custom.create_namespaced_custom_object, PEERING_GROUP, PEERING_VERSION, ns,
                                     "kopfpeerings", {**body, "kind": "KopfPeering"})
                        except ApiCallFailed as err:
                            if err.status != 409:
                                raise
                    await gw._in_thread(create)
        except ApiCallFailed as err:
            log.warning("cannot create the peering object (%s); kopf pauses until it exists", err)

    # -- the loop

    async def loop(self) -> None:
        """Run cycles while this replica is the active peer; bounded by the operator's lifetime."""
        last_start = 0.0
        while True:
            active = await self.is_active()
            if active != self.active:
                log.info("this replica is %s", "the active peer: running the control loop" if active
                         else "not the active peer: the loop is paused")
            self.active = active
            self.loop_seen_at = time.monotonic()
            self.exporter.set_active(active)
            if active:
                last_start = time.monotonic()
                try:
                    self.last_report = await self.controller.cycle(self.resources())
                    self.cycles_done += 1
                    if self.last_report.ok:
                        self.last_ok_at = time.monotonic()
                    r = self.last_report
                    log.info("cycle: %d variants, ok=%s, metrics=%s, optimizer=%s (gap %s, %s), cost/h=%s, %.2f s",
                             len(r.variants), r.ok, r.metrics_available, r.optimizer_status,
                             f"{100 * r.optimizer_gap:.2f} %" if r.optimizer_gap is not None else "-",
                             "warm" if r.optimizer_warm_started else "cold",
                             f"{r.cost_per_hour:.2f}" if r.cost_per_hour is not None else "-", r.duration_s)
                except Exception:  # noqa: BLE001 - one bad cycle must not end the loop
                    log.exception("cycle failed")
                    self.exporter.count_error("CycleFailed")
            interval = self.store.current.interval_s  # after the cycle: it may just have read the settings ConfigMap
            wait = interval if active else min(interval, max(1.0, self.options.peering_grace_s / 2))
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=wait)
            gap = MIN_CYCLE_GAP_S - (time.monotonic() - last_start)
            if gap > 0:
                await asyncio.sleep(gap)

    def resources(self) -> list[dict] | None:
        """The VariantAutoscalings from kopf's index; None (list them from the API) on the first cycle,
        every RELIST_EVERY cycles as a safety net, and whenever the index is empty but the API was not."""
        if self.index is None or self.cycles_done % RELIST_EVERY == 0:
            return None
        items = [body for store in self.index.values() for body in store]
        if not items and self.last_report is not None and self.last_report.variants:
            return None
        return items

    def note_generation(self, namespace: str, name: str, generation: int | None) -> None:
        key = (namespace, name)
        if self.generations.get(key) != generation:
            self.generations[key] = generation
            self.wake.set()

    async def start(self) -> None:
        await self.metrics.start()
        await self.ensure_peering()
        standalone = self.options.standalone or self.kopf_settings.peering.standalone
        log.info("metrics on %s/metrics; %s; instance %s", self.metrics.url,
                 "standalone (no peering)" if standalone else f"peering {self.peering_name!r} priority {self.priority}",
                 self.options.instance)
        self.task = asyncio.create_task(self.loop(), name="variant-autoscaler loop")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.metrics.stop()
        if self._collector is not None:
            self._collector.close()
        self.gateway.close()


def kube_configuration(options: RunOptions):
    """The `kubernetes` client configuration: --kubeconfig, else in-cluster, else $KUBECONFIG/~/.kube/config.

    Read explicitly every time (not from the client's import-time default), so several operators in
    one process (tests) can each talk to their own endpoint.
    """
    from kubernetes import client as kube_client
    from kubernetes import config as kube_config

    cfg = kube_client.Configuration()
    if options.kubeconfig is not None:
        kube_config.load_kube_config(config_file=str(options.kubeconfig), client_configuration=cfg)
        return cfg
    try:
        kube_config.load_incluster_config(client_configuration=cfg)
    except kube_config.ConfigException:
        path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        kube_config.load_kube_config(config_file=path, client_configuration=cfg)
    return cfg


def _runtime(memo) -> Runtime | None:
    return getattr(memo, "runtime", None)


@kopf.on.login(registry=registry)
def login(memo: kopf.Memo, **_) -> kopf.ConnectionInfo:
    """kopf talks to the same endpoint, with the same credentials, as the operator's own client."""
    options = getattr(memo, "options", None) or RunOptions.from_env()
    cfg = kube_configuration(options)
    token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    scheme, _, value = (token or "").partition(" ")
    if token and not value:
        scheme, value = "Bearer", token
    return kopf.ConnectionInfo(
        server=cfg.host, scheme=scheme or None, token=value or None, insecure=not cfg.verify_ssl,
        ca_path=cfg.ssl_ca_cert, certificate_path=cfg.cert_file, private_key_path=cfg.key_file,
        username=cfg.username or None, password=cfg.password or None, expiration=None)


@kopf.on.startup(registry=registry)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, variant_autoscalings: kopf.Index,
                  **_) -> None:
    options = getattr(memo, "options", None) or RunOptions.from_env()
    if options.priority is not None:
        settings.peering.priority = options.priority
    elif settings.peering.priority == 0:
        settings.peering.priority = random.randint(1, 2**30)
    settings.posting.enabled = False  # our Events are written by the controller, one per change
    settings.watching.reconnect_backoff = 1.0
    settings.watching.server_timeout = 300
    if options.namespaces:
        # Namespaced mode needs nothing cluster-wide: kopf finds the CRD once through discovery (/apis,
        # open to every authenticated user) instead of watching CustomResourceDefinitions, and takes the
        # given names as they are instead of listing Namespaces. A CRD installed after the operator
        # started is seen on its next restart.
        settings.scanning.disabled = True
    runtime = Runtime(options, settings, identity=getattr(memo, "identity", None))
    settings.networking.error_backoffs = RetryForever(options.api_error_backoffs_s, on_retry=runtime.note_api_retry)
    runtime.index = variant_autoscalings
    memo.runtime = runtime
    await runtime.start()


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: kopf.Memo, **_) -> None:
    runtime = _runtime(memo)
    if runtime is not None:
        await runtime.stop()


@kopf.index(GROUP, VERSION, PLURAL, registry=registry)
async def variant_autoscalings(namespace, name, body, meta, memo: kopf.Memo, **_):
    """(namespace, name) -> the resource as last seen: the cycle's global view; a spec change wakes it."""
    runtime = _runtime(memo)
    if runtime is not None:
        runtime.note_generation(namespace, name, meta.get("generation"))
    return {(namespace, name): copy.deepcopy(dict(body))}


@kopf.on.probe(id="control_loop", registry=registry)
def control_loop_probe(memo: kopf.Memo, **_) -> dict:
    runtime = _runtime(memo)
    if runtime is None:
        return {"started": False}
    report = runtime.last_report
    return {"started": True, "active": runtime.active,
            "last_cycle_ok": report.ok if report else None,
            "last_cycle_at": report.started_at if report else None}

