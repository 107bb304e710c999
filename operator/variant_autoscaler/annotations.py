"""Annotation mode: variants declared the llm-d-autoscaling v0.9 way, on KEDA ScaledObjects or HPAs.

llm-d-autoscaling v0.9 removed its VariantAutoscaling CRD: a user marks the KEDA ScaledObject (or
the autoscaling/v2 HorizontalPodAutoscaler) that scales a variant's Deployment with `llm-d.ai/*`
annotations, and KEDA's Prometheus trigger (or the HPA's external metric) reads the autoscaler's
desired-replicas metric. So that those manifests work unchanged here, each managed object is turned
into the VariantAutoscaling-shaped dict that `resources.parse_variant` reads (as upstream
synthesizes an in-memory VA): one variant model and one decision path for both modes. Its Events
go to that object (the parsed ref names it); its status is KEDA's or the HPA controller's, never
written.

| annotation | maps to | default |
|---|---|---|
| `llm-d.ai/managed` | opts in; only `"true"` counts (as upstream) | not managed |
| `llm-d.ai/model-id` | `spec.modelID` | required |
| `llm-d.ai/variant-cost` | `spec.variantCost` ($/h per replica here) | the settings' price |
| `llm-d.ai/gpus-per-replica` | `spec.acceleratorCount` | 1 |
| `llm-d.ai/role` | `spec.role` (prefill, decode, both) | both |
| `llm-d.ai/scale-to-zero-retention` | minReplicas 0 and a scale-down window that long (at most 1h) | no scale to zero |

`spec.minReplicaCount`/`maxReplicaCount` of a ScaledObject give the bounds (KEDA's own default
minimum is 0, but without the retention annotation the minimum here is 1: never scale to zero by
accident; the maximum defaults to KEDA's 100); an HPA's `spec.minReplicas` (default 1) and
`spec.maxReplicas` (required by its schema) likewise. `autoscaling.keda.sh/paused: "true"` pauses the variant as our
pause annotation does. The accelerator comes, as for a VA, from the label
`inference.optimization/acceleratorName` on the ScaledObject, else from the target.
"""

from __future__ import annotations

import math
import re

from optimizer import input_limits as lim
from variant_autoscaler.resources import PAUSED_ANNOTATION, InvalidResource

MANAGED = "llm-d.ai/managed"
MODEL_ID = "llm-d.ai/model-id"
VARIANT_COST = "llm-d.ai/variant-cost"
GPUS_PER_REPLICA = "llm-d.ai/gpus-per-replica"
ROLE = "llm-d.ai/role"
SCALE_TO_ZERO_RETENTION = "llm-d.ai/scale-to-zero-retention"
KEDA_PAUSED = "autoscaling.keda.sh/paused"

GROUP, VERSION, PLURAL, KIND = "keda.sh", "v1alpha1", "scaledobjects", "ScaledObject"
API_VERSION = f"{GROUP}/{VERSION}"
HPA_KIND, HPA_API_VERSION = "HorizontalPodAutoscaler", "autoscaling/v2"
KINDS = frozenset({KIND, HPA_KIND})
# where each kind keeps its replica bounds, and its API version for the Events' involvedObject
KEDA_DEFAULT_MAX_REPLICAS = 100
BOUNDS = {KIND: ("minReplicaCount", "maxReplicaCount", KEDA_DEFAULT_MAX_REPLICAS),
          HPA_KIND: ("minReplicas", "maxReplicas", None)}
API_VERSIONS = {KIND: API_VERSION, HPA_KIND: HPA_API_VERSION}
MAX_RETENTION_S = 3600  # the HPA's (and spec.behavior's) longest stabilization window
INVALID = "InvalidAnnotations"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def is_managed(obj: dict) -> bool:
    """True for an object that opted in: `llm-d.ai/managed: "true"` exactly, as upstream. The HPA
    KEDA creates for a ScaledObject (owned by it) is never a variant of its own: the ScaledObject is."""
    meta = obj.get("metadata") or {}
    if any((o or {}).get("kind") == KIND for o in meta.get("ownerReferences") or []):
        return False
    return (meta.get("annotations") or {}).get(MANAGED) == "true"


def _where(annotation: str) -> str:
    return f"metadata.annotations[{annotation}]"


def parse_duration_s(text: str, where: str, limit_s: float = lim.MAX_DURATION_S) -> float:
    """Seconds of a Go duration ("10m", "1h30m", "45s") or of a plain number of seconds."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise InvalidResource(where, f"not a duration such as 10m, 1h30m or 600: {text!r}",
                                  condition_reason=INVALID) from None
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
    if not math.isfinite(seconds) or not 0 <= seconds <= limit_s:
        raise InvalidResource(where, f"must be from 0 to {limit_s:g} s, got {text!r}",
                              condition_reason=INVALID)
    return seconds


def _count(spec: dict, field: str, default: int | None) -> int | None:
    value = spec.get(field, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 <= value <= lim.MAX_REPLICAS):
        raise InvalidResource(f"spec.{field}", f"must be an integer from 0 to {lim.MAX_REPLICAS}, got {value!r}",
                              condition_reason=INVALID)
    return value


def variant_from_annotated(obj: dict) -> dict:
    """The VariantAutoscaling-shaped dict a managed ScaledObject or HPA declares (for `parse_variant`).

    Raises InvalidResource naming the annotation or field at fault (reason InvalidAnnotations)."""
    kind = obj.get("kind") if obj.get("kind") in KINDS else KIND
    min_field, max_field, default_max = BOUNDS[kind]
    meta = obj.get("metadata") or {}
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    model = annotations.get(MODEL_ID, "").strip()
    if not model:
        raise InvalidResource(_where(MODEL_ID), "required on a ScaledObject marked llm-d.ai/managed: the model the "
                              "target serves", condition_reason=INVALID)
    target = spec.get("scaleTargetRef")
    if not isinstance(target, dict) or not target.get("name"):
        raise InvalidResource("spec.scaleTargetRef.name", f"required: the Deployment this {kind} scales",
                              condition_reason=INVALID)
    vspec: dict = {"modelID": model,
                   "scaleTargetRef": {"kind": target.get("kind") or "Deployment",
                                      "apiVersion": target.get("apiVersion") or "apps/v1", "name": target["name"]}}
    if annotations.get(VARIANT_COST, "").strip():
        text = annotations[VARIANT_COST].strip()
        try:
            cost = float(text)
        except ValueError:
            raise InvalidResource(_where(VARIANT_COST), f"not a decimal number: {text!r}",
                                  condition_reason=INVALID) from None
        if not 0 <= cost <= lim.MAX_PRICE_PER_HOUR:  # also False for NaN
            raise InvalidResource(_where(VARIANT_COST), f"must be between 0 and {lim.MAX_PRICE_PER_HOUR:g} $/h, "
                                  f"got {text!r}", condition_reason=INVALID)
        vspec["variantCost"] = cost
    if annotations.get(GPUS_PER_REPLICA, "").strip():
        text = annotations[GPUS_PER_REPLICA].strip()
        if not text.isdigit() or not 1 <= int(text) <= lim.MAX_ACCELERATORS_PER_REPLICA:
            raise InvalidResource(_where(GPUS_PER_REPLICA), f"must be an integer from 1 to "
                                  f"{lim.MAX_ACCELERATORS_PER_REPLICA}, got {text!r}", condition_reason=INVALID)
        vspec["acceleratorCount"] = int(text)
    role = annotations.get(ROLE, "").strip().lower()
    if role:
        if role not in ("prefill", "decode", "both"):
            raise InvalidResource(_where(ROLE), f"must be prefill, decode or both, got {annotations[ROLE]!r}",
                                  condition_reason=INVALID)
        vspec["role"] = role
    retention = None
    if annotations.get(SCALE_TO_ZERO_RETENTION, "").strip():
        retention = parse_duration_s(annotations[SCALE_TO_ZERO_RETENTION], _where(SCALE_TO_ZERO_RETENTION),
                                     MAX_RETENTION_S)
    low = _count(spec, min_field, None)
    high = _count(spec, max_field, default_max)
    if retention is None:
        low = max(1, low or 0)  # KEDA's default 0 would scale to zero; v0.9 needs the retention annotation
    else:
        low = 0 if low is None else low
        vspec["behavior"] = {"scaleDown": {"stabilizationWindowSeconds": int(math.ceil(retention))}}
    if high is not None and low > high:
        raise InvalidResource(f"spec.{min_field}", f"minimum {low} exceeds spec.{max_field} {high}",
                              condition_reason=INVALID)
    vspec["minReplicas"], vspec["maxReplicas"] = low, high
    ours = {k: v for k, v in annotations.items() if not k.startswith("llm-d.ai/")}
    if kind == KIND and annotations.get(KEDA_PAUSED, "").strip().lower() == "true":
        ours[PAUSED_ANNOTATION] = "true"
    return {
        "apiVersion": API_VERSIONS[kind], "kind": kind,
        "metadata": {key: meta[key] for key in ("name", "namespace", "uid", "generation", "creationTimestamp",
                                                "labels") if key in meta} | {"annotations": ours},
        "spec": vspec,
    }
