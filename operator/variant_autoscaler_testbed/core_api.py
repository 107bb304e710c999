"""An emulated Kubernetes core API server, and the one URL that also fronts the real CRD server.

No kube-apiserver can run where this project is built and tested, yet the operator must be tested
over HTTP with the real `kubernetes` client and kopf, so that what passes here also works on a
cluster. The custom resources go to the real CRD server (`crd_server`); the built-in types the
operator and the tests touch are held here, in memory, with the semantics clients rely on:

* resourceVersion (one global counter), uid, generation (bumped on spec change), creationTimestamp,
  generateName; 201 on create, 409 AlreadyExists and 409 Conflict on a stale resourceVersion,
  404/422/400 with proper `Status` bodies; finalizers and deletionTimestamp;
* list with labelSelector, fieldSelector, limit/continue and the list's resourceVersion; watch
  streams (`?watch=true`) resuming from a resourceVersion (410 Gone when too old), with
  timeoutSeconds and the watch-list protocol (sendInitialEvents + the initial-events-end bookmark);
* merge patch, JSON patch and strategic merge patch (lists merged by their Kubernetes merge keys);
* the `status` subresource (pods, deployments, namespaces, services, HPAs) and the Deployment
  `scale` subresource speaking autoscaling/v1 Scale; autoscaling/v2 HorizontalPodAutoscalers are
  stored and served (nothing acts on them: no HPA controller runs);
* discovery merged with the CRD server's, `/version`, server-side Tables for `kubectl get`, and
  TokenReview/SubjectAccessReview answers so the CRD server can delegate auth here.

Every other request (the CRD groups, apiextensions.k8s.io, kopf.dev, /openapi) is proxied to the
CRD server, watches chunk by chunk. Every request is recorded (`CoreApi.requests`) so tests can
derive which API calls a component made, e.g. to check its RBAC rules, and `CoreApi.add_fault` /
`drop_watches` make requests fail, stall or lose their watch streams, for clients' retry paths.

Not emulated: protobuf bodies (except the Namespace and ConfigMap `kubectl create` posts), server-side
apply of the built-in types (a 415 saying to drop --server-side; the CRD server applies custom
resources server-side) and OpenAPI schemas of the built-in types (kubectl
create/apply/get/describe/scale/delete work; `kubectl explain` works for the custom resources),
ReplicaSets, graceful pod termination, garbage collection beyond Deployment -> Pods, and the
deletion of custom resources with their namespace.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from variant_autoscaler_testbed import protobuf_body
from variant_autoscaler_testbed.protobuf_body import ProtobufUnsupported

JsonObj = dict[str, Any]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
CREATE_ONLY = ("create",)
HISTORY_LENGTH = 50_000
DEFAULT_WATCH_TIMEOUT_S = 1800
MAX_WATCH_TIMEOUT_S = 3600
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
EMULATED_VERSION = {
    "major": "1", "minor": "36", "gitVersion": "v1.36.4-emulated", "gitCommit": "variant-autoscaler",
    "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "python",
    "compiler": "cpython", "platform": "linux/amd64",
}


# ----------------------------------------------------------------------------------------------
# Errors, shaped as the Kubernetes `Status` object every client parses.


class ApiError(Exception):
    """An API failure that becomes an HTTP status code plus a metav1.Status body."""

    def __init__(self, code: int, reason: str, message: str, details: JsonObj | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JsonObj:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rtype.qualified} "{name}" not found',
                    {"name": name, "group": rtype.group, "kind": rtype.plural})


def invalid(rtype: ResourceType, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """422 Invalid; causes are (field, reason, message) as the real server words them."""
    text = ", ".join(f"{f}: {m}" for f, _r, m in causes)
    return ApiError(422, "Invalid", f'{rtype.kind}{"." + rtype.group if rtype.group else ""} "{name}" is invalid: {text}',
                    {"name": name, "group": rtype.group, "kind": rtype.kind,
                     "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes]})


def conflict(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {rtype.qualified} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                    {"name": name, "group": rtype.group, "kind": rtype.plural})


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


# ----------------------------------------------------------------------------------------------
# Resource types served here.


@dataclass(frozen=True)
class ResourceType:
    """One REST resource: where it lives in the URL space and which semantics it gets."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    tracks_generation: bool = False
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)


BUILTIN_TYPES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "Namespace", "namespaces", False, ("ns",), ("status", "finalize")),
    ResourceType("", "v1", "ConfigMap", "configmaps", True, ("cm",)),
    ResourceType("", "v1", "Secret", "secrets", True),
    ResourceType("", "v1", "Pod", "pods", True, ("po",), ("status",), tracks_generation=True,
                 categories=("all",)),
    ResourceType("", "v1", "Event", "events", True, ("ev",)),
    ResourceType("", "v1", "Service", "services", True, ("svc",), ("status",), categories=("all",)),
    ResourceType("", "v1", "ServiceAccount", "serviceaccounts", True, ("sa",)),
    ResourceType("apps", "v1", "Deployment", "deployments", True, ("deploy",), ("status", "scale"),
                 tracks_generation=True, categories=("all",)),
    ResourceType("coordination.k8s.io", "v1", "Lease", "leases", True),
    ResourceType("autoscaling", "v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", True, ("hpa",),
                 ("status",), categories=("all",)),
    ResourceType("authentication.k8s.io", "v1", "TokenReview", "tokenreviews", False, verbs=CREATE_ONLY),
    ResourceType("authorization.k8s.io", "v1", "SubjectAccessReview", "subjectaccessreviews", False,
                 verbs=CREATE_ONLY),
    ResourceType("authorization.k8s.io", "v1", "SelfSubjectAccessReview", "selfsubjectaccessreviews", False,
                 verbs=CREATE_ONLY),
    ResourceType("authorization.k8s.io", "v1", "LocalSubjectAccessReview", "localsubjectaccessreviews", True,
                 verbs=CREATE_ONLY),
)
LOCAL_GROUPS = {t.group for t in BUILTIN_TYPES}
REVIEW_KINDS = {"TokenReview", "SubjectAccessReview", "SelfSubjectAccessReview", "LocalSubjectAccessReview"}
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


# ----------------------------------------------------------------------------------------------
# Small helpers: time, names, selectors.


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch of any RFC 3339 time (`Z` or an offset such as `+00:00`, with or
    without fractions), as the real server accepts; ValueError for anything else."""
    if not isinstance(text, str) or "T" not in text.upper():
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        raise ValueError(f"RFC 3339 time without a zone: {text!r}")
    return parsed.timestamp()


def canonical_rfc3339(text: str, *, micro: bool = False) -> str:
    """The real server's form of a time it stores: UTC with a `Z` (metav1.Time drops fractions,
    metav1.MicroTime keeps six digits), whatever offset the client sent."""
    moment = datetime.fromtimestamp(parse_rfc3339(text), UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def human_age(timestamp: str | None) -> str:
    """kubectl's short age ("5s", "3m", "2h", "4d")."""
    if not timestamp:
        return "<unknown>"
    try:
        seconds = max(0, int(time.time() - parse_rfc3339(timestamp)))
    except (ValueError, TypeError):
        return "<invalid>"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size or (unit == "m" and seconds >= 120):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def name_problem(name: str, *, label: bool) -> str | None:
    """The real server's wording for an invalid object name, or None when the name is valid."""
    if label:
        if len(name) > 63 or not _DNS_LABEL.match(name):
            return (f'Invalid value: "{name}": a lowercase RFC 1123 label must consist of lower case '
                    "alphanumeric characters or '-', and must start and end with an alphanumeric "
                    "character (e.g. 'my-name',  or '123-abc', regex used for validation is "
                    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
        return None
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        return (f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                "character (e.g. 'example.com', regex used for validation is "
                "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
    return None


def random_suffix(length: int = 5) -> str:
    return "".join(secrets.choice(_NAME_SUFFIX_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator == "=":
            return present and value == self.values[0]
        if self.operator == "!=":
            return not present or value != self.values[0]
        if self.operator == "in":
            return present and value in self.values
        if self.operator == "notin":
            return not present or value not in self.values
        if self.operator == "exists":
            return present
        return not present


_SET_REQUIREMENT = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h` (the Kubernetes label selector syntax)."""
    if not text:
        return []
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    out = []
    for raw in parts:
        part = raw.strip()
        if not part:
            continue
        m = _SET_REQUIREMENT.match(part)
        if m:
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            out.append(Requirement(m.group(1), m.group(2), values))
        elif "!=" in part:
            k, v = part.split("!=", 1)
            out.append(Requirement(k.strip(), "!=", (v.strip(),)))
        elif "==" in part:
            k, v = part.split("==", 1)
            out.append(Requirement(k.strip(), "=", (v.strip(),)))
        elif "=" in part:
            k, v = part.split("=", 1)
            out.append(Requirement(k.strip(), "=", (v.strip(),)))
        elif part.startswith("!"):
            out.append(Requirement(part[1:].strip(), "!"))
        elif re.match(r"^[A-Za-z0-9./_-]+$", part):
            out.append(Requirement(part, "exists"))
        else:
            raise bad_request(f'unable to parse requirement: "{part}"')
    return out


def parse_field_selector(text: str | None) -> list[tuple[str, str, str]]:
    """Parse `metadata.name=x,status.phase!=Running` into (path, operator, value)."""
    out = []
    for raw in (text or "").split(","):
        part = raw.strip()
        if not part:
            continue
        for op in ("!=", "==", "="):
            if op in part:
                path, value = part.split(op, 1)
                out.append((path.strip(), "!=" if op == "!=" else "=", value.strip()))
                break
        else:
            raise bad_request(f'invalid field selector: "{part}"')
    return out


def field_value(obj: JsonObj, path: str) -> str:
    node: Any = obj
    for step in path.split("."):
        if not isinstance(node, dict):
            return ""
        node = node.get(step)
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def selector_matches(obj: JsonObj, labels: list[Requirement], fields: list[tuple[str, str, str]]) -> bool:
    obj_labels = (obj.get("metadata") or {}).get("labels") or {}
    if not all(r.matches(obj_labels) for r in labels):
        return False
    for path, op, value in fields:
        actual = field_value(obj, path)
        if (actual == value) != (op == "="):
            return False
    return True


def selector_string(selector: JsonObj | None) -> str:
    """A metav1.LabelSelector as the string form the Scale subresource reports."""
    selector = selector or {}
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In":
            parts.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            parts.append(key)
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


def label_selector_requirements(selector: JsonObj | None) -> list[Requirement]:
    return parse_label_selector(selector_string(selector))


# ----------------------------------------------------------------------------------------------
# Patches: RFC 7386 merge patch, RFC 6902 JSON patch, and strategic merge patch.


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, steps: list[str], path: str) -> Any:
    node = doc
    for step in steps:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our "
                           f"request: doc is missing path: {path}")
    return node


def json_patch(doc: Any, operations: list[JsonObj]) -> Any:
    if not isinstance(operations, list):
        raise bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        steps = _pointer(path)
        if kind == "test":
            if _resolve(doc, steps, path) != op.get("value"):
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error in "
                               f"our request: testing value {path} failed")
            continue
        if kind in ("move", "copy"):
            source = _pointer(op.get("from", ""))
            value = copy.deepcopy(_resolve(doc, source, op.get("from", "")))
            if kind == "move":
                doc = _remove(doc, source, op.get("from", ""))
            doc = _add(doc, steps, value, path)
        elif kind == "add":
            doc = _add(doc, steps, copy.deepcopy(op.get("value")), path)
        elif kind == "remove":
            doc = _remove(doc, steps, path)
        elif kind == "replace":
            _resolve(doc, steps, path)
            doc = _remove(doc, steps, path)
            doc = _add(doc, steps, copy.deepcopy(op.get("value")), path)
        else:
            raise bad_request(f"unexpected json patch operation {kind!r}")
    return doc


def _add(doc: Any, steps: list[str], value: Any, path: str) -> Any:
    if not steps:
        return value
    parent = _resolve(doc, steps[:-1], path)
    last = steps[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif last.isdigit() and int(last) <= len(parent):
            parent.insert(int(last), value)
        else:
            raise ApiError(422, "Invalid", f"the server rejected our request: index out of range: {path}")
    else:
        raise ApiError(422, "Invalid", f"the server rejected our request: cannot add at {path}")
    return doc


def _remove(doc: Any, steps: list[str], path: str) -> Any:
    if not steps:
        return None
    parent = _resolve(doc, steps[:-1], path)
    last = steps[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise ApiError(422, "Invalid", f"the server rejected our request due to an error in our request: "
                       f"doc is missing path: {path}")
    return doc


# Merge keys of the list fields Kubernetes merges element-wise in a strategic merge patch; other
# lists are replaced, as the real server does for lists without a patch strategy.
STRATEGIC_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
    "ports": "containerPort", "imagePullSecrets": "name", "conditions": "type",
    "ownerReferences": "uid", "hostAliases": "ip", "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name", "envFrom": None, "finalizers": None,
}
_PRIMITIVE_MERGE_LISTS = {"finalizers"}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch for the fields Kubernetes clients use on built-in types.

    Maps merge like a merge patch; lists with a known merge key merge element by element
    (`$patch: delete` removes one); `finalizers` merges as a set; the `$setElementOrder/`,
    `$retainKeys` and `$deleteFromPrimitiveList/` directives kubectl sends are honoured or ignored
    where they only affect ordering.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [v for v in result.get(name) or [] if v not in (value or [])]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in STRATEGIC_MERGE_KEYS and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, key)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(current: list, patch: list, field_name: str) -> list:
    merge_key = STRATEGIC_MERGE_KEYS[field_name]
    if field_name in _PRIMITIVE_MERGE_LISTS:
        out = list(current)
        out.extend(v for v in patch if v not in out)
        return out
    if merge_key is None:
        return copy.deepcopy(patch)
    out = copy.deepcopy(current)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            out.append(copy.deepcopy(item))
            continue
        index = next((i for i, e in enumerate(out) if isinstance(e, dict) and e.get(merge_key) == item[merge_key]),
                     None)
        if item.get("$patch") == "delete":
            if index is not None:
                del out[index]
        elif index is None:
            out.append({k: copy.deepcopy(v) for k, v in item.items() if k != "$patch"})
        else:
            out[index] = strategic_merge_patch(out[index], item)
    return out


def apply_patch(content_type: str, target: JsonObj, patch: Any) -> JsonObj:
    base = content_type.split(";")[0].strip().lower()
    if base == "application/merge-patch+json":
        result = merge_patch(target, patch)
    elif base == "application/json-patch+json":
        result = json_patch(target, patch)
    elif base == "application/strategic-merge-patch+json":
        result = strategic_merge_patch(target, patch)
    else:
        raise ApiError(415, "UnsupportedMediaType",
                       f"the body of the request was in an unknown format - accepted media types include: "
                       f"application/json-patch+json, application/merge-patch+json, "
                       f"application/strategic-merge-patch+json (got {content_type or 'none'})")
    if not isinstance(result, dict):
        raise bad_request("the patch did not produce an object")
    return result


# ----------------------------------------------------------------------------------------------
# Per-type defaulting and validation (what clients of these types would notice).


def _default_deployment(obj: JsonObj) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    spec.setdefault("strategy", {"type": "RollingUpdate",
                                 "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}})
    template_spec = spec.setdefault("template", {}).setdefault("spec", {})
    _default_pod_spec(template_spec)
    obj.setdefault("status", {})


def _default_pod_spec(spec: JsonObj) -> None:
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    for container in spec.get("containers") or []:
        if isinstance(container, dict):
            container.setdefault("imagePullPolicy", "IfNotPresent")
            container.setdefault("terminationMessagePath", "/dev/termination-log")


def _validate_containers(spec: Any, prefix: str) -> list[tuple[str, str, str]]:
    causes = []
    containers = spec.get("containers") if isinstance(spec, dict) else None
    if not containers:
        return [(f"{prefix}.containers", "FieldValueRequired", "Required value")]
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name"):
            causes.append((f"{prefix}.containers[{i}].name", "FieldValueRequired", "Required value"))
        if not isinstance(c, dict) or not c.get("image"):
            causes.append((f"{prefix}.containers[{i}].image", "FieldValueRequired", "Required value"))
    return causes


def _validate_deployment(obj: JsonObj, old: JsonObj | None) -> list[tuple[str, str, str]]:
    spec = obj.get("spec") or {}
    causes: list[tuple[str, str, str]] = []
    replicas = spec.get("replicas")
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        causes.append(("spec.replicas", "FieldValueInvalid", f"Invalid value: {replicas!r}: must be an integer"))
    elif replicas < 0:
        causes.append(("spec.replicas", "FieldValueInvalid",
                       f"Invalid value: {replicas}: must be greater than or equal to 0"))
    selector = spec.get("selector")
    template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not selector or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        causes.append(("spec.selector", "FieldValueRequired", "Required value"))
    elif not all(r.matches(template_labels) for r in label_selector_requirements(selector)):
        causes.append(("spec.template.metadata.labels", "FieldValueInvalid",
                       f"Invalid value: {template_labels}: `selector` does not match template `labels`"))
    if old is not None and (old.get("spec") or {}).get("selector") != selector:
        causes.append(("spec.selector", "FieldValueInvalid",
                       f"Invalid value: {selector}: field is immutable"))
    causes += _validate_containers((spec.get("template") or {}).get("spec"), "spec.template.spec")
    return causes


def _validate_pod(obj: JsonObj, old: JsonObj | None) -> list[tuple[str, str, str]]:
    return _validate_containers(obj.get("spec"), "spec")


def _validate_configmap(obj: JsonObj, old: JsonObj | None) -> list[tuple[str, str, str]]:
    causes = []
    for key, value in (obj.get("data") or {}).items():
        if not isinstance(value, str):
            causes.append((f"data[{key}]", "FieldValueInvalid", f"Invalid value: {value!r}: must be a string"))
    if old is not None and old.get("immutable") and (old.get("data") != obj.get("data")
                                                     or old.get("binaryData") != obj.get("binaryData")):
        causes.append(("data", "FieldValueForbidden", "Forbidden: field is immutable when `immutable` is set"))
    return causes


def _default_namespace(obj: JsonObj) -> None:
    obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    obj.setdefault("status", {})["phase"] = "Active"
    obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]


def _default_pod(obj: JsonObj) -> None:
    _default_pod_spec(obj.setdefault("spec", {}))
    obj.setdefault("status", {}).setdefault("phase", "Pending")


# Event times: (path, MicroTime?). kopf and other Python clients send `+00:00` offsets; the real
# server parses any RFC 3339 time and always answers in UTC with `Z`, so kubectl can read them.
EVENT_TIME_FIELDS = (("firstTimestamp", False), ("lastTimestamp", False), ("eventTime", True),
                     ("series.lastObservedTime", True))


def _event_time_slots(obj: JsonObj) -> Iterable[tuple[JsonObj, str, bool]]:
    for path, micro in EVENT_TIME_FIELDS:
        *parents, leaf = path.split(".")
        holder: Any = obj
        for step in parents:
            holder = holder.get(step) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and holder.get(leaf) not in (None, ""):
            yield holder, leaf, micro


def _default_event(obj: JsonObj) -> None:
    for holder, leaf, micro in _event_time_slots(obj):
        try:
            holder[leaf] = canonical_rfc3339(holder[leaf], micro=micro)
        except ValueError:
            pass  # left as sent; the validator names the field


def _validate_event(obj: JsonObj, old: JsonObj | None) -> list[tuple[str, str, str]]:
    causes = []
    for holder, leaf, micro in _event_time_slots(obj):
        try:
            canonical_rfc3339(holder[leaf], micro=micro)
        except (ValueError, TypeError):
            path = next(p for p, _m in EVENT_TIME_FIELDS if p.endswith(leaf))
            causes.append((path, "FieldValueInvalid",
                           f"Invalid value: {holder[leaf]!r}: not an RFC 3339 time (e.g. 2026-01-02T15:04:05Z)"))
    return causes


DEFAULTERS: dict[str, Callable[[JsonObj], None]] = {
    "Deployment": _default_deployment, "Namespace": _default_namespace, "Pod": _default_pod,
    "Event": _default_event,
}
VALIDATORS: dict[str, Callable[[JsonObj, JsonObj | None], list[tuple[str, str, str]]]] = {
    "Deployment": _validate_deployment, "Pod": _validate_pod, "ConfigMap": _validate_configmap,
    "Event": _validate_event,
}


# ----------------------------------------------------------------------------------------------
# The object store.


@dataclass(frozen=True)
class WatchEvent:
    """One change, numbered by the resourceVersion it produced."""

    resource_version: int
    type: str  # ADDED, MODIFIED, DELETED
    rtype: ResourceType
    obj: JsonObj
    old: JsonObj | None


Listener = Callable[[WatchEvent], None]


class ObjectStore:
    """Objects by type, namespace and name, with one global resourceVersion counter.

    All methods are synchronous and never await, so within one event loop each one is atomic;
    listeners (watch streams, the kubelet) are called synchronously after every change and must
    only enqueue. Stored objects are never mutated in place: every change stores a new dict, so
    listeners and readers may keep references.
    """

    def __init__(self, types: Iterable[ResourceType] = BUILTIN_TYPES, *, history_length: int = HISTORY_LENGTH):
        self.types = {t.key: t for t in types}
        self.by_kind = {t.kind: t for t in self.types.values()}
        self._objects: dict[tuple[str, str], dict[tuple[str, str], JsonObj]] = {k: {} for k in self.types}
        self.resource_version = 1
        self._history: deque[WatchEvent] = deque(maxlen=history_length)
        self._listeners: list[Listener] = []
        for name in INITIAL_NAMESPACES:
            self.create(self.type("", "namespaces"), "", {"metadata": {"name": name}})

    # -- lookup

    def type(self, group: str, plural: str) -> ResourceType:
        try:
            return self.types[(group, plural)]
        except KeyError:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource "
                           f"({plural}{'.' + group if group else ''})") from None

    def type_by_resource(self, group: str, plural_or_short: str) -> ResourceType | None:
        for t in self.types.values():
            if t.group == group and plural_or_short in (t.plural, t.singular, *t.short_names):
                return t
        return None

    def get(self, rtype: ResourceType, namespace: str, name: str) -> JsonObj:
        obj = self._objects[rtype.key].get((namespace if rtype.namespaced else "", name))
        if obj is None:
            raise not_found(rtype, name)
        return obj

    def find(self, rtype: ResourceType, namespace: str, name: str) -> JsonObj | None:
        return self._objects[rtype.key].get((namespace if rtype.namespaced else "", name))

    def list(self, rtype: ResourceType, namespace: str | None = None, label_selector: str | None = None,
             field_selector: str | None = None) -> list[JsonObj]:
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector)
        items = [o for (ns, _n), o in sorted(self._objects[rtype.key].items())
                 if (not namespace or ns == namespace) and selector_matches(o, labels, fields)]
        return items

    # -- listeners and history

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def history_since(self, rtype: ResourceType, resource_version: int) -> list[WatchEvent] | None:
        """Events of `rtype` after `resource_version`, or None when they are no longer retained."""
        if self._history and resource_version < self._history[0].resource_version - 1:
            return None
        return [e for e in self._history if e.resource_version > resource_version and e.rtype is rtype]

    def oldest_retained(self) -> int:
        return self._history[0].resource_version if self._history else self.resource_version

    def _emit(self, kind: str, rtype: ResourceType, obj: JsonObj, old: JsonObj | None) -> None:
        event = WatchEvent(int(obj["metadata"]["resourceVersion"]), kind, rtype, obj, old)
        self._history.append(event)
        for listener in list(self._listeners):
            listener(event)

    def _next_version(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    # -- writes

    def create(self, rtype: ResourceType, namespace: str, body: JsonObj, *, dry_run: bool = False) -> JsonObj:
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        obj = copy.deepcopy(body)
        self._check_kind(rtype, obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        namespace = self._namespace_for(rtype, namespace, meta)
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = self._generated_name(rtype, namespace, meta["generateName"])
            else:
                raise invalid(rtype, "", [("metadata.name", "FieldValueRequired",
                                           "Required value: name or generateName is required")])
        name = meta["name"]
        problem = name_problem(name, label=rtype.kind == "Namespace")
        if problem:
            raise invalid(rtype, name, [("metadata.name", "FieldValueInvalid", problem)])
        if rtype.namespaced:
            self._require_namespace(namespace)
        if (namespace, name) in self._objects[rtype.key]:
            raise ApiError(409, "AlreadyExists", f'{rtype.qualified} "{name}" already exists',
                           {"name": name, "group": rtype.group, "kind": rtype.plural})
        for key in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "managedFields", "selfLink"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        if rtype.tracks_generation:
            meta["generation"] = 1
        else:
            meta.pop("generation", None)
        if DEFAULTERS.get(rtype.kind):
            DEFAULTERS[rtype.kind](obj)
        causes = VALIDATORS.get(rtype.kind, lambda o, p: [])(obj, None)
        if causes:
            raise invalid(rtype, name, causes)
        if dry_run:
            meta["resourceVersion"] = str(self.resource_version)
            return obj
        meta["resourceVersion"] = self._next_version()
        self._objects[rtype.key][(namespace, name)] = obj
        self._emit("ADDED", rtype, obj, None)
        return obj

    def replace(self, rtype: ResourceType, namespace: str, name: str, body: JsonObj, *,
                subresource: str | None = None, dry_run: bool = False) -> JsonObj:
        """PUT semantics: optimistic concurrency on resourceVersion, immutable identity fields."""
        old = self.get(rtype, namespace, name)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        new = copy.deepcopy(body)
        self._check_kind(rtype, new)
        meta = new.setdefault("metadata", {})
        if meta.get("name") not in (None, name):
            raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on "
                              f"the URL ({name})")
        if rtype.namespaced and meta.get("namespace") not in (None, "", namespace):
            raise bad_request("the namespace of the provided object does not match the namespace sent "
                              "on the request")
        sent_version = meta.get("resourceVersion")
        if sent_version not in (None, "") and str(sent_version) != old["metadata"]["resourceVersion"]:
            raise conflict(rtype, name)
        if subresource == "status":
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            new = merged
        else:
            if "status" in rtype.subresources:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            old_meta = old["metadata"]
            for key in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                        "generation", "namespace", "name"):
                if key in old_meta:
                    meta[key] = old_meta[key]
                else:
                    meta.pop(key, None)
            if DEFAULTERS.get(rtype.kind):
                DEFAULTERS[rtype.kind](new)
            if rtype.kind == "Namespace":
                new["status"] = copy.deepcopy(old.get("status", {}))
        causes = VALIDATORS.get(rtype.kind, lambda o, p: [])(new, old)
        if causes:
            raise invalid(rtype, name, causes)
        return self._store_update(rtype, old, new, dry_run=dry_run)

    def patch(self, rtype: ResourceType, namespace: str, name: str, content_type: str, patch: Any, *,
              subresource: str | None = None, dry_run: bool = False) -> JsonObj:
        old = self.get(rtype, namespace, name)
        patched = apply_patch(content_type, old, patch)
        patched.setdefault("metadata", {})
        if patched["metadata"].get("resourceVersion") is None:
            patched["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        return self.replace(rtype, namespace, name, patched, subresource=subresource, dry_run=dry_run)

    def _store_update(self, rtype: ResourceType, old: JsonObj, new: JsonObj, *, dry_run: bool) -> JsonObj:
        meta = new["metadata"]
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if rtype.tracks_generation and new.get("spec") != old.get("spec"):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if new == old:
            return old
        if dry_run:
            return new
        meta["resourceVersion"] = self._next_version()
        key = (meta.get("namespace", "") if rtype.namespaced else "", meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self._objects[rtype.key][key]
            self._emit("DELETED", rtype, new, old)
            return new
        self._objects[rtype.key][key] = new
        self._emit("MODIFIED", rtype, new, old)
        return new

    def delete(self, rtype: ResourceType, namespace: str, name: str, *, dry_run: bool = False,
               preconditions: JsonObj | None = None) -> JsonObj:
        """Delete now, or mark for deletion while finalizers remain (as the real server does)."""
        old = self.get(rtype, namespace, name)
        pre = preconditions or {}
        if pre.get("resourceVersion") and str(pre["resourceVersion"]) != old["metadata"]["resourceVersion"]:
            raise conflict(rtype, name)
        if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
            raise ApiError(409, "Conflict", f'Precondition failed: UID in precondition: {pre["uid"]}, '
                           f'UID in object meta: {old["metadata"]["uid"]}')
        if dry_run:
            return old
        if rtype.kind == "Namespace":
            self._empty_namespace(name)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["resourceVersion"] = self._next_version()
            self._objects[rtype.key][(namespace if rtype.namespaced else "", name)] = new
            self._emit("MODIFIED", rtype, new, old)
            return new
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = self._next_version()
        del self._objects[rtype.key][(namespace if rtype.namespaced else "", name)]
        self._emit("DELETED", rtype, gone, old)
        return gone

    def _empty_namespace(self, namespace: str) -> None:
        for rtype in self.types.values():
            if rtype.namespaced:
                for (ns, name) in [k for k in self._objects[rtype.key] if k[0] == namespace]:
                    obj = self._objects[rtype.key][(ns, name)]
                    if obj["metadata"].get("finalizers"):
                        obj = copy.deepcopy(obj)
                        obj["metadata"]["finalizers"] = []
                        obj["metadata"]["resourceVersion"] = str(self.resource_version)
                        self._objects[rtype.key][(ns, name)] = obj
                    self.delete(rtype, ns, name)

    # -- internals

    def _check_kind(self, rtype: ResourceType, obj: JsonObj) -> None:
        kind = obj.setdefault("kind", rtype.kind)
        api_version = obj.setdefault("apiVersion", rtype.api_version)
        if kind != rtype.kind or api_version != rtype.api_version:
            raise bad_request(f"the API version in the data ({api_version}) and kind ({kind}) do not "
                              f"match the resource {rtype.qualified} ({rtype.api_version}, {rtype.kind})")

    def _namespace_for(self, rtype: ResourceType, namespace: str, meta: JsonObj) -> str:
        if not rtype.namespaced:
            meta.pop("namespace", None)
            return ""
        if meta.get("namespace") not in (None, "", namespace):
            raise bad_request("the namespace of the provided object does not match the namespace sent on "
                              "the request")
        meta["namespace"] = namespace
        return namespace

    def _require_namespace(self, namespace: str) -> None:
        ns_type = self.types[("", "namespaces")]
        ns = self._objects[ns_type.key].get(("", namespace))
        if ns is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if ns["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f"unable to create new content in namespace {namespace} "
                           "because it is being terminated")

    def _generated_name(self, rtype: ResourceType, namespace: str, prefix: str) -> str:
        base = prefix[: 253 - 5]
        for _ in range(100):
            candidate = base + random_suffix()
            if (namespace, candidate) not in self._objects[rtype.key]:
                return candidate
        raise ApiError(409, "AlreadyExists", f"could not generate a unique name from {prefix!r}")


# ----------------------------------------------------------------------------------------------
# Scale subresource.


def scale_of(deployment: JsonObj) -> JsonObj:
    meta = deployment["metadata"]
    return {
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                     if k in meta},
        "spec": {"replicas": (deployment.get("spec") or {}).get("replicas", 0)},
        "status": {"replicas": (deployment.get("status") or {}).get("replicas", 0),
                   "selector": selector_string((deployment.get("spec") or {}).get("selector"))},
    }


def replicas_from_scale(rtype: ResourceType, name: str, scale: JsonObj) -> int:
    if not isinstance(scale, dict) or scale.get("kind", "Scale") != "Scale":
        raise bad_request("the body must be an autoscaling/v1 Scale")
    replicas = (scale.get("spec") or {}).get("replicas", 0)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise ApiError(422, "Invalid", f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: '
                       f"{replicas!r}: must be greater than or equal to 0",
                       {"name": name, "group": "autoscaling", "kind": "Scale",
                        "causes": [{"reason": "FieldValueInvalid", "field": "spec.replicas",
                                    "message": "must be greater than or equal to 0"}]})
    return replicas


# ----------------------------------------------------------------------------------------------
# Request records.


@dataclass
class RequestRecord:
    """One API request as a test needs it: what was asked of which resource, and the answer."""

    method: str
    path: str
    query: dict[str, str]
    verb: str
    group: str | None
    resource: str | None
    subresource: str | None
    namespace: str | None
    name: str | None
    user_agent: str
    content_type: str
    body: str
    proxied: bool
    status: int = 0
    time: float = field(default_factory=time.time)

    def summary(self) -> str:
        target = "/".join(x for x in (self.group or "core", self.resource, self.subresource) if x)
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.verb} {target} {where}{self.name or ''} -> {self.status}".strip()


@dataclass(frozen=True)
class ApiPath:
    """A resource URL taken apart: /api/v1/namespaces/N/pods/NAME/status and friends."""

    group: str
    version: str
    plural: str | None
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_api_path(path: str) -> ApiPath | None:
    segs = [s for s in path.split("/") if s]
    if len(segs) >= 2 and segs[0] == "api":
        group, version, rest = "", segs[1], segs[2:]
    elif len(segs) >= 3 and segs[0] == "apis":
        group, version, rest = segs[1], segs[2], segs[3:]
    else:
        return None
    if not rest:
        return ApiPath(group, version, None, None, None, None)
    if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    else:
        namespace = None
    return ApiPath(group, version, rest[0], namespace, rest[1] if len(rest) > 1 else None,
                   rest[2] if len(rest) > 2 else None)


def rbac_verb(method: str, api: ApiPath | None, query: dict[str, str]) -> str:
    if api is None or api.plural is None:
        return method.lower()
    if method == "GET":
        if query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if api.name else "list"
    if method == "DELETE":
        return "delete" if api.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def _summarise_body(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= 2000 else text[:2000] + "..."


# ----------------------------------------------------------------------------------------------
# Server-side tables for `kubectl get`.


def _table_columns(rtype: ResourceType) -> list[tuple[str, str, Callable[[JsonObj], Any]]]:
    age = ("Age", "string", lambda o: human_age(o["metadata"].get("creationTimestamp")))
    name = ("Name", "string", lambda o: o["metadata"]["name"])
    if rtype.kind == "Pod":
        def ready(o):
            statuses = (o.get("status") or {}).get("containerStatuses") or []
            total = len((o.get("spec") or {}).get("containers") or [])
            return f"{sum(1 for s in statuses if s.get('ready'))}/{total}"
        return [name, ("Ready", "string", ready),
                ("Status", "string", lambda o: "Terminating" if o["metadata"].get("deletionTimestamp")
                 else (o.get("status") or {}).get("phase", "")),
                ("Restarts", "string", lambda o: "0"), age]
    if rtype.kind == "Deployment":
        def ready(o):
            return f"{(o.get('status') or {}).get('readyReplicas', 0)}/{(o.get('spec') or {}).get('replicas', 0)}"
        return [name, ("Ready", "string", ready),
                ("Up-to-date", "integer", lambda o: (o.get("status") or {}).get("updatedReplicas", 0)),
                ("Available", "integer", lambda o: (o.get("status") or {}).get("availableReplicas", 0)), age]
    if rtype.kind == "Namespace":
        return [name, ("Status", "string", lambda o: (o.get("status") or {}).get("phase", "")), age]
    if rtype.kind == "ConfigMap":
        return [name, ("Data", "integer", lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {})), age]
    if rtype.kind == "Event":
        return [("Last Seen", "string", lambda o: human_age(o.get("lastTimestamp") or o.get("eventTime") or o["metadata"].get(
                    "creationTimestamp"))),
                ("Type", "string", lambda o: o.get("type", "")),
                ("Reason", "string", lambda o: o.get("reason", "")),
                ("Object", "string", lambda o: f"{(o.get('involvedObject') or {}).get('kind', '').lower()}/"
                 f"{(o.get('involvedObject') or {}).get('name', '')}"),
                ("Message", "string", lambda o: o.get("message", ""))]
    return [name, age]


def as_table(rtype: ResourceType, items: list[JsonObj], resource_version: str) -> JsonObj:
    columns = _table_columns(rtype)
    return {
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [{"name": n, "type": t, "format": "name" if n == "Name" else "",
                               "description": n, "priority": 0} for n, t, _f in columns],
        "rows": [{"cells": [f(o) for _n, _t, f in columns],
                  "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": o["metadata"]}} for o in items],
    }


def wants_table(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "as=Table" in accept


# ----------------------------------------------------------------------------------------------
# OpenAPI v3 for kubectl (explain, and its check that the server validates fields itself).
#
# The standalone CRD server runs no OpenAPI controller, so it publishes no schemas for custom
# resources; inside a kube-apiserver the aggregator would. The documents are built here from the
# CRDs it holds, in the shape kubectl reads: one document per group-version, schemas carrying
# x-kubernetes-group-version-kind, and PATCH operations that accept the fieldValidation parameter.

OBJECT_META_REF = "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
OBJECT_META_SCHEMA = {
    "type": "object",
    "description": "Standard object metadata: name, namespace, labels, annotations and the fields the "
                   "server sets (uid, resourceVersion, generation, creationTimestamp).",
    "properties": {
        "name": {"type": "string", "description": "Name, unique within the namespace."},
        "generateName": {"type": "string", "description": "Prefix the server completes into a unique name."},
        "namespace": {"type": "string", "description": "Namespace of a namespaced object."},
        "labels": {"type": "object", "additionalProperties": {"type": "string"},
                   "description": "Map of string keys and values for selecting objects."},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "Map of string keys and values for tools and operators."},
        "uid": {"type": "string", "description": "Unique id the server assigns."},
        "resourceVersion": {"type": "string", "description": "Version of this object, for optimistic concurrency."},
        "generation": {"type": "integer", "format": "int64", "description": "Sequence number of spec changes."},
        "creationTimestamp": {"type": "string", "format": "date-time", "description": "When the object was created."},
        "deletionTimestamp": {"type": "string", "format": "date-time", "description": "When deletion was requested."},
        "finalizers": {"type": "array", "items": {"type": "string"},
                       "description": "Must be empty before the object is deleted."},
        "ownerReferences": {"type": "array", "items": {"type": "object"},
                            "description": "Objects this one depends on."},
    },
}


def reversed_group(group: str) -> str:
    return ".".join(reversed(group.split("."))) if group else "io.k8s.api.core"


def _patch_operation(gvk: JsonObj) -> JsonObj:
    return {"patch": {
        "x-kubernetes-group-version-kind": gvk,
        "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"},
                        "description": "Ignore, Warn or Strict handling of unknown fields."}],
        "responses": {"200": {"description": "OK"}},
    }}


def openapi_document(kinds: list[tuple[str, str, str, str, bool, JsonObj]]) -> JsonObj:
    """An OpenAPI v3 document for (group, version, kind, plural, namespaced, schema) entries."""
    schemas: JsonObj = {"io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta": OBJECT_META_SCHEMA}
    paths: JsonObj = {}
    for group, version, kind, plural, namespaced, schema in kinds:
        gvk = [{"group": group, "version": version, "kind": kind}]
        body = copy.deepcopy(schema) if schema else {"type": "object"}
        body.setdefault("properties", {})["metadata"] = {"allOf": [{"$ref": OBJECT_META_REF}],
                                                         "description": "Standard object metadata."}
        body["x-kubernetes-group-version-kind"] = gvk
        schemas[f"{reversed_group(group)}.{version}.{kind}"] = body
        prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
        scope = "/namespaces/{namespace}" if namespaced else ""
        paths[f"{prefix}{scope}/{plural}/{{name}}"] = _patch_operation(gvk[0])
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.36.4-emulated"},
            "paths": paths, "components": {"schemas": schemas}}


def crd_kinds(crds: list[JsonObj]) -> dict[str, list[tuple[str, str, str, str, bool, JsonObj]]]:
    """OpenAPI entries of established CRDs by "apis/<group>/<version>"."""
    out: dict[str, list] = {}
    for crd in crds:
        spec = crd.get("spec") or {}
        conditions = {c.get("type"): c.get("status") for c in (crd.get("status") or {}).get("conditions") or []}
        if conditions.get("Established") != "True":
            continue
        for version in spec.get("versions") or []:
            if not version.get("served", True):
                continue
            schema = ((version.get("schema") or {}).get("openAPIV3Schema")) or {}
            out.setdefault(f"apis/{spec['group']}/{version['name']}", []).append(
                (spec["group"], version["name"], spec["names"]["kind"], spec["names"]["plural"],
                 spec.get("scope") == "Namespaced", schema))
    return out


def document_hash(doc: JsonObj) -> str:
    return hashlib.sha512(_dumps(doc).encode()).hexdigest().upper()


# ----------------------------------------------------------------------------------------------
# The HTTP server.


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=_dumps(body), status=status, content_type="application/json")


def error_response(err: ApiError) -> web.Response:
    return json_response(err.status(), err.code)


_HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
               "proxy-connection", "te", "trailer", "content-encoding", "accept-encoding"}
_CLOSE_WATCH = object()


@dataclass
class Fault:
    """Make matching requests fail or stall, to test that clients retry and back off.

    A request matches when its method equals `method` (any when None) and `path_pattern` is found
    in its path (a regular expression). The first `times` matching requests wait `delay_s` and
    then, unless `status` is 0 (a slow but working server), are answered with `status`.
    """

    status: int = 500
    method: str | None = None
    path_pattern: str = ""
    times: int = 1
    delay_s: float = 0.0
    reason: str = "InternalError"
    message: str = "fault injected by the test"
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.hits < self.times and (self.method is None or self.method == method)
                and re.search(self.path_pattern, path) is not None)


class CoreApi:
    """The emulated core API (aiohttp) on 127.0.0.1, optionally fronting the CRD server.

    Start it with `await start()`; `url` then holds its address. Call `set_upstream(url)` once the
    CRD server runs so that everything this server does not serve is proxied there.
    """

    def __init__(self, *, store: ObjectStore | None = None, host: str = "127.0.0.1", port: int = 0,
                 users_by_token: dict[str, str] | None = None):
        self.store = store or ObjectStore()
        self.host = host
        self.port = port
        self.users_by_token = users_by_token or {}
        self.upstream: str | None = None
        self.url = ""
        self._requests: list[RequestRecord] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._watch_queues: set[asyncio.Queue] = set()
        self._proxied_watches: set[aiohttp.ClientResponse] = set()
        self.faults: list[Fault] = []
        self.app = web.Application(client_max_size=64 << 20)
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    # -- lifecycle

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"

    def set_upstream(self, url: str | None) -> None:
        self.upstream = url.rstrip("/") if url else None

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner:
            await self._runner.cleanup()
        if self._session:
            await self._session.close()

    # -- request log

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of every request served so far, oldest first."""
        return list(self._requests)

    def requests_from(self, user_agent_prefix: str) -> list[RequestRecord]:
        return [r for r in self._requests if r.user_agent.startswith(user_agent_prefix)]

    def clear_requests(self) -> None:
        self._requests.clear()

    # -- fault injection

    def add_fault(self, fault: Fault) -> Fault:
        """Arm `fault`; it disarms itself after `fault.times` hits (see `Fault.hits`)."""
        self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        self.faults.clear()

    def drop_watches(self) -> int:
        """End every open watch stream now, local and proxied, as an apiserver restart would.
        Thread-safe to call from outside the loop only through the loop (EmulatedCluster.call)."""
        dropped = len(self._watch_queues) + len(self._proxied_watches)
        for queue in list(self._watch_queues):
            queue.put_nowait(_CLOSE_WATCH)
        for upstream in list(self._proxied_watches):
            upstream.close()
        return dropped

    async def _injected_fault(self, request: web.Request) -> web.Response | None:
        fault = next((f for f in list(self.faults) if f.matches(request.method, request.path)), None)
        if fault is None:
            return None
        fault.hits += 1
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if not fault.status:
            return None
        return error_response(ApiError(fault.status, fault.reason, fault.message))

    # -- dispatch

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read() if request.can_read_body else b""
        query = {k: v for k, v in request.query.items()}
        api = parse_api_path(request.path)
        record = RequestRecord(
            method=request.method, path=request.path, query=query, verb=rbac_verb(request.method, api, query),
            group=api.group if api else None, resource=api.plural if api else None,
            subresource=api.subresource if api else None, namespace=api.namespace if api else None,
            name=api.name if api else None, user_agent=request.headers.get("User-Agent", ""),
            content_type=request.headers.get("Content-Type", ""), body=_summarise_body(raw),
            proxied=not self._served_here(request.path))
        self._requests.append(record)
        try:
            injected = await self._injected_fault(request)
            if injected is not None:
                response = injected
            elif record.proxied:
                response = await self._proxy(request, raw, record)
            else:
                response = await self._serve(request, api, query, raw, record)
        except ApiError as err:
            response = error_response(err)
        except json.JSONDecodeError as err:
            response = error_response(bad_request(f"the request body is not valid JSON: {err}"))
        record.status = response.status
        return response

    def _served_here(self, path: str) -> bool:
        """Core API, local groups, discovery and health here; CRD groups and /openapi upstream."""
        segs = [s for s in path.split("/") if s]
        if not segs:
            return True
        if segs[0] == "apis":
            return len(segs) == 1 or segs[1] in LOCAL_GROUPS
        if segs[0] == "openapi":
            return segs[1:2] == ["v3"]
        return segs[0] in ("api", "version", "healthz", "livez", "readyz")

    async def _serve(self, request: web.Request, api: ApiPath | None, query: dict[str, str],
                     raw: bytes, record: RequestRecord) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        if path in ("/healthz", "/livez", "/readyz") or path.startswith(("/healthz/", "/livez/", "/readyz/")):
            return web.Response(text="ok")
        if path == "/version":
            return json_response(EMULATED_VERSION)
        if path == "/":
            return json_response({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/version"]})
        if path == "/api":
            return json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}]})
        if path == "/apis":
            return json_response(await self._group_list())
        if path == "/openapi/v3" or path.startswith("/openapi/v3/"):
            return await self._openapi_v3(request, raw, record)
        segs = [x for x in path.split("/") if x]
        if len(segs) == 2 and segs[0] == "apis":
            return json_response(self._group(segs[1]))
        if api is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if api.plural is None:
            return json_response(self._resource_list(api.group, api.version))
        if api.group and api.version != self._group_version(api.group):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rtype = self.store.type(api.group, api.plural)
        return await self._resource_request(request, rtype, api, query, raw, record)

    # -- discovery

    def _group_version(self, group: str) -> str:
        return next(t.version for t in self.store.types.values() if t.group == group)

    def _local_groups(self) -> list[JsonObj]:
        groups = []
        for group in sorted(g for g in LOCAL_GROUPS if g):
            version = self._group_version(group)
            gv = {"groupVersion": f"{group}/{version}", "version": version}
            groups.append({"name": group, "versions": [gv], "preferredVersion": gv})
        return groups

    async def _group_list(self) -> JsonObj:
        """Local groups plus the CRD server's: it serves /apis/<group> but no /apis list (inside a
        kube-apiserver the aggregator does), so its groups are found from the CRDs it holds."""
        groups = self._local_groups()
        if self.upstream:
            try:
                crds = await self._upstream_crds()
                names = sorted({"apiextensions.k8s.io"} | {c["spec"]["group"] for c in crds})
                docs = await asyncio.gather(*(self._upstream_json(f"/apis/{name}") for name in names),
                                            return_exceptions=True)
                groups += [d for d in docs if isinstance(d, dict) and d.get("kind") == "APIGroup"
                           and d.get("name") not in LOCAL_GROUPS]
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
                pass
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [{k: v for k, v in g.items() if k not in ("kind", "apiVersion")} for g in groups]}

    async def _upstream_crds(self) -> list[JsonObj]:
        if not self.upstream:
            return []
        try:
            listed = await self._upstream_json("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return []
        return listed.get("items", [])

    async def _openapi_v3(self, request: web.Request, raw: bytes, record: RequestRecord) -> web.StreamResponse:
        docs: dict[str, JsonObj] = {}
        local: dict[str, list] = {}
        for t in self.store.types.values():
            if t.kind not in REVIEW_KINDS:
                key = f"apis/{t.group}/{t.version}" if t.group else f"api/{t.version}"
                local.setdefault(key, []).append((t.group, t.version, t.kind, t.plural, t.namespaced, {}))
        for key, kinds in {**local, **crd_kinds(await self._upstream_crds())}.items():
            docs[key] = openapi_document(kinds)
        if request.path == "/openapi/v3":
            paths: JsonObj = {}
            if self.upstream:
                try:
                    paths.update((await self._upstream_json("/openapi/v3")).get("paths", {}))
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    pass
            paths.update({key: {"serverRelativeURL": f"/openapi/v3/{key}?hash={document_hash(doc)}"}
                          for key, doc in docs.items()})
            return json_response({"paths": paths})
        key = request.path[len("/openapi/v3/"):]
        if key in docs:
            return json_response(docs[key])
        record.proxied = True
        return await self._proxy(request, raw, record)

    def _group(self, group: str) -> JsonObj:
        version = self._group_version(group)
        gv = {"groupVersion": f"{group}/{version}", "version": version}
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv], "preferredVersion": gv}

    def _resource_list(self, group: str, version: str) -> JsonObj:
        if group and version != self._group_version(group):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resources = []
        for t in self.store.types.values():
            if t.group != group or t.version != version:
                continue
            entry: JsonObj = {"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
                              "kind": t.kind, "verbs": list(t.verbs)}
            if t.short_names:
                entry["shortNames"] = list(t.short_names)
            if t.categories:
                entry["categories"] = list(t.categories)
            resources.append(entry)
            for sub in t.subresources:
                sub_entry = {"name": f"{t.plural}/{sub}", "singularName": "", "namespaced": t.namespaced,
                             "kind": "Scale" if sub == "scale" else t.kind, "verbs": ["get", "patch", "update"]}
                if sub == "scale":
                    sub_entry.update(group="autoscaling", version="v1")
                resources.append(sub_entry)
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}

    # -- resources

    async def _resource_request(self, request: web.Request, rtype: ResourceType, api: ApiPath,
                                query: dict[str, str], raw: bytes, record: RequestRecord) -> web.StreamResponse:
        method = request.method
        namespace = api.namespace or ""
        if rtype.namespaced is False and api.namespace:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        dry_run = query.get("dryRun") == "All"
        if rtype.kind in REVIEW_KINDS:
            if method != "POST" or api.name:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {rtype.qualified}")
            try:
                review = json.loads(raw or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                review = {}  # kubectl auth can-i sends protobuf; the answer does not depend on it
            return json_response(self._review(rtype, review, namespace), 201)
        if raw and "protobuf" in request.headers.get("Content-Type", ""):
            # kubectl's generator commands (`kubectl create namespace`) post protobuf only
            try:
                if method != "POST" or api.name or api.subresource:
                    raise ProtobufUnsupported("protobuf is read only in create requests")
                raw = json.dumps(protobuf_body.decode(raw)).encode()
            except (ProtobufUnsupported, UnicodeDecodeError) as err:
                raise ApiError(415, "UnsupportedMediaType", "the emulated core API accepts JSON bodies "
                               f"(application/json and the JSON patch types); {err}. Send YAML or JSON "
                               "instead, e.g. `kubectl create ... --dry-run=client -o yaml | kubectl apply "
                               "-f -`") from None
        if "apply-patch" in request.headers.get("Content-Type", ""):
            raise ApiError(415, "UnsupportedMediaType", "server-side apply is not emulated by the core API "
                           "of `make live` (custom resources, served by the real CRD server, do support it): "
                           "run `kubectl apply` without --server-side")
        if api.subresource:
            return self._subresource_request(request, rtype, api, raw, dry_run)
        if api.name is None:
            if method == "GET":
                if query.get("watch") in ("true", "1"):
                    return await self._watch(request, rtype, api.namespace, query, record)
                return self._list(request, rtype, api.namespace, query)
            if method == "POST":
                if rtype.namespaced and not api.namespace:
                    raise ApiError(405, "MethodNotAllowed", "create needs a namespace in the URL")
                return json_response(self.store.create(rtype, namespace, json.loads(raw), dry_run=dry_run), 201)
            if method == "DELETE":
                items = self.store.list(rtype, api.namespace, query.get("labelSelector"), query.get("fieldSelector"))
                deleted = [self.store.delete(rtype, o["metadata"].get("namespace", ""), o["metadata"]["name"],
                                             dry_run=dry_run) for o in items]
                return json_response({"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                                      "metadata": {"resourceVersion": str(self.store.resource_version)},
                                      "items": deleted})
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        if method == "GET":
            obj = self.store.get(rtype, namespace, api.name)
            if wants_table(request):
                return json_response(as_table(rtype, [obj], obj["metadata"]["resourceVersion"]))
            return json_response(obj)
        if method == "PUT":
            return json_response(self.store.replace(rtype, namespace, api.name, json.loads(raw), dry_run=dry_run))
        if method == "PATCH":
            return json_response(self.store.patch(rtype, namespace, api.name, request.headers.get("Content-Type", ""),
                                                  json.loads(raw), dry_run=dry_run))
        if method == "DELETE":
            options = json.loads(raw) if raw.strip() else {}
            return json_response(self.store.delete(rtype, namespace, api.name, dry_run=dry_run,
                                                   preconditions=(options or {}).get("preconditions")))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    def _subresource_request(self, request: web.Request, rtype: ResourceType, api: ApiPath, raw: bytes,
                             dry_run: bool) -> web.StreamResponse:
        namespace = api.namespace or ""
        sub = api.subresource
        if sub not in rtype.subresources or api.name is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        method = request.method
        if sub == "scale":
            current = self.store.get(rtype, namespace, api.name)
            if method == "GET":
                return json_response(scale_of(current))
            if method == "PUT":
                body = json.loads(raw)
            elif method == "PATCH":
                body = apply_patch(request.headers.get("Content-Type", ""), scale_of(current), json.loads(raw))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on scale")
            replicas = replicas_from_scale(rtype, api.name, body)
            sent = (body.get("metadata") or {}).get("resourceVersion")
            if sent and str(sent) != current["metadata"]["resourceVersion"]:
                raise conflict(rtype, api.name)
            updated = copy.deepcopy(current)
            updated["spec"]["replicas"] = replicas
            return json_response(scale_of(self.store.replace(rtype, namespace, api.name, updated, dry_run=dry_run)))
        if sub == "finalize":
            if method != "PUT":
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on finalize")
            return json_response(self.store.get(rtype, namespace, api.name))
        if method == "GET":
            return json_response(self.store.get(rtype, namespace, api.name))
        if method == "PUT":
            return json_response(self.store.replace(rtype, namespace, api.name, json.loads(raw),
                                                    subresource="status", dry_run=dry_run))
        if method == "PATCH":
            return json_response(self.store.patch(rtype, namespace, api.name, request.headers.get("Content-Type", ""),
                                                  json.loads(raw), subresource="status", dry_run=dry_run))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on status")

    def _list(self, request: web.Request, rtype: ResourceType, namespace: str | None,
              query: dict[str, str]) -> web.Response:
        items = self.store.list(rtype, namespace, query.get("labelSelector"), query.get("fieldSelector"))
        version = str(self.store.resource_version)
        meta: JsonObj = {"resourceVersion": version}
        if query.get("continue"):
            try:
                after = json.loads(base64.urlsafe_b64decode(query["continue"].encode()))
            except (ValueError, TypeError):
                raise ApiError(400, "BadRequest", "invalid continue token") from None
            items = [o for o in items if [o["metadata"].get("namespace", ""), o["metadata"]["name"]] > after]
        limit = int(query.get("limit") or 0)
        if limit > 0 and len(items) > limit:
            last = items[limit - 1]["metadata"]
            meta["continue"] = base64.urlsafe_b64encode(
                _dumps([last.get("namespace", ""), last["name"]]).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        if wants_table(request):
            table = as_table(rtype, items, version)
            table["metadata"] = meta
            return json_response(table)
        return json_response({"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version, "metadata": meta,
                              "items": [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")}
                                        for o in items]})

    async def _watch(self, request: web.Request, rtype: ResourceType, namespace: str | None,
                     query: dict[str, str], record: RequestRecord) -> web.StreamResponse:
        labels = parse_label_selector(query.get("labelSelector"))
        fields = parse_field_selector(query.get("fieldSelector"))
        timeout_s = min(int(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT_S), MAX_WATCH_TIMEOUT_S)
        send_initial = query.get("sendInitialEvents") == "true"
        since = query.get("resourceVersion") or ""

        def in_scope(obj: JsonObj) -> bool:
            return not namespace or obj["metadata"].get("namespace") == namespace

        def frame(event: WatchEvent) -> JsonObj | None:
            if not in_scope(event.obj):
                return None
            now_matches = selector_matches(event.obj, labels, fields)
            was_matching = event.old is not None and selector_matches(event.old, labels, fields)
            if event.type == "MODIFIED":
                if now_matches:
                    return {"type": "MODIFIED" if was_matching else "ADDED", "object": event.obj}
                return {"type": "DELETED", "object": event.obj} if was_matching else None
            if event.type == "DELETED":
                return {"type": "DELETED", "object": event.obj} if (now_matches or was_matching) else None
            return {"type": event.type, "object": event.obj} if now_matches else None

        queue: asyncio.Queue = asyncio.Queue()

        def listener(event: WatchEvent) -> None:
            if event.rtype is rtype:
                queue.put_nowait(event)

        # No await between the snapshot and subscribing: no event can fall in between.
        initial: list[JsonObj] = []
        gone = False
        if send_initial or since in ("", "0"):
            initial = [{"type": "ADDED", "object": o} for o in self.store.list(rtype, namespace) if
                       selector_matches(o, labels, fields)]
            if send_initial:
                initial.append({"type": "BOOKMARK", "object": {
                    "kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": {
                        "resourceVersion": str(self.store.resource_version),
                        "annotations": {INITIAL_EVENTS_END: "true"}}}})
        else:
            try:
                replay = self.store.history_since(rtype, int(since))
            except ValueError:
                raise bad_request(f"invalid resourceVersion {since!r}") from None
            if replay is None:
                gone = True
            else:
                initial = [f for f in (frame(e) for e in replay) if f]
        self.store.subscribe(listener)
        self._watch_queues.add(queue)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                           "Cache-Control": "no-cache, private"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            record.status = 200
            if gone:
                err = ApiError(410, "Expired", f"too old resource version: {since} "
                               f"({self.store.oldest_retained()})")
                await response.write((_dumps({"type": "ERROR", "object": err.status()}) + "\n").encode())
                return response
            for item in initial:
                await response.write((_dumps(item) + "\n").encode())
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
                if event is _CLOSE_WATCH:
                    break
                item = frame(event)
                if item:
                    await response.write((_dumps(item) + "\n").encode())
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self.store.unsubscribe(listener)
            self._watch_queues.discard(queue)
        return response

    # -- reviews

    def _review(self, rtype: ResourceType, body: JsonObj, namespace: str) -> JsonObj:
        review = copy.deepcopy(body) if isinstance(body, dict) else {}
        review.setdefault("kind", rtype.kind)
        review.setdefault("apiVersion", rtype.api_version)
        review.setdefault("metadata", {})
        if rtype.kind == "TokenReview":
            token = (review.get("spec") or {}).get("token", "")
            user = self.users_by_token.get(token, "admin")
            review["status"] = {"authenticated": True, "user": {
                "username": user, "uid": user, "groups": ["system:masters", "system:authenticated"]},
                "audiences": (review.get("spec") or {}).get("audiences") or []}
        else:
            review["status"] = {"allowed": True, "reason": "the emulated cluster allows every request"}
        return review

    # -- proxy to the CRD server

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=False, limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._session

    async def _upstream_json(self, path: str) -> JsonObj:
        http = await self._http()
        async with http.get(self.upstream + path, headers={"Accept": "application/json"},
                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return await resp.json(content_type=None)

    async def _proxy(self, request: web.Request, raw: bytes, record: RequestRecord) -> web.StreamResponse:
        if not self.upstream:
            raise ApiError(503, "ServiceUnavailable", "the CRD server is not running yet")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        if raw and "Content-Type" not in request.headers:
            # A real apiserver reads a body without Content-Type as its first media type, JSON; left
            # out here, aiohttp would label it application/octet-stream and the CRD server refuse it.
            headers["Content-Type"] = "application/json"
        http = await self._http()
        try:
            upstream = await http.request(request.method, self.upstream + request.path_qs, headers=headers,
                                          data=raw if raw else None, allow_redirects=False)
        except (aiohttp.ClientError, OSError) as err:
            raise ApiError(503, "ServiceUnavailable", f"the CRD server did not answer: {err}") from None
        record.status = upstream.status
        watching = request.query.get("watch") in ("true", "1")
        if watching:
            self._proxied_watches.add(upstream)
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            response.enable_chunked_encoding()
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except aiohttp.ClientError:
                pass  # the upstream stream ended early (a dropped watch): end ours cleanly too
            await response.write_eof()
            return response
        except ConnectionResetError:
            return response
        finally:
            self._proxied_watches.discard(upstream)
            upstream.release()
