"""A VariantAutoscaling as the control loop sees it: parsed, defaulted and checked, or rejected with a reason.

Why a parser in the operator when the CRD schema already validates: the schema cannot check
everything (a ConfigMap profile's content, the pairing of accelerator fields, a WVA manifest written
for an older CRD version that the API server stored before our schema existed), and one bad
resource must never stop the loop for the others. Every problem becomes an `InvalidResource` with
the field and a reason a person can act on; the controller turns it into a condition and an Event.

llm-d WVA manifests are accepted as they are after the apiVersion change: `acceleratorType` and
`modelProfile.accelerators[].acc/accCount/maxBatchSize/perfParms`, `variantProfile.perfParms`
(alpha/beta/gamma/delta in milliseconds: itl = alpha + beta*batch, ttft = gamma + delta*tokens*batch)
and `sloClassRef` ConfigMaps in WVA's service-class format. As in WVA, the accelerator may be named
by the label `inference.optimization/acceleratorName` (spec.accelerator wins when both are set), and
a manifest without `scaleTargetRef` (the older WVA CRD had none) scales the Deployment named like the
VariantAutoscaling.
"""

from __future__ import annotations

import re

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from optimizer import input_limits as lim
from optimizer.fleet import Role
from optimizer.problem import format_validation_error
from optimizer.profile import ParametricProfile, PerformanceProfile, TabulatedProfile
from optimizer.transition import ScalingRules
from variant_autoscaler.actuator import ObjectRef, TargetRef
from variant_autoscaler.settings import SloSettings

_PROFILE = TypeAdapter(PerformanceProfile)
PAUSED_ANNOTATION = "autoscaling.variant-autoscaler.io/paused"  # "true": never scale this target (as KEDA's paused)
INFERENCE_POOL_ANNOTATION = "autoscaling.variant-autoscaler.io/inference-pool"  # the pool's saturation label
ACCELERATOR_LABEL = "inference.optimization/acceleratorName"  # llm-d WVA's label naming a variant's accelerator
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


class InvalidResource(Exception):
    """A VariantAutoscaling the loop cannot use; `field` is a path under the object, e.g. spec.profile."""

    def __init__(self, field: str, reason: str, *, condition_reason: str = "InvalidSpec"):
        self.field, self.reason, self.condition_reason = field, reason, condition_reason
        super().__init__(f"{field}: {reason}" if field else reason)


class ConfigMapKeyRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    key: str


class ParsedVariant(BaseModel):
    """One VariantAutoscaling, ready for the optimizer (profile possibly still to resolve)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    ref: ObjectRef
    generation: int = 0
    created: str = Field(default="", description="metadata.creationTimestamp (RFC 3339): the oldest VA of a target keeps it.")
    target: TargetRef
    paused: bool = Field(default=False, description=f"metadata.annotations[{PAUSED_ANNOTATION!r}] is true.")
    target_defaulted: bool = Field(default=False, description="spec.scaleTargetRef unset: the Deployment of the VA's name.")
    inference_pool: str | None = Field(
        default=None, description=f"metadata.annotations[{INFERENCE_POOL_ANNOTATION!r}]: the request scheduler's "
                                  "InferencePool serving this variant (None: one pool per model and namespace).")
    model_id: str
    variant_id: str | None = None
    accelerator: str | None = Field(description="None: decided from the target or the settings.")
    accelerator_count: int = 1
    role: Role = Role.BOTH
    max_batch: int | None = None
    min_replicas: int = 1
    max_replicas: int | None = None
    variant_cost: float | None = None
    priority: float | None = None
    slo: SloSettings | None = None
    slo_class_ref: ConfigMapKeyRef | None = None
    profile: PerformanceProfile | None = None
    profile_ref: ConfigMapKeyRef | None = None
    scale_up: ScalingRules | None = Field(default=None, description="spec.behavior.scaleUp, HPA semantics.")
    scale_down: ScalingRules | None = Field(default=None, description="spec.behavior.scaleDown.")
    status: dict = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.ref.namespace}/{self.ref.name}"

    @property
    def role_name(self) -> str:
        return {Role.PREFILL: "prefill", Role.DECODE: "decode", Role.BOTH: "both"}[self.role]


_BEHAVIOR_FIELDS = {"stabilizationWindowSeconds": "stabilization_window_s", "selectPolicy": "select_policy",
                    "policies": "policies"}
_POLICY_FIELDS = {"type": "type", "value": "value", "periodSeconds": "period_s"}


def scaling_rules(doc: object, where: str) -> ScalingRules | None:
    """One direction of spec.behavior (the HPA's camelCase fields) as the planner's rules. The CRD
    schema already bounds it; this repeats the checks for servers that skip validation."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise InvalidResource(where, f"expected a mapping, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(_BEHAVIOR_FIELDS))
    if unknown:
        raise InvalidResource(f"{where}.{unknown[0]}", f"unknown field; known: {', '.join(_BEHAVIOR_FIELDS)}")
    policies = doc.get("policies") or []
    if not isinstance(policies, list) or not all(isinstance(p, dict) for p in policies):
        raise InvalidResource(f"{where}.policies", "expected a list of {type, value, periodSeconds}")
    body = {_BEHAVIOR_FIELDS[k]: v for k, v in doc.items() if k != "policies"}
    body["policies"] = [{_POLICY_FIELDS.get(k, k): v for k, v in p.items()} for p in policies]
    try:
        return ScalingRules.model_validate(body)
    except ValidationError as err:
        field, reason = format_validation_error(err)[0]
        back = {v: k for k, v in {**_BEHAVIOR_FIELDS, **_POLICY_FIELDS}.items()}
        field = ".".join(back.get(part, part) for part in field.split("."))
        raise InvalidResource(f"{where}.{field}", reason) from None


def _snake(name: str) -> str:
    return _CAMEL.sub("_", name).lower()


def profile_from_document(doc: object, where: str) -> PerformanceProfile:
    """A profile from the CRD's camelCase form ({parametric: {...}} / {tabulated: {...}}) or the
    optimizer's snake_case form ({kind: parametric, ...})."""
    if not isinstance(doc, dict):
        raise InvalidResource(where, f"expected a mapping, got {type(doc).__name__}")
    try:
        if "parametric" in doc or "tabulated" in doc:
            if len(doc) != 1:
                raise InvalidResource(where, "set exactly one of parametric or tabulated")
            kind, body = next(iter(doc.items()))
            if not isinstance(body, dict):
                raise InvalidResource(f"{where}.{kind}", "expected a mapping")
            if kind == "parametric":
                fields = {_snake(k).replace("_seconds", "_s"): v for k, v in body.items()}
                return ParametricProfile.model_validate(fields)
            points = {
                "decode_points": [{"x": p.get("batch"), "time_s": p.get("timeSeconds")}
                                  for p in body.get("decodePoints") or []],
                "prefill_points": [{"x": p.get("tokens"), "time_s": p.get("timeSeconds")}
                                   for p in body.get("prefillPoints") or []],
            }
            if "decodePerKvTokenSeconds" in body:
                points["decode_per_kv_token_s"] = body["decodePerKvTokenSeconds"]
            return TabulatedProfile.model_validate(points)
        return _PROFILE.validate_python(doc)
    except ValidationError as err:
        field, reason = format_validation_error(err)[0]
        raise InvalidResource(f"{where}.{field}" if field else where, reason) from None


def wva_profile(perf_parms: dict, where: str) -> ParametricProfile:
    """llm-d WVA perfParms (milliseconds) -> a parametric profile in seconds."""
    try:
        dec, pre = perf_parms.get("decodeParms") or {}, perf_parms.get("prefillParms") or {}
        alpha, beta = float(dec["alpha"]), float(dec.get("beta", 0))
        gamma, delta = float(pre.get("gamma", 0)), float(pre["delta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidResource(where, f"needs decodeParms.alpha/beta and prefillParms.gamma/delta as numbers ({exc})") \
            from None
    try:
        return ParametricProfile(decode_base_s=alpha / 1000, decode_per_seq_s=beta / 1000,
                                 prefill_base_s=gamma / 1000, prefill_per_token_s=delta / 1000)
    except ValidationError as err:
        raise InvalidResource(where, format_validation_error(err)[0][1]) from None


def wva_slo_class(text: str, model_id: str, where: str) -> SloSettings:
    """The SLO of one model from a WVA service-class ConfigMap entry (slo-ttft / slo-tpot in ms)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidResource(where, f"not valid YAML: {' '.join(str(exc).split())}") from None
    for entry in (doc or {}).get("data") or []:
        if isinstance(entry, dict) and entry.get("model") == model_id:
            try:
                return SloSettings(ttft_s=float(entry["slo-ttft"]) / 1000, itl_s=float(entry["slo-tpot"]) / 1000)
            except (KeyError, TypeError, ValueError, ValidationError) as exc:
                raise InvalidResource(where, f"entry for {model_id!r} needs numeric slo-ttft and slo-tpot ({exc})") \
                    from None
    raise InvalidResource(where, f"no entry for model {model_id!r}", condition_reason="SLOClassMissing")


def parse_variant(obj: dict) -> ParsedVariant:
    """Parse one VariantAutoscaling object (a dict as the API returns it)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidResource("spec", "missing")
    ref = ObjectRef(namespace=meta.get("namespace") or "default", name=meta.get("name") or "",
                    uid=meta.get("uid"), kind=obj.get("kind") or "VariantAutoscaling",
                    api_version=obj.get("apiVersion") or "autoscaling.variant-autoscaler.io/v1alpha1")
    target = spec.get("scaleTargetRef")
    target_defaulted = target is None
    if target_defaulted:  # the older llm-d WVA CRD had no scaleTargetRef: it scaled the Deployment of the VA's name
        target = {"kind": "Deployment", "apiVersion": "apps/v1", "name": ref.name}
    if not isinstance(target, dict) or not target.get("name"):
        raise InvalidResource("spec.scaleTargetRef.name", "required: the Deployment this variant scales")
    model_id = spec.get("modelID") or spec.get("modelName")  # modelName: the earliest WVA manifests
    if not isinstance(model_id, str) or not model_id:
        raise InvalidResource("spec.modelID", "required: the model the target serves")

    labels = meta.get("labels") or {}
    accelerator = spec.get("accelerator") or spec.get("acceleratorType") or labels.get(ACCELERATOR_LABEL) or None
    if spec.get("accelerator") and spec.get("acceleratorType") and spec["accelerator"] != spec["acceleratorType"]:
        raise InvalidResource("spec.acceleratorType", f"{spec['acceleratorType']!r} contradicts spec.accelerator "
                                                      f"{spec['accelerator']!r}")
    count = spec.get("acceleratorCount")  # no CRD default: unset lets a WVA modelProfile's accCount apply
    max_batch = spec.get("maxBatch") or spec.get("maxBatchSize")
    profile = None
    profile_ref = None

    legacy = [a for a in ((spec.get("modelProfile") or {}).get("accelerators") or []) if isinstance(a, dict)]
    if legacy:
        chosen = [a for a in legacy if a.get("acc") == accelerator] if accelerator else legacy
        if accelerator is None and len(legacy) > 1:
            raise InvalidResource("spec.modelProfile.accelerators",
                                  f"lists {len(legacy)} accelerators; set spec.accelerator (or the label "
                                  f"{ACCELERATOR_LABEL}) to pick one")
        if chosen:
            entry = chosen[0]
            accelerator = accelerator or entry.get("acc")
            acc_count = entry.get("accCount")
            if count is not None and acc_count is not None and count != acc_count:
                raise InvalidResource("spec.acceleratorCount", f"{count!r} contradicts "
                                      f"spec.modelProfile.accelerators[].accCount {acc_count!r} of {entry.get('acc')!r}")
            count = acc_count if count is None else count
            max_batch = max_batch or entry.get("maxBatchSize")
            if entry.get("perfParms"):
                profile = wva_profile(entry["perfParms"], "spec.modelProfile.accelerators[].perfParms")

    variant_profile = spec.get("variantProfile")
    if isinstance(variant_profile, dict):
        max_batch = max_batch or variant_profile.get("maxBatchSize")
        if variant_profile.get("perfParms"):
            profile = wva_profile(variant_profile["perfParms"], "spec.variantProfile.perfParms")

    inline = spec.get("profile")
    if isinstance(inline, dict):
        if "configMapRef" in inline:
            cm = inline["configMapRef"] or {}
            if len(inline) != 1:
                raise InvalidResource("spec.profile", "set exactly one of parametric, tabulated or configMapRef")
            if not cm.get("name"):
                raise InvalidResource("spec.profile.configMapRef.name", "required")
            profile_ref = ConfigMapKeyRef(name=cm["name"], key=cm.get("key") or "profile.yaml")
            profile = None
        else:
            profile = profile_from_document(inline, "spec.profile")

    slo = None
    if isinstance(spec.get("slo"), dict):
        s = spec["slo"]
        try:
            slo = SloSettings(ttft_s=s.get("ttftSeconds"), itl_s=s.get("itlSeconds"), e2e_s=s.get("e2eSeconds"),
                              percentile=s.get("percentile", 90.0))
        except ValidationError as err:
            field, reason = format_validation_error(err)[0]
            raise InvalidResource(f"spec.slo.{field}", reason) from None
    slo_class = spec.get("sloClassRef")
    slo_class_ref = (ConfigMapKeyRef(name=slo_class["name"], key=slo_class["key"])
                     if isinstance(slo_class, dict) and slo_class.get("name") and slo_class.get("key") else None)

    try:
        cost = float(spec["variantCost"]) if spec.get("variantCost") is not None else None
    except (TypeError, ValueError):
        raise InvalidResource("spec.variantCost", f"not a decimal number: {spec['variantCost']!r}") from None
    if cost is not None and not 0 <= cost <= lim.MAX_PRICE_PER_HOUR:  # also False for NaN
        raise InvalidResource("spec.variantCost", f"must be between 0 and {lim.MAX_PRICE_PER_HOUR:g} $/h, "
                                                  f"got {spec['variantCost']!r}")
    min_r = spec.get("minReplicas", 1)
    max_r = spec.get("maxReplicas")
    for field, value, low, high in (("spec.minReplicas", min_r, 0, lim.MAX_REPLICAS),
                                    ("spec.maxReplicas", max_r, 0, lim.MAX_REPLICAS),
                                    ("spec.acceleratorCount", count, 1, lim.MAX_ACCELERATORS_PER_REPLICA),
                                    ("spec.maxBatch", max_batch, 1, lim.MAX_BATCH)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high):
            raise InvalidResource(field, f"must be an integer from {low} to {high}, got {value!r}")
    if max_r is not None and min_r > max_r:
        raise InvalidResource("spec.minReplicas", f"minReplicas ({min_r}) exceeds maxReplicas ({max_r})")
    try:
        role = Role(spec.get("role") or "both")
    except ValueError:
        raise InvalidResource("spec.role", f"must be prefill, decode or both, got {spec.get('role')!r}") from None
    if role is not Role.BOTH and isinstance(variant_profile, dict) and variant_profile.get("perfParms") \
            and not isinstance(inline, dict):
        raise InvalidResource("spec.variantProfile", "models aggregated serving only; a prefill or decode variant "
                                                     "needs spec.profile")
    count = 1 if count is None else count
    priority = spec.get("priority")
    if priority is not None and (not isinstance(priority, int | float) or isinstance(priority, bool)
                                 or not lim.MIN_PRIORITY <= priority <= lim.MAX_PRIORITY):
        raise InvalidResource("spec.priority", f"must be a number from {lim.MIN_PRIORITY:g} to {lim.MAX_PRIORITY:g}, "
                                               f"got {priority!r}")

    pool = str((meta.get("annotations") or {}).get(INFERENCE_POOL_ANNOTATION) or "").strip() or None
    if pool is not None and len(pool) > 253:
        raise InvalidResource(f"metadata.annotations[{INFERENCE_POOL_ANNOTATION}]",
                              f"an InferencePool name has at most 253 characters, got {len(pool)}")
    behavior = spec.get("behavior") or {}
    if not isinstance(behavior, dict):
        raise InvalidResource("spec.behavior", f"expected a mapping, got {type(behavior).__name__}")
    scale_up = scaling_rules(behavior.get("scaleUp"), "spec.behavior.scaleUp")
    scale_down = scaling_rules(behavior.get("scaleDown"), "spec.behavior.scaleDown")

    return ParsedVariant(
        ref=ref, generation=int(meta.get("generation") or 0), created=str(meta.get("creationTimestamp") or ""),
        target=TargetRef(namespace=ref.namespace, name=target["name"], kind=target.get("kind") or "Deployment",
                         api_version=target.get("apiVersion") or "apps/v1"), target_defaulted=target_defaulted,
        paused=str((meta.get("annotations") or {}).get(PAUSED_ANNOTATION, "")).lower() == "true",
        inference_pool=pool,
        model_id=model_id, variant_id=spec.get("variantID"), accelerator=accelerator, accelerator_count=count,
        role=role, max_batch=max_batch, min_replicas=min_r, max_replicas=max_r, variant_cost=cost,
        priority=float(priority) if priority is not None else None, slo=slo, slo_class_ref=slo_class_ref,
        profile=profile, profile_ref=profile_ref, scale_up=scale_up, scale_down=scale_down,
        status=obj.get("status") or {},
    )
