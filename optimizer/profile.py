"""Performance profiles: how long one prefill and one decode iteration take on one replica.

Two shapes, one interface (`prefill_s(tokens)`, `prefill_batch_s(ends, starts)`,
`decode_step_s(batch, context_tokens)`):

* ``ParametricProfile`` -- the linear/quadratic model vLLM-style servers follow closely
  (decode is memory-bound: a fixed weight read plus a per-sequence and per-KV-token cost;
  prefill is compute-bound: linear in tokens plus an attention term).
* ``TabulatedProfile`` -- measured points, interpolated monotonically (PCHIP), so offline
  profiles can be used as measured.

A batch of prompts is NOT one prompt of their summed length: attention is per prompt, so a batch
of prompts I_1..I_m costs base + per_token * sum(I_i) + per_token_sq * sum(I_i**2), not
``prefill_s(sum(I_i))`` (which squares the batch total: a 97-prompt burst of ~2k tokens was charged
22.6 s instead of 5.6 s). ``prefill_batch_s`` gives that for both shapes through one rule,
    batch = p(0) + sum_i (p(end_i) - p(start_i)),
where prompt i is prefilled from token start_i (0, or where its previous chunk stopped) to end_i and
p(0) is the fixed cost of one forward pass. For ``ParametricProfile`` that is exactly the formula
above (chunks of one prompt add up to its attention cost, e^2 - s^2 per chunk). For a
``TabulatedProfile``, measured one prompt at a time, it is the per-prompt sum minus (m-1) x base, the
base being the curve at 0 tokens (its linear extrapolation below the first point, floored at 0):
the fixed cost is shared, every prompt's own curve (its attention included) is not.

Each profile also carries the engine's per-iteration token budget, ``max_num_batched_tokens``
(chunked prefill, default 2048 as vLLM V1 serves; None = no chunking), because the iteration times
above are only meaningful under the scheduler that produced them; the simulator and the capacity
model both read it from here.

``fit_profile`` turns observed samples into a ``ParametricProfile`` with a robust least-squares
fit, so the engine works without offline profiling too.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from optimizer import input_limits as lim

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
"""vLLM V1's --max-num-batched-tokens default for online serving (``EngineArgs.get_batch_defaults``,
OpenAI API server context; V1 always chunks prefills). Recent vLLM releases use 8192 on GPUs with
>= 70 GiB other than A100 (H100, H200, MI300X): set it per profile to match a deployment."""


def _budget_field():
    return Field(
        default=DEFAULT_MAX_NUM_BATCHED_TOKENS, ge=1, le=lim.MAX_TOKENS,
        description="Token budget of one forward pass (vLLM --max-num-batched-tokens; chunked prefill): decodes "
        "first, prompt chunks fill the rest. None: no chunking, a whole prefill batch at once (vLLM V0).",
    )


class _PrefillBatch:
    """``prefill_batch_s``, shared by both profile shapes (they only provide ``prefill_s``)."""

    def prefill_base_time_s(self) -> float:
        """Fixed cost of one forward pass over prompt tokens: the prefill curve at 0 tokens."""
        return float(self.prefill_s(0.0))

    def prefill_batch_s(self, ends, starts=None) -> float:
        """One forward pass prefilling prompt i from token starts[i] (default 0) to ends[i].

        = p(0) + sum_i (p(ends[i]) - p(starts[i])); see the module docstring.
        """
        e = np.asarray(ends, dtype=float)
        if e.size == 0:
            return 0.0
        done = float(np.sum(self.prefill_s(e)))
        base = self.prefill_base_time_s()
        if starts is None:
            return base + done - e.size * base
        return base + done - float(np.sum(self.prefill_s(np.asarray(starts, dtype=float))))


class ParametricProfile(_PrefillBatch, BaseModel):
    """decode_step_s = base + per_seq*batch + per_kv_token*batch*context; prefill_s = base + a*t + b*t^2."""

    model_config = lim.STRICT

    kind: Literal["parametric"] = "parametric"
    decode_base_s: float = Field(
        gt=0, le=lim.MAX_PROFILE_TIME_S, description="Decode iteration time at batch 0 (weight read)."
    )
    decode_per_seq_s: float = Field(
        default=0.0, ge=0, le=lim.MAX_PROFILE_TIME_S, description="Added per sequence in the batch."
    )
    decode_per_kv_token_s: float = Field(
        default=0.0, ge=0, le=lim.MAX_PROFILE_TIME_S,
        description="Added per KV-cache token read in one iteration (batch x context)."
    )
    prefill_base_s: float = Field(
        default=0.0, ge=0, le=lim.MAX_PROFILE_TIME_S, description="Fixed cost of one prefill."
    )
    prefill_per_token_s: float = Field(gt=0, le=lim.MAX_PROFILE_TIME_S, description="Prefill time per prompt token.")
    prefill_per_token_sq_s: float = Field(
        default=0.0, ge=0, le=lim.MAX_PROFILE_TIME_S, description="Attention term per token squared."
    )
    max_num_batched_tokens: int | None = _budget_field()

    def decode_step_s(self, batch, context_tokens=0.0):
        """Time of one decode iteration with `batch` sequences of mean context `context_tokens`."""
        return self.decode_base_s + self.decode_per_seq_s * batch + self.decode_per_kv_token_s * batch * context_tokens

    def prefill_s(self, tokens):
        """Time to prefill ONE prompt of `tokens` tokens (a batch of prompts: ``prefill_batch_s``)."""
        return self.prefill_base_s + self.prefill_per_token_s * tokens + self.prefill_per_token_sq_s * tokens**2


class ProfilePoint(BaseModel):
    model_config = lim.STRICT

    x: float = Field(ge=0, le=lim.MAX_TOKENS, description="Batch size (decode) or prompt tokens (prefill).")
    time_s: float = Field(ge=0, le=lim.MAX_PROFILE_TIME_S)


def _check_points(points: list[ProfilePoint], what: str) -> list[ProfilePoint]:
    if len(points) < 2:
        raise ValueError(f"{what} needs at least 2 points")
    xs = [p.x for p in points]
    if any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
        raise ValueError(f"{what} x values must be strictly increasing, got {xs}")
    return points


class TabulatedProfile(_PrefillBatch, BaseModel):
    """Measured points with monotone (PCHIP) interpolation and linear extrapolation past the ends.

    Noisy measurements that are not monotone are first made monotone (running maximum), because a
    bigger batch or a longer prompt never takes less time on the same replica.
    """

    model_config = lim.STRICT

    kind: Literal["tabulated"] = "tabulated"
    decode_points: list[ProfilePoint] = Field(description="(batch, iteration time) points.")
    prefill_points: list[ProfilePoint] = Field(description="(prompt tokens, prefill time) points.")
    decode_per_kv_token_s: float = Field(
        default=0.0, ge=0, le=lim.MAX_PROFILE_TIME_S,
        description="Added per KV-cache token read in one iteration (batch x context)."
    )
    max_num_batched_tokens: int | None = _budget_field()

    @field_validator("decode_points")
    @classmethod
    def _decode(cls, v):
        return _check_points(v, "decode_points")

    @field_validator("prefill_points")
    @classmethod
    def _prefill(cls, v):
        return _check_points(v, "prefill_points")

    @model_validator(mode="after")
    def _positive_decode(self) -> TabulatedProfile:
        if max(p.time_s for p in self.decode_points) <= 0:
            raise ValueError("decode_points must contain a positive time")
        return self

    @cached_property
    def _decode_curve(self):
        return _MonotoneCurve([p.x for p in self.decode_points], [p.time_s for p in self.decode_points])

    @cached_property
    def _prefill_curve(self):
        return _MonotoneCurve([p.x for p in self.prefill_points], [p.time_s for p in self.prefill_points])

    def decode_step_s(self, batch, context_tokens=0.0):
        return self._decode_curve(batch) + self.decode_per_kv_token_s * np.asarray(batch) * context_tokens

    def prefill_s(self, tokens):
        return self._prefill_curve(tokens)


class _MonotoneCurve:
    """PCHIP through monotone-ised points, linear beyond the ends (floored at 0 below)."""

    def __init__(self, xs: list[float], ys: list[float]):
        from scipy.interpolate import PchipInterpolator

        self.xs = np.asarray(xs, dtype=float)
        self.ys = np.maximum.accumulate(np.asarray(ys, dtype=float))
        self._pchip = PchipInterpolator(self.xs, self.ys, extrapolate=False)
        self._lo_slope = (self.ys[1] - self.ys[0]) / (self.xs[1] - self.xs[0])
        self._hi_slope = (self.ys[-1] - self.ys[-2]) / (self.xs[-1] - self.xs[-2])

    def __call__(self, x):
        xa = np.asarray(x, dtype=float)
        inside = np.clip(xa, self.xs[0], self.xs[-1])
        y = self._pchip(inside)
        y = np.where(xa > self.xs[-1], self.ys[-1] + self._hi_slope * (xa - self.xs[-1]), y)
        y = np.where(xa < self.xs[0], np.maximum(0.0, self.ys[0] + self._lo_slope * (xa - self.xs[0])), y)
        return float(y) if y.ndim == 0 else y


PerformanceProfile = Annotated[ParametricProfile | TabulatedProfile, Field(discriminator="kind")]


class DecodeSample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    batch: float = Field(gt=0)
    context_tokens: float = Field(default=0.0, ge=0)
    step_s: float = Field(gt=0)


class PrefillSample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: float = Field(gt=0)
    time_s: float = Field(gt=0)


def fit_profile(
    decode: list[DecodeSample],
    prefill: list[PrefillSample],
    *,
    quadratic_prefill: bool = False,
) -> ParametricProfile:
    """Fit a ParametricProfile to observed samples, robust to outliers.

    Uses soft-L1 least squares on relative residuals with non-negative coefficients: a few
    samples taken during a GC pause or a preemption must not drag the curve, and every
    coefficient has a physical meaning that cannot be negative.
    """
    from scipy.optimize import least_squares

    if len(decode) < 2:
        raise ValueError(f"need at least 2 decode samples to fit a profile, got {len(decode)}")
    if len(prefill) < 2:
        raise ValueError(f"need at least 2 prefill samples to fit a profile, got {len(prefill)}")

    b = np.array([s.batch for s in decode])
    c = np.array([s.context_tokens for s in decode])
    y = np.array([s.step_s for s in decode])
    a_dec = np.column_stack([np.ones_like(b), b, b * c])
    if not np.any(c > 0):
        a_dec = a_dec[:, :2]
    dec = _robust_nonneg_fit(a_dec, y, least_squares)
    if len(dec) == 2:
        dec = np.append(dec, 0.0)

    t = np.array([s.tokens for s in prefill])
    yp = np.array([s.time_s for s in prefill])
    cols = [np.ones_like(t), t] + ([t**2] if quadratic_prefill else [])
    pre = _robust_nonneg_fit(np.column_stack(cols), yp, least_squares)
    if len(pre) == 2:
        pre = np.append(pre, 0.0)

    tiny = 1e-12
    return ParametricProfile(
        decode_base_s=max(dec[0], tiny),
        decode_per_seq_s=dec[1],
        decode_per_kv_token_s=dec[2],
        prefill_base_s=pre[0],
        prefill_per_token_s=max(pre[1], tiny),
        prefill_per_token_sq_s=pre[2],
    )


def _robust_nonneg_fit(a: np.ndarray, y: np.ndarray, least_squares) -> np.ndarray:
    scale = np.maximum(np.abs(y), 1e-12)
    a_rel = a / scale[:, None]
    ones = np.ones_like(y)
    col_scale = np.maximum(np.abs(a_rel).max(axis=0), 1e-300)
    start, *_ = np.linalg.lstsq(a_rel / col_scale, ones, rcond=None)
    start = np.clip(start, 0, None) + 1e-9
    res = least_squares(
        lambda w: (a_rel / col_scale) @ w - ones,
        start,
        bounds=(0, np.inf),
        loss="soft_l1",
        f_scale=0.05,
    )
    return res.x / col_scale
