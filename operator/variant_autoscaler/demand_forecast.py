"""Plan each model on the rate one lead time ahead, as the simulator's `ours` does.

Why: replicas asked for now serve only after their cold start, so planning on the rate measured
now leaves a rise uncovered for a whole lead time; the simulator's figures (README, "Decision
quality") are those of a policy that plans on `optimizer.planned_rate.PlannedRate`, and the
operator must run that policy, not a weaker one. Each cycle feeds every model with fresh metrics
the rate Prometheus measured over its window (`PlannedRate.observe_rate`: the forecast reads the
window's count, the error record the count of the time since the last reading), then plans on the
forecast's path times the headroom of its own recorded errors, never below the rate measured now,
rounded up to the same 2 % grid as the simulator's plan. What the simulator has and the operator
cannot: per-request arrival times, so no burst allowance (Prometheus gives rates over a window).

Readings closer together than half an interval (a cycle triggered by a resource change) replace
the last one instead of adding a second reading of the same window. After a gap longer than
`MAX_GAP_INTERVALS` intervals (metrics lost, the model idle at zero) the forecast starts over:
its record describes traffic that is gone. Models held or carried are not fed and keep their
forecast. Requests already queued are served within the lead time (they are added as a rate, with
the forecast or without it, as the simulator's `ours` does). A window without a single request plans 0 (the forecast keeps learning from it). This
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
    """Per model with fresh metrics whose plan is not the measured rate: its observation with
    `arrival_rate_rps` raised to the planned rate.

    The plan is the forecast (with `settings.forecast`; off: the measured rate, and the forecasts
    are forgotten) plus the requests already queued, as the rate that serves them within the lead
    time (no new capacity arrives sooner): the simulator's `ours` does the same, and planning on
    arrivals alone left a backlog from a cold start under load to drain at the margin between
    capacity and traffic for minutes. Models without fresh metrics are left out (the caller keeps
    their observation as it is).
    """
    if not settings.forecast:
        forecasts.clear()
    out: dict[str, ModelObservation] = {}
    interval = settings.interval_s
    for model, (ok, _) in model_ok.items():
        obs = collection.models.get(model)
        if not ok or obs is None or obs.arrival_rate_rps is None:
            continue
        rate = obs.arrival_rate_rps
        lead = lead_time_s(settings, model)
        planned = _forecast(forecasts, model, rate, lead, settings, now) if settings.forecast else rate
        if obs.waiting > 0:
            planned = on_grid(planned + obs.waiting / max(lead, 2.0 * interval), RATE_GRID, up=True)
        if planned != rate:
            out[model] = obs.model_copy(update={"arrival_rate_rps": planned})
    for model in [m for m in forecasts if m not in model_ok]:
        del forecasts[model]  # no variant of it is left
    return out


def _forecast(forecasts: dict[str, ModelForecast], model: str, rate: float, lead: float,
              settings: OperatorSettings, now: float) -> float:
    interval = settings.interval_s
    spec = (lead, interval, settings.forecast_error_z)
    f = forecasts.get(model)
    if f is not None and (f.built_with != spec or now - f.fed_s > MAX_GAP_INTERVALS * interval or now < f.fed_s):
        f = None
    if f is not None and now - f.fed_s < interval / 2:
        # A second reading of about the same window: it replaces the last one.
        if f.before is None:
            f = None
        else:
            f.planned.restore(f.before)
            since = f.before_s
            f = ModelForecast(f.planned, since, None, None, spec)
            _feed(f, now, rate, now - since, settings.rate_window_s)
            forecasts[model] = f
    if f is None:
        f = ModelForecast(PlannedRate(lead, interval, error_z=spec[2]), now - interval, None, None, spec)
        _feed(f, now, rate, interval, settings.rate_window_s)
        forecasts[model] = f
    elif f.fed_s != now:
        _feed(f, now, rate, now - f.fed_s, settings.rate_window_s)
    # No request at all in the window: the forecast's level is then its own +1/2-count bias, and
    # an idle model must still reach its minimum replicas.
    return on_grid(f.planned.rate_rps(now, floor_rps=rate), RATE_GRID, up=True) if rate > 0 else 0.0


def _feed(f: ModelForecast, now: float, rate_rps: float, elapsed_s: float, window_s: float) -> None:
    f.before, f.before_s = f.planned.state(), f.fed_s
    f.planned.observe_rate(now, max(0.0, rate_rps), elapsed_s, window_s)
    f.fed_s = now
