"""The figures that compare autoscaling policies: cost, SLO attainment, latency percentiles, churn.

SLO attainment is the share of scored requests that met *every* target of their model (TTFT, ITL
and E2E when set); a dropped request met none. Percentiles are over completed requests, so a
policy that drops requests cannot look fast: its attainment shows the drops. Cost covers the
scored period only (after warm-up), billed per replica-second including cold starts.
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


def summarize(result: RunResult, slos: dict[str, SLO]) -> RunMetrics:
    scored = result.scored if result.scored is not None else np.ones(result.n_requests, dtype=bool)
    ttft, itl, e2e = request_latencies(result)
    ok_ttft, ok_itl, ok_e2e = slo_met(result, slos)
    n = int(scored.sum())

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
        replica_changes=sum(k for t, k in result.changes if t >= start),
        accelerator_hours={k: v - acc_start.get(k, 0.0) for k, v in sorted(acc_end.items())},
        peak_replicas=int(max(totals)),
        mean_replicas=float(np.mean(totals)),
        simulated_s=end - start,
        wall_s=result.wall_s,
    )
