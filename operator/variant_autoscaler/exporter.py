"""The operator's `/metrics`: what it decided, how loaded each variant is, and how healthy the loop is.

Why a snapshot: a request scheduler, an HPA or KEDA reads these series between two cycles, so a
scrape must never see half of one decision and half of the next, nor series of variants that are
gone. Every cycle therefore hands one immutable `DecisionSnapshot` to `Exporter.publish`, and a
custom collector renders the decision gauges from the latest snapshot only. Histograms and counters
(optimizer duration, cycle errors, scaling actions) accumulate as ordinary prometheus_client
objects on the same private registry.

Served as the plain text exposition format (`text/plain; version=0.0.4`), which every Prometheus
and the KEDA Prometheus scaler parse; the WVA-compatible `wva_*` gauges keep existing llm-d
HPA/KEDA objects working unchanged.

Metric names (all gauges unless noted; label sets in brackets):

- `variant_autoscaler_desired_replicas` [namespace, variant, model, accelerator, role]: replicas the
  optimizer decided, after the transition planner (what direct mode writes to the scale subresource).
- `variant_autoscaler_optimal_replicas` [same]: the optimizer's unconstrained target before
  stabilization, make-before-break and max-change limits.
- `variant_autoscaler_current_replicas` / `variant_autoscaler_ready_replicas` [same]: the target's
  replicas and ready replicas as last read.
- `variant_autoscaler_variant_normalized_load` [same]: demand routed to the variant / (ready replicas x
  capacity per replica at SLO); 1.0 = at SLO capacity.
- `variant_autoscaler_capacity_per_replica_rps` [same]: requests/s one replica serves at SLO for the
  observed request mix.
- `variant_autoscaler_metrics_available` [same]: 1 when live metrics for the variant's model were
  collected this cycle, else 0.
- `variant_autoscaler_model_normalized_load` [model]: the model's demand / capacity at SLO of its ready
  replicas (all variants together).
- `variant_autoscaler_model_arrival_rate_rps` [model]: observed requests/s.
- `variant_autoscaler_model_planned_arrival_rate_rps` [model]: requests/s the optimizer planned for: the
  forecast one lead time ahead with its error headroom (settings `forecast`), never below the observed.
- `variant_autoscaler_unmet_demand_rps` [model]: demand the decided allocation cannot serve at SLO.
- `variant_autoscaler_pool_saturation` [namespace, inference_pool, stage (prefill|decode|effective)]: the
  llm-d router flow-control contract (`variant_autoscaler.saturation`): routed demand / SLO capacity of
  the pool's ready replicas; >= 1.0 means stop dispatching; 1.0 when the pool's metrics are stale.
- `variant_autoscaler_routing_weight` [model, bucket, namespace, variant]: share of the model's
  requests of one length bucket to send to a variant. `bucket` names a fixed cell by its histogram
  edges (`in200-500xout20-50`, see histogram_estimates), so a series keeps its key across cycles.
- `variant_autoscaler_inventory_in_use` / `variant_autoscaler_inventory_available` [accelerator]:
  accelerators the decision uses / the cluster has (no series when unlimited).
- `variant_autoscaler_cost_per_hour`: cost of the decided allocation.
- `variant_autoscaler_optimizer_gap_ratio`: proven optimality gap of the decided allocation, (objective - proven lower bound) / objective: 0.01 means no plan is more than 1 % cheaper (target: the optimizer's `relative_gap`); no series before the first allocation.
- `variant_autoscaler_optimizer_warm_start`: 1 when the cycle's allocation started warm, from the previous cycle's inventory prices, per-model results and plan (optimizer.allocation_warm), 0 for a cold start (the first cycle, after a restart, and always on fleets of up to 60 variants, which one MILP solves whole).
- `variant_autoscaler_homogeneous_cost_per_hour` [accelerator]: cost of the cheapest allocation that
  meets the same demand on one accelerator type only (the label names it); the dashboard's baseline.
- `variant_autoscaler_slo_target_seconds` / `variant_autoscaler_observed_latency_seconds` [model,
  objective (ttft|itl), percentile]: a model's latency target and the latency observed at that
  percentile over the collection window; observed <= target means the SLO is attained.
- `variant_autoscaler_last_successful_cycle_timestamp_seconds`: Unix time of the last complete cycle.
- `variant_autoscaler_active`: 1 on the operator replica that runs the loop (kopf peering), else 0.
- `variant_autoscaler_optimizer_duration_seconds` (histogram): capacity table + allocation time.
- `variant_autoscaler_cycle_duration_seconds` (histogram): one whole cycle.
- `variant_autoscaler_cycle_errors_total` (counter) [reason]: failed or degraded cycles by cause.
- `variant_autoscaler_scaling_actions_total` (counter) [namespace, variant, direction]: replica
  changes written to targets.
- `wva_desired_replicas`, `wva_current_replicas`, `wva_desired_ratio` [variant_name, namespace,
  accelerator_type]: llm-d WVA-compatible; the ratio is desired / current, or desired when current is 0.
- `wva_replica_scaling_total` (counter) [variant_name, namespace, direction, reason, accelerator_type]:
  llm-d WVA-compatible count of the replica changes written (reason ScaledUp / ScaledDown).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel, ConfigDict, Field

from variant_autoscaler.saturation import PoolSaturation

PREFIX = "variant_autoscaler_"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
VARIANT_LABELS = ("namespace", "variant", "model", "accelerator", "role")
WVA_LABELS = ("variant_name", "namespace", "accelerator_type")
OPTIMIZER_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
CYCLE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)

METRIC_NAMES: tuple[str, ...] = (
    f"{PREFIX}desired_replicas",
    f"{PREFIX}optimal_replicas",
    f"{PREFIX}current_replicas",
    f"{PREFIX}ready_replicas",
    f"{PREFIX}variant_normalized_load",
    f"{PREFIX}capacity_per_replica_rps",
    f"{PREFIX}metrics_available",
    f"{PREFIX}model_normalized_load",
    f"{PREFIX}model_arrival_rate_rps",
    f"{PREFIX}model_planned_arrival_rate_rps",
    f"{PREFIX}unmet_demand_rps",
    f"{PREFIX}pool_saturation",
    f"{PREFIX}routing_weight",
    f"{PREFIX}inventory_in_use",
    f"{PREFIX}inventory_available",
    f"{PREFIX}cost_per_hour",
    f"{PREFIX}optimizer_gap_ratio",
    f"{PREFIX}optimizer_warm_start",
    f"{PREFIX}homogeneous_cost_per_hour",
    f"{PREFIX}slo_target_seconds",
    f"{PREFIX}observed_latency_seconds",
    f"{PREFIX}last_successful_cycle_timestamp_seconds",
    f"{PREFIX}active",
    f"{PREFIX}optimizer_duration_seconds",
    f"{PREFIX}cycle_duration_seconds",
    f"{PREFIX}cycle_errors_total",
    f"{PREFIX}scaling_actions_total",
    "wva_desired_replicas",
    "wva_current_replicas",
    "wva_desired_ratio",
    "wva_replica_scaling_total",
)
"""Every family name the exporter serves (histograms add _bucket/_sum/_count on the wire)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VariantReading(_Frozen):
    """One VariantAutoscaling as decided in a cycle."""

    namespace: str
    name: str
    model: str
    accelerator: str
    role: str = "both"
    current_replicas: int = Field(ge=0)
    ready_replicas: int = Field(ge=0)
    desired_replicas: int = Field(ge=0, description="After the transition planner.")
    optimal_replicas: int | None = Field(default=None, ge=0, description="Before the transition planner.")
    normalized_load: float | None = Field(default=None, ge=0)
    capacity_per_replica_rps: float | None = Field(default=None, ge=0)
    metrics_available: bool = True


class ModelReading(_Frozen):
    model: str
    arrival_rate_rps: float | None = Field(default=None, ge=0)
    planned_arrival_rate_rps: float | None = Field(default=None, ge=0, description="What the optimizer planned for.")
    normalized_load: float | None = Field(default=None, ge=0)
    unmet_demand_rps: float = Field(default=0.0, ge=0)
    slo_percentile: float = Field(default=90.0, gt=0, lt=100, description="Percentile the SLO targets apply at.")
    slo_ttft_s: float | None = Field(default=None, gt=0)
    slo_itl_s: float | None = Field(default=None, gt=0)
    observed_ttft_s: float | None = Field(default=None, ge=0, description="Observed TTFT at slo_percentile.")
    observed_itl_s: float | None = Field(default=None, ge=0, description="Observed ITL at slo_percentile.")


class RoutingWeight(_Frozen):
    model: str
    bucket: str
    namespace: str
    variant: str
    weight: float = Field(ge=0, le=1.000001)


class AcceleratorUse(_Frozen):
    accelerator: str
    in_use: int = Field(ge=0, description="Accelerators the decision occupies (replicas x per replica).")
    available: int | None = Field(default=None, ge=0, description="None = unlimited.")


class DecisionSnapshot(_Frozen):
    """Everything the decision gauges show, from one cycle."""

    variants: list[VariantReading] = Field(default_factory=list)
    models: list[ModelReading] = Field(default_factory=list)
    routing: list[RoutingWeight] = Field(default_factory=list)
    pools: list[PoolSaturation] = Field(default_factory=list)
    accelerators: list[AcceleratorUse] = Field(default_factory=list)
    cost_per_hour: float | None = Field(default=None, ge=0)
    optimizer_gap: float | None = Field(default=None, ge=0, description="Proven gap of the allocation.")
    optimizer_warm_start: bool | None = Field(default=None, description="The allocation started warm.")
    homogeneous_cost_per_hour: float | None = Field(
        default=None, ge=0, description="Cheapest allocation meeting the same demand on one accelerator type.")
    homogeneous_accelerator: str | None = Field(default=None, description="The type that baseline uses.")


def wva_desired_ratio(desired: int, current: int) -> float:
    """llm-d WVA's definition: desired / current, and desired itself when nothing runs yet."""
    return float(desired) if current == 0 else desired / current


class _SnapshotCollector:
    """Renders the gauges of the latest snapshot; swapped atomically by `Exporter.publish`."""

    def __init__(self, exporter: Exporter):
        self._exporter = exporter

    def describe(self):
        return []

    def collect(self):
        snap, last_ok, active = self._exporter._state()
        labels = list(VARIANT_LABELS)

        def family(name: str, doc: str, names=labels) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(names))

        desired = family(f"{PREFIX}desired_replicas", "Replicas decided for the variant, after the transition planner.")
        optimal = family(f"{PREFIX}optimal_replicas", "Optimizer target before stabilization and make-before-break.")
        current = family(f"{PREFIX}current_replicas", "Replicas the scale target has.")
        ready = family(f"{PREFIX}ready_replicas", "Ready replicas of the scale target.")
        vload = family(f"{PREFIX}variant_normalized_load",
                       "Demand routed to the variant / capacity at SLO of its ready replicas (1.0 = at SLO capacity).")
        cap = family(f"{PREFIX}capacity_per_replica_rps", "Requests/s one replica serves at SLO for the observed mix.")
        avail = family(f"{PREFIX}metrics_available", "1 when live metrics for the variant's model were collected.")
        wdes = family("wva_desired_replicas", "Desired replicas per variant (llm-d WVA compatible).", WVA_LABELS)
        wcur = family("wva_current_replicas", "Current replicas per variant (llm-d WVA compatible).", WVA_LABELS)
        wratio = family("wva_desired_ratio", "Desired / current replicas (desired when current is 0).", WVA_LABELS)
        for v in snap.variants:
            key = [v.namespace, v.name, v.model, v.accelerator, v.role]
            desired.add_metric(key, v.desired_replicas)
            optimal.add_metric(key, v.desired_replicas if v.optimal_replicas is None else v.optimal_replicas)
            current.add_metric(key, v.current_replicas)
            ready.add_metric(key, v.ready_replicas)
            if v.normalized_load is not None:
                vload.add_metric(key, v.normalized_load)
            if v.capacity_per_replica_rps is not None:
                cap.add_metric(key, v.capacity_per_replica_rps)
            avail.add_metric(key, 1.0 if v.metrics_available else 0.0)
            wkey = [v.name, v.namespace, v.accelerator]
            wdes.add_metric(wkey, v.desired_replicas)
            wcur.add_metric(wkey, v.current_replicas)
            wratio.add_metric(wkey, wva_desired_ratio(v.desired_replicas, v.current_replicas))

        mload = family(f"{PREFIX}model_normalized_load",
                       "Model demand / capacity at SLO of its ready replicas (1.0 = at SLO capacity).", ["model"])
        rate = family(f"{PREFIX}model_arrival_rate_rps", "Observed requests/s of the model.", ["model"])
        planned = family(f"{PREFIX}model_planned_arrival_rate_rps",
                         "Requests/s the optimizer planned the model for (forecast one lead time ahead).", ["model"])
        unmet = family(f"{PREFIX}unmet_demand_rps", "Demand the decided allocation cannot serve at SLO.", ["model"])
        slo_names = ["model", "objective", "percentile"]
        target = family(f"{PREFIX}slo_target_seconds", "Latency target of the model at the SLO percentile.",
                        slo_names)
        observed = family(f"{PREFIX}observed_latency_seconds",
                          "Latency observed at the SLO percentile over the collection window.", slo_names)
        for m in snap.models:
            if m.normalized_load is not None:
                mload.add_metric([m.model], m.normalized_load)
            if m.arrival_rate_rps is not None:
                rate.add_metric([m.model], m.arrival_rate_rps)
            if m.planned_arrival_rate_rps is not None:
                planned.add_metric([m.model], m.planned_arrival_rate_rps)
            unmet.add_metric([m.model], m.unmet_demand_rps)
            pct = f"{m.slo_percentile:g}"
            for objective, goal, seen in (("ttft", m.slo_ttft_s, m.observed_ttft_s),
                                          ("itl", m.slo_itl_s, m.observed_itl_s)):
                if goal is not None:
                    target.add_metric([m.model, objective, pct], goal)
                if seen is not None:
                    observed.add_metric([m.model, objective, pct], seen)

        routing = family(f"{PREFIX}routing_weight", "Share of a model's requests of one length bucket for a variant.",
                         ["model", "bucket", "namespace", "variant"])
        for r in snap.routing:
            routing.add_metric([r.model, r.bucket, r.namespace, r.variant], r.weight)

        saturation = family(f"{PREFIX}pool_saturation",
                            "Routed demand / SLO capacity of the pool's ready replicas, per stage (llm-d router "
                            "flow control: >= 1 stop dispatching; 1 when stale).", ["namespace", "inference_pool", "stage"])
        for s in snap.pools:
            saturation.add_metric([s.namespace, s.pool, s.stage], s.saturation)

        in_use = family(f"{PREFIX}inventory_in_use", "Accelerators the decision occupies.", ["accelerator"])
        have = family(f"{PREFIX}inventory_available", "Accelerators the cluster has (absent = unlimited).",
                      ["accelerator"])
        for a in snap.accelerators:
            in_use.add_metric([a.accelerator], a.in_use)
            if a.available is not None:
                have.add_metric([a.accelerator], a.available)

        cost = GaugeMetricFamily(f"{PREFIX}cost_per_hour", "Cost per hour of the decided allocation.")
        if snap.cost_per_hour is not None:
            cost.add_metric([], snap.cost_per_hour)
        gap = GaugeMetricFamily(f"{PREFIX}optimizer_gap_ratio",
                                "Proven optimality gap of the decided allocation, (objective - bound) / objective.")
        if snap.optimizer_gap is not None:
            gap.add_metric([], snap.optimizer_gap)
        warm = GaugeMetricFamily(f"{PREFIX}optimizer_warm_start",
                                 "1 when the allocation started from the previous cycle's prices, columns and plan.")
        if snap.optimizer_warm_start is not None:
            warm.add_metric([], 1.0 if snap.optimizer_warm_start else 0.0)
        baseline = GaugeMetricFamily(f"{PREFIX}homogeneous_cost_per_hour",
                                     "Cost per hour of the cheapest single-accelerator-type allocation for the "
                                     "same demand.", labels=["accelerator"])
        if snap.homogeneous_cost_per_hour is not None:
            baseline.add_metric([snap.homogeneous_accelerator or ""], snap.homogeneous_cost_per_hour)
        last = GaugeMetricFamily(f"{PREFIX}last_successful_cycle_timestamp_seconds",
                                 "Unix time of the last cycle that completed without error.")
        if last_ok is not None:
            last.add_metric([], last_ok)
        act = GaugeMetricFamily(f"{PREFIX}active", "1 on the operator replica that runs the control loop.")
        act.add_metric([], 1.0 if active else 0.0)
        yield from (desired, optimal, current, ready, vload, cap, avail, mload, rate, planned, unmet, target, observed,
                    routing, saturation, in_use, have, cost, gap, warm, baseline, last, act, wdes, wcur, wratio)


class Exporter:
    """The operator's metrics on a private registry (never the process-global one)."""

    def __init__(self) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self._lock = threading.Lock()
        self._snapshot = DecisionSnapshot()
        self._last_success: float | None = None
        self._active = False
        self.optimizer_duration = Histogram(
            f"{PREFIX}optimizer_duration_seconds", "Time to build the capacity table and solve the allocation.",
            buckets=OPTIMIZER_BUCKETS_S, registry=self.registry)
        self.cycle_duration = Histogram(
            f"{PREFIX}cycle_duration_seconds", "Time of one whole control cycle (collect to export).",
            buckets=CYCLE_BUCKETS_S, registry=self.registry)
        self.cycle_errors = Counter(
            f"{PREFIX}cycle_errors", "Failed or degraded cycles, by cause.", ["reason"], registry=self.registry)
        self.scaling_actions = Counter(
            f"{PREFIX}scaling_actions", "Replica changes written to scale targets.",
            ["namespace", "variant", "direction"], registry=self.registry)
        self.wva_scaling = Counter(
            "wva_replica_scaling", "Replica scaling operations per variant (llm-d WVA compatible).",
            ["variant_name", "namespace", "direction", "reason", "accelerator_type"], registry=self.registry)
        self.registry.register(_SnapshotCollector(self))

    def _state(self) -> tuple[DecisionSnapshot, float | None, bool]:
        with self._lock:
            return self._snapshot, self._last_success, self._active

    def publish(self, snapshot: DecisionSnapshot, *, success: bool = True, at: float | None = None) -> None:
        """Replace the decision gauges; a successful cycle also moves the last-success timestamp."""
        with self._lock:
            self._snapshot = snapshot
            if success:
                self._last_success = time.time() if at is None else at

    @property
    def snapshot(self) -> DecisionSnapshot:
        return self._state()[0]

    def set_active(self, active: bool) -> None:
        with self._lock:
            self._active = active

    def count_error(self, reason: str) -> None:
        self.cycle_errors.labels(reason=reason).inc()

    def count_scaling(self, namespace: str, variant: str, direction: str, *, reason: str = "",
                      accelerator: str = "") -> None:
        self.scaling_actions.labels(namespace=namespace, variant=variant, direction=direction).inc()
        self.wva_scaling.labels(variant_name=variant, namespace=namespace, direction=direction, reason=reason,
                                accelerator_type=accelerator).inc()

    def render(self) -> bytes:
        """The plain text exposition (version 0.0.4) of every metric."""
        return generate_latest(self.registry)


class MetricsServer:
    """`/metrics` (and `/healthz`) over aiohttp in the operator's own event loop."""

    def __init__(self, exporter: Exporter, *, host: str = "127.0.0.1", port: int = 0,
                 ready: Callable[[], tuple[bool, str]] | None = None):
        self.exporter = exporter
        self.host = host
        self.port = port
        self.ready = ready or (lambda: (True, "serving /metrics"))
        self.url = ""
        self._runner = None

    async def start(self) -> MetricsServer:
        from aiohttp import web

        async def metrics(_request):
            return web.Response(body=self.exporter.render(), headers={"Content-Type": CONTENT_TYPE})

        async def health(_request):
            """Readiness: 200 only while the control loop is alive (see Runtime.readiness), else 503."""
            ok, why = self.ready()
            return web.Response(text=f"{'ok' if ok else 'not ready'}: {why}\n", status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
