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
mean, which drives token throughput, is exact. Histogram buckets are then merged onto a log2
grid. The joint input x output mix assumes independence: the two marginal histograms carry no
information about their correlation, and independence is the maximum-entropy joint with those
marginals.

Cell names are fixed by the histogram's bucket edges, never by the observed means: a histogram
bucket `(lo, hi]` joins the log2 cell of its geometric centre (`floor(log2(sqrt(lo * hi)))`, the
lowest bucket starting at `lowest`, the +Inf bucket spanning `(lo, 2 lo]`), and a cell is named by
the outermost edges of all the buckets that join it (`200-500`, `0-2`, `5000-inf`). With vLLM's
1-2-5 edges every bucket is its own cell. The edges come from the model server's configuration,
so a cell keeps its name (and a metric series keyed by it keeps its labels) from cycle to cycle
while the traffic inside it moves; the mean of a cell still follows the traffic and always lies
within its named edges. Which cells appear still depends on traffic (a cell under `min_share`
is dropped), but a cell that stays keeps its name.
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
    cell: str | None = Field(default=None, description="Fixed name from the histogram's edges ('200-500').")


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


def _edge(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.0f}" if x == round(x) else f"{x:g}"


def token_distribution(buckets: list[tuple[float, float]], mean_tokens: float | None,
                       lowest: float = 1.0) -> list[TokenShare]:
    """Distribution of token counts on a log2 grid, calibrated to `mean_tokens` (see module doc)."""
    b = _cleaned(buckets)
    # (placement interval lo, hi, count, fixed cell); the cell depends on the edges alone.
    intervals: list[tuple[float, float, float, int]] = []
    cell_edges: dict[int, tuple[float, float]] = {}
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
        cell = math.floor(math.log2(math.sqrt(lo * hi)) + 1e-9)
        edge_lo = prev if prev is not None else 0.0
        known = cell_edges.get(cell)
        cell_edges[cell] = (min(known[0], edge_lo), max(known[1], le)) if known else (edge_lo, le)
        prev = le if not math.isinf(le) else prev
        if count > 0:
            intervals.append((lo, hi, count, cell))
    total = sum(c for _, _, c, _ in intervals)
    if total <= 0:
        return []

    logs = [(math.log(lo), math.log(hi) - math.log(lo), c) for lo, hi, c, _ in intervals]

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
    for (start, width, c), (_, _, _, cell) in zip(logs, intervals, strict=True):
        x = math.exp(start + frac * width)
        acc = grid.setdefault(cell, [0.0, 0.0])
        acc[0] += c
        acc[1] += x * c
    return [TokenShare(tokens=s / c, share=c / total, cell=f"{_edge(cell_edges[k][0])}-{_edge(cell_edges[k][1])}")
            for k, (c, s) in sorted(grid.items())]


def joint_length_mix(inputs: list[TokenShare], outputs: list[TokenShare], *, min_share: float = 0.01,
                     max_buckets: int = 16) -> list[LengthBucket]:
    """Input x output buckets assuming independence; cells under `min_share` dropped, shares renormalised."""
    cells = sorted(((i.share * o.share, i, o) for i in inputs for o in outputs), key=lambda c: c[0], reverse=True)
    if not cells:
        return []
    kept = [c for c in cells if c[0] >= min_share][:max_buckets] or cells[:1]
    total = sum(c[0] for c in kept)
    out, names = [], set()
    for s, i, o in kept:
        name = (f"in{i.cell}xout{o.cell}" if i.cell and o.cell  # fixed: from the edges
                else f"in{round(i.tokens)}xout{round(o.tokens)}")
        if name in names:  # cell-less shares whose means round alike
            name = f"in{i.tokens:.1f}xout{o.tokens:.1f}#{len(out)}"
        names.add(name)
        out.append(LengthBucket(input_tokens=round(i.tokens, 1), output_tokens=round(o.tokens, 1), share=s / total,
                                name=name))
    return out
