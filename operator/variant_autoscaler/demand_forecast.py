"""Plan each model on the rate one lead time ahead, as the simulator's `ours` does.

Why: replicas asked for now serve only after their cold start, so planning on the rate measured
now leaves a rise uncovered for a whole lead time; the simulator's figures (README, "Decision
quality") are those of a policy that plans on `optimizer.planned_rate.PlannedRate`, and the
operator must run that policy, not a weaker one. Each cycle feeds every model with fresh metrics
the requests of the time since its last reading (the measured rate x that time), then plans on
the forecast's path times the headroom of its own recorded errors, never below the rate measured
now, rounded up to the same 2 % grid as the simulator's plan. What the simulator has and the operator cannot: per-request arrival times, so no burst
allowance from the arrival envelope (Prometheus gives rates over a window).

Readings closer together than half an interval (a cycle triggered by a resource change) replace
the last one instead of adding a second reading of the same window. After a gap longer than
`MAX_GAP_INTERVALS` intervals (metrics lost, the model idle at zero) the forecast starts over:
its record describes traffic that is gone. Models held or carried are not fed and keep their
forecast. A window without a single request plans 0 (the forecast keeps learning from it). This
module only reads the collection and writes the controller's forecast memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from optimizer.planned_rate import RATE_GRID, PlannedRate, on_grid
from variant_autoscaler.collector import CollectionResult, ModelObservation
from variant_autoscaler.settings import OperatorSettings

MAX_GAP_INTERVALS = 4.0


@dataclass
class ModelForecast:
    planned: PlannedRate
    fed_s: float  # end of the last reading fed
    before: tuple | None  # PlannedRate.state() before that reading
    before_s: float | None  # end of the reading before it
    built_with: tuple[float, float, float | None]  # (lead time, interval, error z) it was made for


def lead_time_s(settings: OperatorSettings, model: str) -> float:
    entry = settings.model(model)
    return entry.lead_time_s if entry is not None and entry.lead_time_s is not None else settings.forecast_lead_time_s


def forecast_demand(forecasts: dict[str, ModelForecast], collection: CollectionResult,
                    model_ok: dict[str, tuple[bool, str]], settings: OperatorSettings,
                    now: float) -> dict[str, ModelObservation]:
    """Per model with fresh metrics: its observation with `arrival_rate_rps` raised to the planned rate.

    Models without fresh metrics are left out (the caller keeps their observation as it is). With
    `settings.forecast` off, nothing is planned ahead and the forecasts are forgotten.
    """
    if not settings.forecast:
        forecasts.clear()
        return {}
    out: dict[str, ModelObservation] = {}
    interval = settings.interval_s
    for model, (ok, _) in model_ok.items():
        obs = collection.models.get(model)
        if not ok or obs is None or obs.arrival_rate_rps is None:
            continue
        rate = obs.arrival_rate_rps
        spec = (lead_time_s(settings, model), interval, settings.forecast_error_z)
        f = forecasts.get(model)
        if f is not None and (f.built_with != spec or now - f.fed_s > MAX_GAP_INTERVALS * interval
                              or now < f.fed_s):
            f = None
        if f is not None and now - f.fed_s < interval / 2:
            # A second reading of about the same window: it replaces the last one.
            if f.before is None:
                f = None
            else:
                f.planned.restore(f.before)
                since = f.before_s
                f = ModelForecast(f.planned, since, None, None, spec)
                duration = now - since
                _feed(f, now, rate, duration)
                forecasts[model] = f
        if f is None:
            f = ModelForecast(PlannedRate(spec[0], interval, error_z=spec[2]), now - interval, None, None, spec)
            _feed(f, now, rate, interval)
            forecasts[model] = f
        elif f.fed_s != now:
            _feed(f, now, rate, now - f.fed_s)
        # No request at all in the window: the forecast's level is then its own +1/2-count bias, and
        # an idle model must still reach its minimum replicas.
        planned = on_grid(f.planned.rate_rps(now, floor_rps=rate), RATE_GRID, up=True) if rate > 0 else 0.0
        out[model] = obs.model_copy(update={"arrival_rate_rps": planned})
    for model in [m for m in forecasts if m not in model_ok]:
        del forecasts[model]  # no variant of it is left
    return out


def _feed(f: ModelForecast, now: float, rate_rps: float, duration_s: float) -> None:
    f.before, f.before_s = f.planned.state(), f.fed_s
    f.planned.observe(now, max(0, round(rate_rps * duration_s)), duration_s)
    f.fed_s = now
