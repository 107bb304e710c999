"""Estimates from Prometheus cumulative histograms: quantiles and the request-length mix.

The collector sums bucket rates over all pods of a variant (or a model) before estimating, so
these work on plain `(upper bound, cumulative count)` lists rather than on PromQL results.

Quantiles use exactly Prometheus's `histogram_quantile` interpolation (linear within the bucket,
the lowest bucket starting at 0, the +Inf bucket answered with the highest finite bound), so a
quantile of one pod equals what `histogram_quantile` returns for it.

The length mix: vLLM exports prompt and generation token counts as two separate histograms with
1-2-5 boundaries. Inside one bucket the histogram says nothing about where requests lie, but the
`_sum` series does: we place each bucket's requests at one point a common fraction of the way
through it (in log space) and solve for the fraction that reproduces the observed mean. Every
point stays inside its bucket (so the estimate is never worse than the histogram allows) and the
mean, which drives token throughput, is exact. Points are then merged onto a log2 grid. The
joint input x output mix assumes independence: the two marginal histograms carry no information
about their correlation, and independence is the maximum-entropy joint with those marginals.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from optimizer.workload import LengthBucket


class TokenShare(BaseModel):
    """One point of an estimated token-count distribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: float = Field(gt=0)
    share: float = Field(gt=0, le=1)


def _cleaned(buckets: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted by bound, duplicate bounds merged, counts made monotone (as Prometheus does)."""
    merged: dict[float, float] = {}
    for le, count in buckets:
        if not math.isnan(count):
            merged[le] = merged.get(le, 0.0) + count
    out, top = [], 0.0
    for le in sorted(merged):
        top = max(top, merged[le])
        out.append((le, top))
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile on (upper bound, cumulative count) pairs; NaN when undefined."""
    return histogram_quantiles([q], buckets)[0]


def histogram_quantiles(qs: list[float], buckets: list[tuple[float, float]]) -> list[float]:
    """Several quantiles of one histogram, cleaning the buckets once."""
    b = _cleaned(buckets)
    return [_quantile(q, b) for q in qs]


def _quantile(q: float, b: list[tuple[float, float]]) -> float:
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    if len(b) < 2 or not math.isinf(b[-1][0]) or b[-1][1] == 0:
        return math.nan
    rank = q * b[-1][1]
    i = next((k for k in range(len(b) - 1) if b[k][1] >= rank), len(b) - 1)
    if i == len(b) - 1:
        return b[-2][0]
    if i == 0 and b[0][0] <= 0:
        return b[0][0]
    start, below = (0.0, 0.0) if i == 0 else b[i - 1]
    end, count = b[i][0], b[i][1] - below
    if count <= 0:
        return math.nan
    return start + (end - start) * ((rank - below) / count)


def token_distribution(buckets: list[tuple[float, float]], mean_tokens: float | None,
                       lowest: float = 1.0) -> list[TokenShare]:
    """Distribution of token counts on a log2 grid, calibrated to `mean_tokens` (see module doc)."""
    b = _cleaned(buckets)
    intervals: list[tuple[float, float, float]] = []
    below, prev = 0.0, None
    for le, cumulative in b:
        count = cumulative - below
        below = cumulative
        if math.isinf(le):
            lo = prev if prev is not None else lowest
            hi = 2 * lo
        else:
            lo = max(lowest, prev if prev is not None else lowest)
            hi = max(le, lo)
        prev = le if not math.isinf(le) else prev
        if count > 0:
            intervals.append((lo, hi, count))
    total = sum(c for _, _, c in intervals)
    if total <= 0:
        return []

    logs = [(math.log(lo), math.log(hi) - math.log(lo), c) for lo, hi, c in intervals]

    def points(frac: float) -> list[tuple[float, float]]:
        return [(math.exp(start + frac * width), c) for start, width, c in logs]

    def mean_at(frac: float) -> float:
        return sum(math.exp(start + frac * width) * c for start, width, c in logs) / total

    frac = 0.5
    if mean_tokens is not None and mean_tokens > 0:
        lo_f, hi_f = 0.0, 1.0
        if mean_tokens <= mean_at(0.0):
            frac = 0.0
        elif mean_tokens >= mean_at(1.0):
            frac = 1.0
        else:
            for _ in range(40):  # 2**-40: far below a token
                frac = (lo_f + hi_f) / 2
                if mean_at(frac) < mean_tokens:
                    lo_f = frac
                else:
                    hi_f = frac
    grid: dict[int, list[float]] = {}
    for x, c in points(frac):
        cell = grid.setdefault(math.floor(math.log2(x) + 1e-9), [0.0, 0.0])
        cell[0] += c
        cell[1] += x * c
    return [TokenShare(tokens=s / c, share=c / total) for _, (c, s) in sorted(grid.items())]


def joint_length_mix(inputs: list[TokenShare], outputs: list[TokenShare], *, min_share: float = 0.01,
                     max_buckets: int = 16) -> list[LengthBucket]:
    """Input x output buckets assuming independence; cells under `min_share` dropped, shares renormalised."""
    cells = sorted(((i.share * o.share, i.tokens, o.tokens) for i in inputs for o in outputs), reverse=True)
    if not cells:
        return []
    kept = [c for c in cells if c[0] >= min_share][:max_buckets] or cells[:1]
    total = sum(c[0] for c in kept)
    out, names = [], set()
    for s, i, o in kept:
        name = f"in{round(i)}xout{round(o)}"
        if name in names:  # two log2 cells whose means round alike (either side of a power of two)
            name = f"in{i:.1f}xout{o:.1f}#{len(out)}"
        names.add(name)
        out.append(LengthBucket(input_tokens=round(i, 1), output_tokens=round(o, 1), share=s / total, name=name))
    return out
