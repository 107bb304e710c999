"""The arrival rate to plan capacity for: one lead time ahead, with headroom for the forecast's own errors.

Why one place: the simulator's `ours` and the operator must plan on the same rate, or the
simulator's cost and attainment figures describe a policy nobody runs. Capacity requested now
serves only after a cold start (`lead_time_s`), so the plan is the highest point of the Kalman
forecast's path over that lead time (`optimizer.forecast`), times the headroom the record of its
errors one lead time ahead asks for (`optimizer.forecast_error`), never below a floor the caller
knows better (the simulator's burst allowance; the operator's rate measured now).

Both inputs are counts per interval: the simulator counts arrivals, the operator turns the rate
Prometheus measured over its window into the count of the time since its last reading.
"""

from __future__ import annotations

import math

from optimizer.forecast import ArrivalForecast
from optimizer.forecast_error import ForecastErrorBand

DEFAULT_ERROR_Z = 0.75
"""Spread of the recorded errors the plan covers. Chosen on the simulator's default demo and six fresh
draws of it (0.5, 0.75 and 1.0 tried; 1.0 cost ~4 % more for no attainment gained)."""


RATE_GRID = 1.02
"""Plans are rounded up to powers of this: the capacity model caches solved cases and the allocation
warm-starts from the last one, and a plan that moves by a fraction of a percent each interval
would miss both every time for a precision no forecast has."""


def on_grid(value: float, ratio: float, *, up: bool = False) -> float:
    """`value` moved to the nearest (or next higher) power of `ratio`; 0 stays 0."""
    if value <= 0:
        return 0.0
    steps = math.log(value) / math.log(ratio)
    return ratio ** (math.ceil(steps - 1e-9) if up else round(steps))


class PlannedRate:
    """Feeds a forecast and its error record interval by interval; reads the rate to plan for."""

    def __init__(self, lead_time_s: float, interval_s: float, *, error_z: float | None = DEFAULT_ERROR_Z):
        if lead_time_s < 0 or interval_s <= 0:
            raise ValueError(f"need lead_time_s >= 0 and interval_s > 0, got {lead_time_s}, {interval_s}")
        self.lead_time_s = float(lead_time_s)
        self.forecast = ArrivalForecast(interval_s)
        self.errors = None if error_z is None else ForecastErrorBand(lead_time_s, z=error_z)

    @property
    def interval_s(self) -> float:
        return self.forecast.interval_s

    def observe(self, end_s: float, arrivals: int, duration_s: float) -> None:
        """`arrivals` requests in the `duration_s` seconds that ended at `end_s`."""
        self.forecast.observe(arrivals, duration_s)
        if self.errors is not None:
            self.errors.observe(end_s, arrivals, duration_s)

    def state(self) -> tuple:
        """A snapshot `restore` goes back to (the operator replaces a reading taken again within an interval)."""
        return self.forecast.state(), None if self.errors is None else self.errors.state()

    def restore(self, state: tuple) -> None:
        forecast, errors = state
        self.forecast.restore(forecast)
        if self.errors is not None and errors is not None:
            self.errors.restore(errors)

    def observe_rate(self, end_s: float, rate_rps: float, elapsed_s: float, window_s: float) -> None:
        """A rate measured over the `window_s` seconds that ended at `end_s`, `elapsed_s` after the last one.

        The forecast reads the window's count (rate x window: a count of one second at 1.5 req/s would
        read as (1.5 + 1/2) / 1 = 2 req/s through its +1/2 term); the error record, which sums counts
        over its own window, gets the count of the time since the last reading, so none is counted twice.
        """
        window_s = max(window_s, elapsed_s)
        self.forecast.observe(rate_rps * window_s, window_s, elapsed_s=elapsed_s)
        if self.errors is not None:
            self.errors.observe(end_s, rate_rps * elapsed_s, elapsed_s)

    def path_rps(self) -> float:
        """The forecast's highest rate until capacity asked for now would serve (one interval after the lead time)."""
        return self.forecast.upper_rps(self.lead_time_s + self.forecast.interval_s)

    def rate_rps(self, now_s: float, floor_rps: float = 0.0) -> float:
        """The rate to plan for at `now_s`, recorded to be checked one lead time later.

        The check is against the whole plan, floor included: where the floor already covered the
        rate that came, the forecast needs no headroom for it (the simulator's bursty70b: $157.74
        checking the path alone, $134.47 checking the plan).
        """
        rate = self.path_rps()
        if self.errors is not None:
            self.errors.predicted(now_s, max(rate, floor_rps))
            rate *= self.errors.factor()
        return max(rate, floor_rps)
