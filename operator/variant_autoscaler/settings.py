"""Cluster-wide operator settings: inventory and prices, models, SLO defaults, loop timing, actuation.

Why one pydantic model read from a ConfigMap: a platform team tunes the operator (a new GPU pool,
a price change, a longer scale-down window) without a redeploy, and a typo in that ConfigMap must
not take the autoscaler down. So settings are validated as a whole; an invalid update is reported
(log, Event, `variant_autoscaler_cycle_errors_total{reason="InvalidSettings"}`) and the last good
settings stay in force (`SettingsStore`); a missing key or an empty value is such an error, and
defaults are never a "last good" (no cycle runs until the ConfigMap first gives valid settings).

Sources, in order: `--settings FILE` (or $VARIANT_AUTOSCALER_SETTINGS_FILE), else the key
`settings.yaml` of the ConfigMap named by `--settings-configmap` / $VARIANT_AUTOSCALER_SETTINGS_CONFIGMAP
in the operator's namespace ($VARIANT_AUTOSCALER_NAMESPACE or $POD_NAMESPACE), else defaults.

Accelerator inventory can also be discovered from nodes (`discover_inventory: true`): the label
`nvidia.com/gpu.product` names the type and `status.allocatable["nvidia.com/gpu"]` counts them.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from optimizer import input_limits as lim
from optimizer.datasheet import DATASHEETS, MODEL_FACTS, ModelFacts
from optimizer.fleet import Accelerator, ModelSpec
from optimizer.planned_rate import DEFAULT_ERROR_Z
from optimizer.problem import AllocationOptions, InputError, format_validation_error, read_document, read_text
from optimizer.workload import SLO, LengthBucket
from variant_autoscaler.collector import PrometheusSettings

SETTINGS_KEY = "settings.yaml"
ENV_FILE = "VARIANT_AUTOSCALER_SETTINGS_FILE"
ENV_CONFIGMAP = "VARIANT_AUTOSCALER_SETTINGS_CONFIGMAP"
ENV_NAMESPACE = "VARIANT_AUTOSCALER_NAMESPACE"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"


class _Strict(BaseModel):
    model_config = lim.STRICT


class AcceleratorSettings(_Strict):
    """One accelerator type: its price and how many the cluster has."""

    name: str = Field(min_length=1, description="As VariantAutoscaling spec.accelerator names it (H100, L4...).")
    cost_per_hour: float = Field(
        ge=0, le=lim.MAX_PRICE_PER_HOUR, description="Price of one accelerator for one hour."
    )
    available: int | None = Field(
        default=None, ge=0, le=lim.MAX_ACCELERATORS, description="How many exist; None: unlimited or discovered."
    )
    memory_gb: float | None = Field(
        default=None, gt=0, le=lim.MAX_MEMORY_GB, description="Default: the datasheet value for known types."
    )
    product_labels: list[str] = Field(
        default_factory=list, description=f"Values of the node label {GPU_PRODUCT_LABEL} that are this type.")

    @model_validator(mode="after")
    def _memory_known(self) -> AcceleratorSettings:
        if self.memory_gb is None and self.name not in DATASHEETS:
            raise ValueError(f"memory_gb is required for {self.name!r} (no datasheet; known: {sorted(DATASHEETS)})")
        return self

    def to_accelerator(self, available: int | None = None) -> Accelerator:
        sheet = DATASHEETS.get(self.name)
        have = self.available if self.available is not None else available
        return Accelerator(
            name=self.name, memory_gb=self.memory_gb or sheet.memory_gb, cost_per_hour=self.cost_per_hour,
            available=have, power_w=sheet.power_w if sheet else None,
            memory_bandwidth_gb_s=sheet.memory_bandwidth_gb_s if sheet else None,
            peak_tflops=sheet.peak_tflops if sheet else None,
        )


class SloSettings(_Strict):
    ttft_s: float = Field(gt=0, le=lim.MAX_DURATION_S)
    itl_s: float = Field(gt=0, le=lim.MAX_DURATION_S)
    e2e_s: float | None = Field(default=None, gt=0, le=lim.MAX_DURATION_S)
    percentile: float = Field(default=90.0, gt=0, lt=100)

    def for_model(self, model: str) -> SLO:
        return SLO(model=model, ttft_s=self.ttft_s, itl_s=self.itl_s, e2e_s=self.e2e_s, percentile=self.percentile)


def architecture_of(model_id: str) -> ModelFacts | None:
    """The known architecture a model ID names, e.g. meta-llama/Llama-3.1-8B-Instruct -> Llama-3.1-8B."""
    lowered = model_id.lower()
    for key in sorted(MODEL_FACTS, key=len, reverse=True):
        if key.lower() in lowered:
            return MODEL_FACTS[key]
    return None


class ModelSettings(_Strict):
    """Facts about one served model (the VariantAutoscaling modelID) that sizing needs."""

    name: str = Field(min_length=1, description="modelID, e.g. meta-llama/Llama-3.1-8B-Instruct.")
    architecture: str | None = Field(
        default=None, description=f"Known architecture for weights/KV size and datasheet profiles: {sorted(MODEL_FACTS)}.")
    weight_gb: float | None = Field(default=None, gt=0, le=lim.MAX_WEIGHT_GB)
    kv_bytes_per_token: float | None = Field(default=None, gt=0, le=lim.MAX_BYTES_PER_TOKEN)
    slo: SloSettings | None = None
    priority: float = Field(default=1.0, ge=lim.MIN_PRIORITY, le=lim.MAX_PRIORITY)
    length_mix: list[LengthBucket] | None = Field(
        default=None, description="Request-length mix to size for when the metrics show none yet.")
    lead_time_s: float | None = Field(
        default=None, ge=0, le=lim.MAX_DURATION_S,
        description="This model's forecast lead time (its replicas' cold start); default forecast_lead_time_s.")

    @model_validator(mode="after")
    def _facts(self) -> ModelSettings:
        if self.architecture is not None and self.architecture not in MODEL_FACTS:
            raise ValueError(f"unknown architecture {self.architecture!r} (known: {sorted(MODEL_FACTS)})")
        explicit = self.weight_gb is not None and self.kv_bytes_per_token is not None
        if self.architecture is None and not explicit and architecture_of(self.name) is None:
            raise ValueError(f"{self.name!r} names no known architecture: give architecture "
                             f"({sorted(MODEL_FACTS)}), or both weight_gb and kv_bytes_per_token")
        return self


class OperatorSettings(_Strict):
    """Everything the control loop needs that is not in a VariantAutoscaling."""

    interval_s: float = Field(default=30.0, gt=0, le=3600, description="Seconds between optimization cycles.")
    prometheus: PrometheusSettings = Field(
        default_factory=lambda: PrometheusSettings(url="http://prometheus-operated.monitoring.svc:9090"))
    rate_window_s: float = Field(
        default=60.0, ge=2, le=lim.MAX_DURATION_S, description="Window of the rates the collector reads."
    )
    staleness_threshold_s: float = Field(
        default=60.0, gt=0, le=lim.MAX_DURATION_S, description="Metrics older than this are stale."
    )
    variant_label: str | None = Field(default=None, description="Series label naming the variant, if scraped.")
    actuation_mode: Literal["direct", "metrics"] = Field(
        default="direct", description="direct: write the scale subresource; metrics: only publish for an HPA/KEDA.")
    scale_up_window_s: float = Field(
        default=0.0, ge=0, le=lim.MAX_DURATION_S, description="HPA-style scale-up stabilization window."
    )
    scale_down_window_s: float = Field(
        default=60.0, ge=0, le=lim.MAX_DURATION_S,
        description="HPA-style scale-down stabilization window. 60 s is what the simulator's figures are "
                    "measured with (with the forecast leading rises); the HPA's 300 s cost the default demo "
                    "$57.85 instead of $48.39 at the same attainment.")
    max_change_per_cycle: int | None = Field(
        default=None, gt=0, le=lim.MAX_REPLICAS, description="Most replicas one variant moves per cycle."
    )
    watched_namespaces: list[str] = Field(default_factory=list, description="Empty: all namespaces.")
    annotation_mode: bool = Field(
        default=False, description="Also manage KEDA ScaledObjects and autoscaling/v2 HPAs marked with the "
                                   "llm-d-autoscaling v0.9 annotations (llm-d.ai/managed: \"true\"); needs list on "
                                   "keda.sh scaledobjects and autoscaling horizontalpodautoscalers.")
    accelerators: list[AcceleratorSettings] = Field(default_factory=list)
    discover_inventory: bool = Field(default=False, description="Count accelerators from node labels/allocatable.")
    models: list[ModelSettings] = Field(default_factory=list)
    default_slo: SloSettings | None = Field(
        default=None, description="SLO of models that set none in their VariantAutoscalings or models.")
    default_length_mix: list[LengthBucket] = Field(
        default_factory=lambda: [LengthBucket(input_tokens=512, output_tokens=256, share=1.0)],
        description="Mix to size for before any traffic is observed.")
    default_max_batch: int = Field(
        default=256, gt=0, le=lim.MAX_BATCH, description="maxBatch of variants that set none."
    )
    change_penalty: float = Field(
        default=0.0, ge=0, le=lim.MAX_PRICE_PER_HOUR, description="Cost per hour charged per replica changed."
    )
    kv_transfer_gb_s: float = Field(
        default=25.0, gt=0, le=lim.MAX_BANDWIDTH_GB_S, description="P->D KV-cache link bandwidth, GB/s."
    )
    service_level: float = Field(default=1.0, gt=0, le=1, description="Share of SLO capacity to plan for.")
    forecast: bool = Field(
        default=True, description="Plan each model on a Kalman forecast of its arrival rate one lead time ahead, "
                                  "times the headroom its own recorded errors ask for, never below the rate measured "
                                  "now (optimizer.planned_rate: what the simulator's `ours` runs). Off: the measured rate.")
    forecast_lead_time_s: float = Field(
        default=120.0, ge=0, le=lim.MAX_DURATION_S,
        description="Seconds from a scale-up to a ready replica (scheduling, image pull, weights load): how far "
                    "ahead the forecast plans. Per model: models[].lead_time_s.")
    forecast_error_z: float | None = Field(
        default=DEFAULT_ERROR_Z, ge=0, le=5,
        description="Spread of the forecast's recorded errors one lead time ahead that the plan covers (beyond "
                    "Poisson noise); null: the forecast's path alone.")
    optimizer_time_limit_s: float = Field(
        default=AllocationOptions.model_fields["time_limit_s"].default, gt=0, le=lim.MAX_TIME_LIMIT_S,
        description="Allocation solver budget, the optimizer's own default (2 s). A cycle after the first starts "
                    "warm from the last one and stops once the gap is proven, well before the limit on a steady "
                    "fleet (the 1,000-variant cycle aims at <= 2 s).")
    online_profile_fit: bool = Field(default=True, description="Fit profiles from metrics for variants without one.")
    api_retries: int = Field(default=5, ge=0, le=20, description="Retries of a Kubernetes API call on 409/5xx.")
    api_backoff_s: float = Field(
        default=0.2, gt=0, le=lim.MAX_DURATION_S, description="First retry delay; doubles, capped at 5 s."
    )

    @model_validator(mode="after")
    def _unique(self) -> OperatorSettings:
        for field, names in (("accelerators", [a.name for a in self.accelerators]),
                             ("models", [m.name for m in self.models])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{field}: duplicate name(s) {dupes}")
        for ns in self.watched_namespaces:
            if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", ns):
                raise ValueError(f"watched_namespaces: {ns!r} is not a valid namespace name")
        if self.annotation_mode and self.actuation_mode != "metrics":
            # KEDA scales an annotated ScaledObject's target; writing its replicas as well would fight it
            raise ValueError("annotation_mode: needs actuation_mode: metrics (KEDA scales the targets of "
                             "annotated ScaledObjects from variant_autoscaler_desired_replicas)")
        return self

    def accelerator(self, name: str) -> AcceleratorSettings | None:
        return next((a for a in self.accelerators if a.name == name), None)

    def model(self, name: str) -> ModelSettings | None:
        return next((m for m in self.models if m.name == name), None)

    def model_spec(self, model_id: str) -> ModelSpec | None:
        """Weights and KV size of a model: from its settings entry, else a known architecture in its ID."""
        entry = self.model(model_id)
        if entry is not None and entry.weight_gb is not None and entry.kv_bytes_per_token is not None:
            return ModelSpec(name=model_id, weight_gb=entry.weight_gb, kv_bytes_per_token=entry.kv_bytes_per_token)
        facts = MODEL_FACTS.get(entry.architecture) if entry and entry.architecture else architecture_of(model_id)
        if facts is None:
            return None
        spec = facts.model_spec()
        return spec.model_copy(update={"name": model_id})

    def model_facts(self, model_id: str) -> ModelFacts | None:
        entry = self.model(model_id)
        if entry is not None and entry.architecture:
            return MODEL_FACTS[entry.architecture]
        return architecture_of(model_id)


def parse_settings(data: object, source: str) -> OperatorSettings:
    """Validate a settings mapping; any problem becomes one InputError naming source and field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(source, "", f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        return OperatorSettings.model_validate(data)
    except ValidationError as err:
        problems = format_validation_error(err)
        field, reason = problems[0]
        if len(problems) > 1:
            reason += f" (and {len(problems) - 1} more error{'s' if len(problems) > 2 else ''})"
        raise InputError(source, field, reason) from None


def load_settings_file(path: str | Path) -> OperatorSettings:
    if Path(path).suffix == ".json":
        return parse_settings(read_document(path), str(path))
    return parse_settings(_settings_yaml(read_text(path), str(path)), str(path))


def _settings_yaml(text: str, source: str) -> object:
    """Settings YAML; a syntax error is described by position only: quoting the offending line (as
    PyYAML does) would put a bearer token or a password in the logs."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        what = "; ".join(str(x) for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(source, "", f"not valid YAML{where}: {what or type(exc).__name__}") from None


def settings_from_configmap(configmap: dict, key: str = SETTINGS_KEY) -> OperatorSettings:
    """Settings from a ConfigMap object (as a dict). A missing key (renamed?) or an empty value is an
    error, not defaults: silently switching to the built-in Prometheus URL and inventory would
    leave every VA ModelUnknown. (An empty mapping, `{}`, is a deliberate "all defaults".)"""
    meta = configmap.get("metadata") or {}
    source = f"configmap {meta.get('namespace', '?')}/{meta.get('name', '?')} key {key}"
    data = configmap.get("data") or {}
    text = data.get(key)
    if text is None:
        has = f"it has {sorted(data)}" if data else "it has no data"
        raise InputError(source, "", f"missing ({has}); the settings must be under the key {key!r}")
    if not text.strip():
        raise InputError(source, "", "empty; write `{}` for all defaults")
    return parse_settings(_settings_yaml(text, source), source)


@dataclass(frozen=True)
class SettingsSource:
    """Where settings come from: a file, or a ConfigMap in the operator's namespace, or nowhere."""

    file: Path | None = None
    configmap: str | None = None
    namespace: str = "default"

    @classmethod
    def from_env(cls, file: str | None = None, configmap: str | None = None, namespace: str | None = None,
                 environ: Mapping[str, str] | None = None) -> SettingsSource:
        env = os.environ if environ is None else environ
        file = file or env.get(ENV_FILE)
        configmap = configmap or env.get(ENV_CONFIGMAP)
        namespace = namespace or env.get(ENV_NAMESPACE) or env.get("POD_NAMESPACE") or "default"
        return cls(file=Path(file) if file else None, configmap=configmap, namespace=namespace)


class SettingsStore:
    """The settings in force, and the error of the last rejected update (if any).

    An invalid update never replaces good settings: `update` returns the error and `current` stays.
    """

    def __init__(self, initial: OperatorSettings | None = None, *, loaded: bool = True):
        self._lock = threading.Lock()
        self._current = initial or OperatorSettings()
        self.last_error: str | None = None
        self.generation = 0
        self.loaded = loaded  # False until a ConfigMap source gave valid settings: defaults are no "last good"

    @property
    def current(self) -> OperatorSettings:
        with self._lock:
            return self._current

    def replace(self, settings: OperatorSettings) -> None:
        with self._lock:
            self._current = settings
            self.last_error = None
            self.generation += 1
            self.loaded = True

    def update_from_configmap(self, configmap: dict, key: str = SETTINGS_KEY) -> str | None:
        """Apply a ConfigMap; returns None when applied, else the reason it was rejected."""
        try:
            settings = settings_from_configmap(configmap, key)
        except InputError as err:
            return self.reject(str(err))
        self.replace(settings)
        return None

    def reject(self, error: str) -> str:
        """Record why the source's settings cannot be used; the current ones stay."""
        with self._lock:
            self.last_error = error
        return error


def inventory_from_nodes(nodes: list[dict], accelerators: list[AcceleratorSettings]) -> dict[str, int]:
    """Accelerators per type from Node objects: the GPU product label and allocatable nvidia.com/gpu.

    A product label matches a type when it is listed in that type's `product_labels`, or else when
    the type's name appears in it as a word (NVIDIA-H100-80GB-HBM3 -> H100, NVIDIA-L4 -> L4).
    Unschedulable nodes and nodes with an unknown product are left out.
    """
    counts: dict[str, int] = {}
    for node in nodes:
        meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
        if spec.get("unschedulable"):
            continue
        product = (meta.get("labels") or {}).get(GPU_PRODUCT_LABEL)
        if not product:
            continue
        kind = accelerator_for_product(product, accelerators)
        if kind is None:
            continue
        raw = (status.get("allocatable") or {}).get(GPU_RESOURCE, "0")
        try:
            count = int(str(raw))
        except ValueError:
            continue
        counts[kind] = counts.get(kind, 0) + count
    return counts


def accelerator_for_product(product: str, accelerators: list[AcceleratorSettings]) -> str | None:
    """The configured accelerator type a GPU product label names, or None."""
    for a in accelerators:
        if product in a.product_labels:
            return a.name
    words = product.upper().replace("_", "-").split("-")
    for a in sorted(accelerators, key=lambda a: len(a.name), reverse=True):
        parts = a.name.upper().split("-")
        for i in range(len(words) - len(parts) + 1):
            if words[i:i + len(parts)] == parts:
                return a.name
    return None
