"""The figures that compare autoscaling policies: cost, SLO attainment, latency percentiles, churn.

SLO attainment is the share of scored requests that met *every* target of their model (TTFT, ITL
and E2E when set); a dropped request met none. Percentiles are over completed requests, so a
policy that drops requests cannot look fast: its attainment shows the drops. Cost covers the
scored period only (after warm-up), billed per replica-second including cold starts.

Pending replica-seconds count replicas a policy asked for that did not fit the free inventory
(pods the scheduler could not place), the cost of a shared fleet that a per-model view hides. A
multi-model run also reports every figure per model (`RunMetrics.per_model`).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from optimizer.simulation.cluster import RunResult
from optimizer.workload import SLO


class Percentiles(BaseModel):
    model_config = ConfigDict(frozen=True)

    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: np.ndarray) -> Percentiles:
        v = values[np.isfinite(values)]
        if v.size == 0:
            return cls(p50=float("nan"), p90=float("nan"), p99=float("nan"))
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        return cls(p50=float(p50), p90=float(p90), p99=float(p99))


class ModelMetrics(BaseModel):
    """One model's share of a multi-model run."""

    model_config = ConfigDict(frozen=True)

    model: str
    requests: int
    dropped: int
    slo_attainment: float
    ttft_s: Percentiles
    itl_s: Percentiles
    e2e_s: Percentiles
    cost: float
    replica_changes: int
    pending_replica_s: float
    unmet_s: float
    """Scored seconds during which some variant of the model had a pending (unplaceable) replica."""
    accelerator_hours: dict[str, float]


class RunMetrics(BaseModel):
    model_config = ConfigDict(frozen=True)

    policy: str
    router: str
    requests: int
    completed: int
    dropped: int
    slo_attainment: float
    ttft_attainment: float
    itl_attainment: float
    e2e_attainment: float
    ttft_s: Percentiles
    itl_s: Percentiles
    e2e_s: Percentiles
    cost: float
    cold_start_cost: float
    cost_per_hour: float
    replica_changes: int
    accelerator_hours: dict[str, float]
    peak_replicas: int
    mean_replicas: float
    simulated_s: float
    wall_s: float
    pending_replica_s: float = 0.0
    pending_by_variant_s: dict[str, float] = {}
    per_model: list[ModelMetrics] = []


def request_latencies(result: RunResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TTFT, ITL and E2E per request (NaN where dropped; ITL 0 for one-token answers)."""
    ttft = result.first_token_s - result.arrival_s
    e2e = result.completion_s - result.arrival_s
    gaps = result.output_tokens - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        itl = np.where(gaps > 0, (result.completion_s - result.first_token_s) / np.maximum(gaps, 1), 0.0)
    itl = np.where(np.isnan(e2e), np.nan, itl)
    return ttft, itl, e2e


def slo_met(result: RunResult, slos: dict[str, SLO]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per request: met TTFT, met ITL, met E2E (True where the model has no E2E target)."""
    ttft, itl, e2e = request_latencies(result)
    n = result.n_requests
    t_ttft = np.full(n, np.inf)
    t_itl = np.full(n, np.inf)
    t_e2e = np.full(n, np.inf)
    for k, model in enumerate(result.models):
        slo = slos.get(model)
        if slo is None:
            continue
        sel = result.model_index == k
        t_ttft[sel] = slo.ttft_s
        t_itl[sel] = slo.itl_s
        if slo.e2e_s is not None:
            t_e2e[sel] = slo.e2e_s
    with np.errstate(invalid="ignore"):
        ok_ttft = np.nan_to_num(ttft, nan=np.inf) <= t_ttft
        ok_itl = np.nan_to_num(itl, nan=np.inf) <= t_itl
        ok_e2e = np.nan_to_num(e2e, nan=np.inf) <= t_e2e
    return ok_ttft, ok_itl, ok_e2e


def _pending_s(result: RunResult) -> dict[str, tuple[float, float]]:
    """Per variant: (pending replica-seconds, seconds with any pending) over the scored period."""
    t = np.asarray(result.timeline_s, dtype=float)
    if t.size == 0:
        return {}
    ends = np.minimum(np.append(t[1:], result.end_s), result.end_s)
    starts = np.maximum(t, result.start_s)
    span = np.clip(ends - starts, 0.0, None)
    out = {}
    for name, series in result.pending_timeline.items():
        n = np.asarray(series[: t.size], dtype=float)
        if n.size < t.size:
            n = np.pad(n, (0, t.size - n.size))
        out[name] = (float((n * span).sum()), float(span[n > 0].sum()))
    return out


def _model_metrics(result: RunResult, slos: dict[str, SLO], scored: np.ndarray, met: np.ndarray,
                   latencies: tuple[np.ndarray, np.ndarray, np.ndarray],
                   pending: dict[str, tuple[float, float]]) -> list[ModelMetrics]:
    start, end = result.start_s, result.end_s
    ledger = result.ledger
    out = []
    for k, model in enumerate(result.models):
        sel = scored & (result.model_index == k)
        n = int(sel.sum())
        variants = {v for v, m in result.variant_models.items() if m == model}
        lives = [life for life in ledger.lives.values() if life.variant in variants]
        cost = sum((life.billed_s(end) - life.billed_s(start)) * life.cost_per_hour for life in lives) / 3600.0
        hours: dict[str, float] = {}
        for life in lives:
            hours[life.accelerator] = hours.get(life.accelerator, 0.0) + (
                life.billed_s(end) - life.billed_s(start)) * life.accelerators / 3600.0
        t = np.asarray(result.timeline_s, dtype=float)
        unmet = 0.0
        if t.size and variants:
            ends = np.minimum(np.append(t[1:], end), end)
            span = np.clip(ends - np.maximum(t, start), 0.0, None)
            any_pending = np.zeros(t.size, dtype=bool)
            for v in variants:
                series = np.asarray(result.pending_timeline.get(v, [])[: t.size])
                any_pending[: series.size] |= series > 0
            unmet = float(span[any_pending].sum())
        ttft, itl, e2e = latencies
        out.append(ModelMetrics(
            model=model, requests=n, dropped=int(result.dropped[sel].sum()),
            slo_attainment=float(met[sel].mean()) if n else 1.0,
            ttft_s=Percentiles.of(ttft[sel]), itl_s=Percentiles.of(itl[sel]), e2e_s=Percentiles.of(e2e[sel]),
            cost=cost, replica_changes=sum(c for tc, c, v in result.changes if tc >= start and v in variants),
            pending_replica_s=sum(pending.get(v, (0.0, 0.0))[0] for v in variants), unmet_s=unmet,
            accelerator_hours=dict(sorted(hours.items())),
        ))
    return out


def summarize(result: RunResult, slos: dict[str, SLO]) -> RunMetrics:
    scored = result.scored if result.scored is not None else np.ones(result.n_requests, dtype=bool)
    ttft, itl, e2e = request_latencies(result)
    ok_ttft, ok_itl, ok_e2e = slo_met(result, slos)
    n = int(scored.sum())
    pending = _pending_s(result)

    def share(mask: np.ndarray) -> float:
        return float(mask[scored].mean()) if n else 1.0

    dropped = int(result.dropped[scored].sum())
    start, end = result.start_s, result.end_s
    ledger = result.ledger
    cost = ledger.cost(end) - ledger.cost(start)
    hours = max(end - start, 1e-9) / 3600.0
    acc_end, acc_start = ledger.accelerator_hours(end), ledger.accelerator_hours(start)
    totals = [sum(sum(c[:2]) for c in counts) for counts in zip(*result.timeline.values(), strict=True)] \
        if result.timeline else [0]
    return RunMetrics(
        policy=result.policy,
        router=result.router,
        requests=n,
        completed=n - dropped,
        dropped=dropped,
        slo_attainment=share(ok_ttft & ok_itl & ok_e2e),
        ttft_attainment=share(ok_ttft),
        itl_attainment=share(ok_itl),
        e2e_attainment=share(ok_e2e),
        ttft_s=Percentiles.of(ttft[scored]),
        itl_s=Percentiles.of(itl[scored]),
        e2e_s=Percentiles.of(e2e[scored]),
        cost=cost,
        cold_start_cost=ledger.cold_start_cost(end) - ledger.cold_start_cost(start),
        cost_per_hour=cost / hours,
        replica_changes=sum(k for t, k, _ in result.changes if t >= start),
        accelerator_hours={k: v - acc_start.get(k, 0.0) for k, v in sorted(acc_end.items())},
        peak_replicas=int(max(totals)),
        mean_replicas=float(np.mean(totals)),
        simulated_s=end - start,
        wall_s=result.wall_s,
        pending_replica_s=sum(p for p, _ in pending.values()),
        pending_by_variant_s={v: p for v, (p, _) in sorted(pending.items()) if p > 0},
        per_model=_model_metrics(result, slos, scored, ok_ttft & ok_itl & ok_e2e, (ttft, itl, e2e), pending)
        if len(result.models) > 1 else [],
    )
