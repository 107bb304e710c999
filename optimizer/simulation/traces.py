"""Request traces: arrival times with prompt and output lengths, loaded from the public formats.

A trace is three aligned numpy arrays (plus a model index when several models share one trace),
because the simulator replays millions of requests and per-request Python objects would dominate
its run time. Loaders accept the formats the field publishes:

* Azure LLM inference trace (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``, wall-clock stamps),
* Mooncake (JSON lines with ``timestamp`` in ms, ``input_length``, ``output_length``),
* Vidur (CSV ``arrived_at,num_prefill_tokens,num_decode_tokens``, seconds).

Every loader re-bases time to start at 0 and reports a bad row as an ``InputError`` naming the file,
the line and the column, so a user with a half-broken export knows what to fix.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optimizer.problem import InputError


@dataclass(frozen=True)
class Trace:
    """Requests sorted by arrival; times in seconds from the first arrival of the source."""

    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    models: tuple[str, ...] = ("default",)
    model_index: np.ndarray | None = field(default=None)
    name: str = "trace"

    def __post_init__(self):
        n = len(self.arrival_s)
        for label, arr in (("input_tokens", self.input_tokens), ("output_tokens", self.output_tokens)):
            if len(arr) != n:
                raise ValueError(f"{label} has {len(arr)} entries, arrival_s has {n}")
            if n and int(np.min(arr)) < 1:
                raise ValueError(f"{label} must be >= 1 token for every request")
        if n and np.any(np.diff(self.arrival_s) < 0):
            raise ValueError("arrival_s must be sorted")
        if self.model_index is not None and len(self.model_index) != n:
            raise ValueError(f"model_index has {len(self.model_index)} entries, arrival_s has {n}")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def model_of(self) -> np.ndarray:
        """Model index per request (all zeros for a single-model trace)."""
        if self.model_index is None:
            return np.zeros(len(self), dtype=np.int64)
        return self.model_index

    def _subset(self, mask_or_slice, arrival_s: np.ndarray | None = None, name: str | None = None) -> Trace:
        mi = None if self.model_index is None else self.model_index[mask_or_slice]
        return Trace(
            arrival_s=self.arrival_s[mask_or_slice] if arrival_s is None else arrival_s,
            input_tokens=self.input_tokens[mask_or_slice],
            output_tokens=self.output_tokens[mask_or_slice],
            models=self.models,
            model_index=mi,
            name=name or self.name,
        )

    def replay(self, speedup: float) -> Trace:
        """The same requests arriving `speedup` times faster (k x rate), lengths unchanged."""
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        return Trace(
            arrival_s=self.arrival_s / speedup,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            models=self.models,
            model_index=self.model_index,
            name=f"{self.name} x{speedup:g}",
        )

    def window(self, start_s: float, end_s: float) -> Trace:
        """Requests arriving in [start_s, end_s), re-based to start at 0."""
        lo, hi = np.searchsorted(self.arrival_s, [start_s, end_s], side="left")
        return self._subset(slice(lo, hi), arrival_s=self.arrival_s[lo:hi] - start_s)

    def truncate_tokens(self, max_input: int, max_output: int) -> Trace:
        """Clip lengths, e.g. to a model's context window, keeping every request."""
        return Trace(
            arrival_s=self.arrival_s,
            input_tokens=np.minimum(self.input_tokens, max_input),
            output_tokens=np.minimum(self.output_tokens, max_output),
            models=self.models,
            model_index=self.model_index,
            name=self.name,
        )

    @staticmethod
    def merge(traces: list[Trace], name: str = "merged") -> Trace:
        """Interleave single-model traces of different models into one multi-model trace."""
        models: list[str] = []
        parts = []
        for tr in traces:
            for m in tr.models:
                if m not in models:
                    models.append(m)
            remap = np.array([models.index(m) for m in tr.models], dtype=np.int64)
            parts.append((tr.arrival_s, tr.input_tokens, tr.output_tokens, remap[tr.model_of()]))
        arr = np.concatenate([p[0] for p in parts])
        order = np.argsort(arr, kind="stable")
        return Trace(
            arrival_s=arr[order],
            input_tokens=np.concatenate([p[1] for p in parts])[order],
            output_tokens=np.concatenate([p[2] for p in parts])[order],
            models=tuple(models),
            model_index=np.concatenate([p[3] for p in parts])[order],
            name=name,
        )


def _finish(source: str, times: list[float], ins: list[int], outs: list[int], model: str) -> Trace:
    if not times:
        raise InputError(source, "", "no requests in file")
    t = np.asarray(times, dtype=float)
    order = np.argsort(t, kind="stable")
    t = t[order]
    return Trace(
        arrival_s=t - t[0],
        input_tokens=np.asarray(ins, dtype=np.int64)[order],
        output_tokens=np.asarray(outs, dtype=np.int64)[order],
        models=(model,),
        name=Path(source).stem,
    )


def _positive_int(source: str, line: int, column: str, raw) -> int:
    try:
        value = int(float(raw))
    except (TypeError, ValueError):
        raise InputError(source, f"line {line}: {column}", f"expected a whole number of tokens, got {raw!r}") from None
    if value < 1:
        raise InputError(source, f"line {line}: {column}", f"must be >= 1 token, got {value}")
    return value


def _number(source: str, line: int, column: str, raw) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise InputError(source, f"line {line}: {column}", f"expected a number, got {raw!r}") from None
    if not np.isfinite(value):
        raise InputError(source, f"line {line}: {column}", f"expected a finite number, got {raw!r}")
    return value


def _read_csv(path: str | Path, columns: tuple[str, str, str]):
    source = str(path)
    try:
        handle = open(path, newline="")
    except OSError as exc:
        raise InputError(source, "", f"cannot read file ({exc.strerror or exc})") from None
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise InputError(source, "header", f"missing column(s) {missing}; found {header}")
        for row in reader:
            yield reader.line_num, row


def load_azure_csv(path: str | Path, model: str = "default") -> Trace:
    """Azure LLM inference trace: ``TIMESTAMP,ContextTokens,GeneratedTokens`` (wall-clock stamps)."""
    source = str(path)
    stamps, ins, outs = [], [], []
    for line, row in _read_csv(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        try:
            stamps.append(np.datetime64(row["TIMESTAMP"].strip().replace(" ", "T"), "ns"))
        except ValueError:
            raise InputError(source, f"line {line}: TIMESTAMP", f"not a timestamp: {row['TIMESTAMP']!r}") from None
        ins.append(_positive_int(source, line, "ContextTokens", row["ContextTokens"]))
        outs.append(_positive_int(source, line, "GeneratedTokens", row["GeneratedTokens"]))
    if not stamps:
        raise InputError(source, "", "no requests in file")
    ns = np.array(stamps, dtype="datetime64[ns]").astype(np.int64)
    times = ((ns - ns.min()) / 1e9).tolist()
    return _finish(source, times, ins, outs, model)


def load_vidur_csv(path: str | Path, model: str = "default") -> Trace:
    """Vidur request trace: ``arrived_at,num_prefill_tokens,num_decode_tokens`` (seconds)."""
    source = str(path)
    times, ins, outs = [], [], []
    for line, row in _read_csv(path, ("arrived_at", "num_prefill_tokens", "num_decode_tokens")):
        times.append(_number(source, line, "arrived_at", row["arrived_at"]))
        ins.append(_positive_int(source, line, "num_prefill_tokens", row["num_prefill_tokens"]))
        outs.append(_positive_int(source, line, "num_decode_tokens", row["num_decode_tokens"]))
    return _finish(source, times, ins, outs, model)


def load_mooncake_jsonl(path: str | Path, model: str = "default") -> Trace:
    """Mooncake trace: one JSON object per line with ``timestamp`` (ms), ``input_length``, ``output_length``."""
    source = str(path)
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InputError(source, "", f"cannot read file ({exc.strerror or exc})") from None
    times, ins, outs = [], [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(source, f"line {number}", f"not valid JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise InputError(source, f"line {number}", "expected a JSON object")
        for key in ("timestamp", "input_length", "output_length"):
            if key not in obj:
                raise InputError(source, f"line {number}: {key}", "missing")
        times.append(_number(source, number, "timestamp", obj["timestamp"]) / 1000.0)
        ins.append(_positive_int(source, number, "input_length", obj["input_length"]))
        outs.append(_positive_int(source, number, "output_length", obj["output_length"]))
    return _finish(source, times, ins, outs, model)


LOADERS = {"azure": load_azure_csv, "mooncake": load_mooncake_jsonl, "vidur": load_vidur_csv}


def load_trace(path: str | Path, fmt: str | None = None, model: str = "default") -> Trace:
    """Load a trace, guessing the format from the suffix and header when `fmt` is None."""
    p = Path(path)
    if fmt is None:
        if p.suffix in (".jsonl", ".json"):
            fmt = "mooncake"
        else:
            try:
                with open(p) as handle:
                    head = handle.readline()
            except OSError as exc:
                raise InputError(str(p), "", f"cannot read file ({exc.strerror or exc})") from None
            fmt = "vidur" if "arrived_at" in head else "azure"
    if fmt not in LOADERS:
        raise InputError(str(p), "format", f"unknown trace format {fmt!r} (known: {sorted(LOADERS)})")
    return LOADERS[fmt](p, model=model)
