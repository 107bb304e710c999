"""Loaders for measured performance data in the formats public LLM-serving studies publish.

Two formats are read, both from paths the caller gives (the engine never assumes a data folder):

* Helix per-layer profiles (Thesys-lab/Helix-ASPLOS25, ``simulator/model_manager``): a directory
  per (model, machine) with ``prompt_bs2time.csv`` (``num_prompt_tokens,ms_per_layer``) and
  ``decode_bs2time.csv`` (``batch_size,ms_per_layer``), no header. Helix interpolates them
  linearly, so ``LayerTimes`` does the same; they are per layer so that a placement can price
  any number of layers on a machine.
* Splitwise ``perf_model.csv`` (Mutinifni/splitwise-sim): whole-model prompt and token times of
  one tensor-parallel group, several noisy repetitions per configuration. ``splitwise_samples``
  turns the rows of one (model, hardware, TP) into samples for ``optimizer.profile.fit_profile``.

Malformed files raise ``ProfileDataError`` naming the file, the line and the reason, because
these files are hand-copied between repositories and a silent mis-parse would mis-size a fleet.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from statistics import median

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from optimizer.problem import InputError, read_text
from optimizer.profile import DecodeSample, PrefillSample, ProfilePoint, TabulatedProfile

HELIX_PROMPT_FILE = "prompt_bs2time.csv"
HELIX_DECODE_FILE = "decode_bs2time.csv"
MS_PER_S = 1000.0


class ProfileDataError(InputError):
    """A measured-profile file that cannot be read as its format says, with file and line."""

    def __init__(self, source: str | Path, line: int | None, reason: str):
        self.line = line
        super().__init__(str(source), f"line {line}" if line is not None else "", reason)


Point = tuple[float, float]


def _check_curve(points: list[Point], what: str) -> list[Point]:
    if len(points) < 2:
        raise ValueError(f"{what} needs at least 2 points, got {len(points)}")
    for x, y in points:
        if not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
            raise ValueError(f"{what} must be finite and non-negative, got ({x}, {y})")
    xs = [x for x, _ in points]
    if any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
        raise ValueError(f"{what} x values must be strictly increasing")
    return points


def _interpolate_linear(points: list[Point], x):
    """Piecewise-linear through the points, continued linearly past both ends, floored at 0."""
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    xa = np.asarray(x, dtype=float)
    y = np.interp(xa, xs, ys)
    hi_slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    lo_slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    y = np.where(xa > xs[-1], ys[-1] + hi_slope * (xa - xs[-1]), y)
    y = np.where(xa < xs[0], np.maximum(0.0, ys[0] + lo_slope * (xa - xs[0])), y)
    return float(y) if y.ndim == 0 else y


class LayerTimes(BaseModel):
    """Milliseconds one transformer layer takes on one machine, for prefill and for decode.

    Interpolation is linear exactly as in Helix's simulator, so placements priced here agree with
    Helix's published figures. The files begin with a ``(0, 0)`` anchor; it is kept for the raw
    lookups (Helix semantics) but dropped from ``to_profile``'s decode curve, because a decode
    iteration of one sequence still reads every weight and must not cost half of two sequences.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_points: list[Point] = Field(description="(prompt tokens, ms per layer), increasing tokens.")
    decode_points: list[Point] = Field(description="(batch size, ms per layer), increasing batch.")

    @field_validator("prompt_points")
    @classmethod
    def _prompt(cls, v):
        return _check_curve(v, "prompt_points")

    @field_validator("decode_points")
    @classmethod
    def _decode(cls, v):
        return _check_curve(v, "decode_points")

    def prompt_ms_per_layer(self, tokens):
        """Time of one layer's prefill of `tokens` prompt tokens (scalar or array)."""
        return _interpolate_linear(self.prompt_points, tokens)

    def decode_ms_per_layer(self, batch):
        """Time of one layer's decode iteration with `batch` sequences (scalar or array)."""
        return _interpolate_linear(self.decode_points, batch)

    def to_profile(self, num_layers: int) -> TabulatedProfile:
        """The whole model (`num_layers` layers on this machine) as a profile in seconds."""
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        scale = num_layers / MS_PER_S
        decode = [p for p in self.decode_points if p[0] > 0]
        if len(decode) < 2:
            raise ValueError("decode_points need at least 2 points with batch > 0 to build a profile")
        return TabulatedProfile(
            decode_points=[ProfilePoint(x=x, time_s=y * scale) for x, y in decode],
            prefill_points=[ProfilePoint(x=x, time_s=y * scale) for x, y in self.prompt_points],
        )


def _read(path: Path) -> str:
    try:
        return read_text(path)
    except InputError as err:
        raise ProfileDataError(path, None, err.reason) from None


def _read_pairs(path: Path) -> list[Point]:
    text = _read(path)
    points: list[Point] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 2:
            raise ProfileDataError(path, lineno, f"expected 2 comma-separated numbers, got {len(fields)} field(s)")
        try:
            x, y = float(fields[0]), float(fields[1])
        except ValueError:
            raise ProfileDataError(path, lineno, f"not a number in {line!r} (the file has no header)") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ProfileDataError(path, lineno, f"values must be finite, got {line!r}")
        if x < 0 or y < 0:
            raise ProfileDataError(path, lineno, f"values must be non-negative, got {line!r}")
        if points and x <= points[-1][0]:
            raise ProfileDataError(
                path, lineno, f"first column must increase strictly, {x:g} follows {points[-1][0]:g}"
            )
        points.append((x, y))
    if len(points) < 2:
        raise ProfileDataError(path, None, f"needs at least 2 data lines, found {len(points)}")
    return points


def load_helix_layer_times(directory: str | Path) -> LayerTimes:
    """Read one Helix (model, machine) directory into LayerTimes."""
    d = Path(directory)
    if not d.is_dir():
        raise ProfileDataError(d, None, "not a directory (expected a Helix profile folder)")
    return LayerTimes(
        prompt_points=_read_pairs(d / HELIX_PROMPT_FILE),
        decode_points=_read_pairs(d / HELIX_DECODE_FILE),
    )


def discover_helix_profiles(root: str | Path) -> dict[tuple[str, str], Path]:
    """Map (model, machine) -> directory for every Helix profile folder under `root/<model>/<machine>`."""
    found = {}
    for prompt in sorted(Path(root).glob(f"*/*/{HELIX_PROMPT_FILE}")):
        d = prompt.parent
        if (d / HELIX_DECODE_FILE).is_file():
            found[(d.parent.name, d.name)] = d
    return found


class SplitwiseRow(BaseModel):
    """One measured run of Splitwise's perf model: a batch of equal prompts, then `token_size` decodes."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = Field(min_length=1)
    hardware: str = Field(min_length=1)
    prompt_size: int = Field(gt=0, description="Prompt tokens of each request.")
    batch_size: int = Field(gt=0)
    token_size: int = Field(gt=0, description="Generated tokens of each request.")
    peak_power: float = Field(ge=0, description="Peak power, as a fraction of the GPU's TDP.")
    average_power: float = Field(ge=0, description="Average power, as a fraction of the GPU's TDP.")
    prompt_time_ms: float = Field(gt=0, description="Prefill of the whole batch.")
    token_time_ms: float = Field(gt=0, description="Mean decode iteration.")
    e2e_time_ms: float = Field(gt=0)
    tensor_parallel: int = Field(gt=0)


SPLITWISE_COLUMNS = {
    "model": "model", "hardware": "hardware", "prompt_size": "prompt_size", "batch_size": "batch_size",
    "token_size": "token_size", "peak_power": "peak_power", "average_power": "average_power",
    "prompt_time": "prompt_time_ms", "token_time": "token_time_ms", "e2e_time": "e2e_time_ms",
    "tensor_parallel": "tensor_parallel",
}


def load_splitwise(path: str | Path) -> list[SplitwiseRow]:
    """Read Splitwise's perf_model.csv; any bad header or row raises ProfileDataError."""
    p = Path(path)
    text = _read(p)
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise ProfileDataError(p, None, "empty file (expected a header line)")
    header = [h.strip() for h in header]
    missing = [c for c in SPLITWISE_COLUMNS if c not in header]
    if missing:
        raise ProfileDataError(p, 1, f"header lacks column(s) {missing}")
    index = {c: header.index(c) for c in SPLITWISE_COLUMNS}
    rows = []
    for lineno, fields in enumerate(reader, start=2):
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            raise ProfileDataError(p, lineno, f"expected {len(header)} fields, got {len(fields)}")
        values = {name: fields[index[col]].strip() for col, name in SPLITWISE_COLUMNS.items()}
        try:
            rows.append(SplitwiseRow.model_validate(values))
        except ValidationError as err:
            e = err.errors()[0]
            field = ".".join(str(x) for x in e["loc"])
            raise ProfileDataError(p, lineno, f"{field}: {e['msg']} (got {values.get(field)!r})") from None
    if not rows:
        raise ProfileDataError(p, None, "no data rows")
    return rows


def consistent_runs(rows: list[SplitwiseRow]) -> list[SplitwiseRow]:
    """Drop whole configurations whose median prefill is faster than that of a smaller batch.

    A bigger batch of the same prompts cannot prefill faster; such rows (Splitwise has a few,
    e.g. batch 64 at TP 2) are broken runs rather than noise, and would bend any fit.
    """
    groups: dict[tuple, dict[int, list[SplitwiseRow]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r.prompt_size, r.token_size)][r.batch_size].append(r)
    kept = []
    for by_batch in groups.values():
        best = 0.0
        for batch in sorted(by_batch):
            m = median(r.prompt_time_ms for r in by_batch[batch])
            if m < best:
                continue
            best = m
            kept.extend(by_batch[batch])
    return kept


def splitwise_samples(
    rows: list[SplitwiseRow],
    model: str,
    hardware: str,
    tensor_parallel: int,
    *,
    drop_inconsistent: bool = True,
) -> tuple[list[DecodeSample], list[PrefillSample]]:
    """Decode and prefill samples of one (model, hardware, TP) for ``fit_profile``.

    Decode: batch = batch_size, context = prompt + half the generated tokens (the mean context
    over the decode phase), step = token_time. Prefill: tokens = prompt_size x batch_size (the
    whole batch is prefilled together), time = prompt_time.
    """
    chosen = [r for r in rows if r.model == model and r.hardware == hardware and r.tensor_parallel == tensor_parallel]
    if not chosen:
        have = sorted({(r.model, r.hardware, r.tensor_parallel) for r in rows})
        raise ValueError(f"no Splitwise rows for ({model!r}, {hardware!r}, tp={tensor_parallel}); have {have}")
    if drop_inconsistent:
        chosen = consistent_runs(chosen)
    decode = [
        DecodeSample(batch=r.batch_size, context_tokens=r.prompt_size + r.token_size / 2, step_s=r.token_time_ms / MS_PER_S)
        for r in chosen
    ]
    prefill = [PrefillSample(tokens=r.prompt_size * r.batch_size, time_s=r.prompt_time_ms / MS_PER_S) for r in chosen]
    return decode, prefill
