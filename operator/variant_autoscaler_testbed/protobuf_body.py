"""Just enough of Kubernetes' protobuf encoding to read the bodies kubectl only sends that way.

`kubectl create namespace NAME` and `kubectl create configmap` (generator commands using the typed
client) post protobuf, never JSON, so an emulated API that refuses protobuf answers the first command of
every tutorial with 415. The encoding is the `k8s\\x00` magic, then a `runtime.Unknown` message
whose `raw` field holds the object's protobuf (generated.proto of k8s.io/api). This module reads
the protobuf wire format generically and maps the fields of a Namespace (metadata name,
generateName, labels, annotations, finalizers; spec.finalizers) and of a ConfigMap (data,
binaryData, immutable) to the JSON the store keeps.
Other kinds raise `ProtobufUnsupported`, so the caller can say what to send instead.
"""

from __future__ import annotations

import base64
from typing import Any

MAGIC = b"k8s\x00"
MAX_FIELDS = 10_000  # bound on fields read from one message (bodies are a few hundred bytes)


class ProtobufUnsupported(ValueError):
    """A protobuf body this emulation cannot read (malformed, or a kind it does not decode)."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for _ in range(10):
        if pos >= len(data):
            raise ProtobufUnsupported("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ProtobufUnsupported("varint longer than 10 bytes")


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of one message: ints for varints and fixed widths, bytes for
    length-delimited fields (strings, nested messages, map entries)."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        if len(out) >= MAX_FIELDS:
            raise ProtobufUnsupported("too many fields")
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ProtobufUnsupported("length-delimited field runs past the end")
            out.append((number, data[pos:pos + length]))
            pos += length
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            out.append((number, int.from_bytes(data[pos:pos + width], "little")))
            pos += width
        else:
            raise ProtobufUnsupported(f"wire type {wire} not used by Kubernetes objects")
    return out


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ProtobufUnsupported("expected a string field")
    return value.decode("utf-8")


def _map_entry(value: int | bytes) -> tuple[str, str]:
    entry = dict(fields(value if isinstance(value, bytes) else b""))
    return _text(entry.get(1, b"")), _text(entry.get(2, b""))


def _object_meta(data: bytes) -> dict[str, Any]:
    # k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto ObjectMeta
    meta: dict[str, Any] = {}
    for number, value in fields(data):
        if number == 1:
            meta["name"] = _text(value)
        elif number == 2:
            meta["generateName"] = _text(value)
        elif number == 3:
            meta["namespace"] = _text(value)
        elif number == 11:
            key, text = _map_entry(value)
            meta.setdefault("labels", {})[key] = text
        elif number == 12:
            key, text = _map_entry(value)
            meta.setdefault("annotations", {})[key] = text
        elif number == 14:
            meta.setdefault("finalizers", []).append(_text(value))
    return meta


def _namespace(raw: bytes) -> dict[str, Any]:
    # k8s.io/api/core/v1/generated.proto Namespace: metadata = 1, spec = 2 (finalizers = 1)
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {}}
    for number, value in fields(raw):
        if number == 1 and isinstance(value, bytes):
            obj["metadata"] = _object_meta(value)
        elif number == 2 and isinstance(value, bytes):
            finalizers = [_text(v) for n, v in fields(value) if n == 1]
            if finalizers:
                obj["spec"] = {"finalizers": finalizers}
    return obj


def _config_map(raw: bytes) -> dict[str, Any]:
    # k8s.io/api/core/v1/generated.proto ConfigMap: metadata = 1, data = 2, binaryData = 3, immutable = 4
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}
    for number, value in fields(raw):
        if number == 1 and isinstance(value, bytes):
            obj["metadata"] = _object_meta(value)
        elif number == 2:
            key, text = _map_entry(value)
            obj.setdefault("data", {})[key] = text
        elif number == 3 and isinstance(value, bytes):
            entry = dict(fields(value))
            data = entry.get(2, b"")
            obj.setdefault("binaryData", {})[_text(entry.get(1, b""))] = base64.b64encode(
                data if isinstance(data, bytes) else b"").decode()
        elif number == 4:
            obj["immutable"] = bool(value)
    return obj


DECODERS = {("v1", "Namespace"): _namespace, ("v1", "ConfigMap"): _config_map}


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded object; ProtobufUnsupported for what it cannot read."""
    if not body.startswith(MAGIC):
        raise ProtobufUnsupported("missing the k8s protobuf magic prefix")
    unknown = fields(body[len(MAGIC):])
    type_meta = dict(fields(next((v for n, v in unknown if n == 1 and isinstance(v, bytes)), b"")))
    api_version, kind = _text(type_meta.get(1, b"")), _text(type_meta.get(2, b""))
    raw = next((v for n, v in unknown if n == 2 and isinstance(v, bytes)), b"")
    decoder = DECODERS.get((api_version, kind))
    if decoder is None:
        raise ProtobufUnsupported(f"protobuf bodies are decoded only for {sorted(k for _v, k in DECODERS)}, "
                                  f"not {api_version or '?'}/{kind or '?'}")
    return decoder(raw)
