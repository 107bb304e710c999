"""How wrong the rate forecast has been one lead time ahead, as headroom for the next plan.

Why: capacity requested now serves only after a cold start, and whatever the rate does beyond the
forecast's path meanwhile falls on the replicas already there. Under capacity for even a minute,
a replica's queue grows past its TTFT budget and nearly every request of that minute misses, so
one such minute in a half hour is the whole 1 % budget (a fresh draw of the default demo: the 8B's
rate rose from 12.6 to 15.5 req/s within a minute, one H100 was planned, the replicas asked for
arrived a cold start later, and 610 requests missed). How far the rate strays from the forecast
within a lead time depends on the traffic, not on a constant: the Kalman filter's own band assumes
its model is right. So each forecast is recorded, and once its lead time has passed it is compared
with the rate that arrived when the capacity it asked for would have been serving: the log ratio,
its mean (a forecast that lags rises reads low) and its spread beyond what the window's Poisson
noise explains (the capacity model already sizes a replica for Poisson arrivals at the SLO
percentile). The plan is the forecast times exp(mean + z * spread), never below the forecast.
"""

from __future__ import annotations

import math
from collections import deque

MIN_SAMPLES = 8
"""Below this many checked forecasts the headroom is 1 (no record yet to read a spread from)."""


class ForecastErrorBand:
    """Records forecasts, checks each one lead time later, and reads headroom off the errors."""

    def __init__(self, lead_time_s: float, *, window_s: float = 60.0, z: float = 1.0, memory: int = 120,
                 min_samples: int = MIN_SAMPLES):
        if lead_time_s < 0 or window_s <= 0 or z < 0 or memory < 2 or min_samples < 2:
            raise ValueError("need lead_time_s >= 0, window_s > 0, z >= 0, memory >= 2, min_samples >= 2")
        self.lead_time_s = float(lead_time_s)
        self.window_s = float(window_s)
        self.z = float(z)
        self.min_samples = int(min_samples)
        self._pending: deque[tuple[float, float]] = deque()  # (time of the forecast, forecast rate)
        self._counts: deque[tuple[float, int, float]] = deque()  # (interval end, arrivals, duration)
        self._errors: deque[tuple[float, float]] = deque(maxlen=memory)  # (log ratio, its Poisson variance)

    def predicted(self, time_s: float, rate_rps: float) -> None:
        """The forecast made at `time_s` for the rate one lead time ahead."""
        if rate_rps > 0:
            self._pending.append((float(time_s), float(rate_rps)))

    def observe(self, end_s: float, arrivals: float, duration_s: float) -> None:
        """Arrivals of the interval that ended at `end_s` (a count, or a measured rate times the interval);
        checks every forecast whose window has passed."""
        if duration_s <= 0 or arrivals < 0:
            raise ValueError("need duration_s > 0 and arrivals >= 0")
        self._counts.append((float(end_s), float(arrivals), float(duration_s)))
        while self._pending and self._pending[0][0] + self.lead_time_s + self.window_s <= end_s + 1e-9:
            t, rate = self._pending.popleft()
            lo, hi = t + self.lead_time_s, t + self.lead_time_s + self.window_s
            n = dur = 0.0
            for e, c, d in self._counts:
                if lo < e <= hi + 1e-9:
                    n += c
                    dur += d
            if dur > 0:
                self._errors.append((math.log((n + 0.5) / (dur * rate)), 1.0 / (n + 0.5)))
        first = self._pending[0][0] + self.lead_time_s if self._pending else end_s
        while self._counts and self._counts[0][0] <= first:
            self._counts.popleft()

    def state(self) -> tuple:
        """What `restore` needs to put the record back as it is now."""
        return tuple(self._pending), tuple(self._counts), tuple(self._errors)

    def restore(self, state: tuple) -> None:
        pending, counts, errors = state
        self._pending = deque(pending)
        self._counts = deque(counts)
        self._errors = deque(errors, maxlen=self._errors.maxlen)

    @property
    def checked(self) -> int:
        return len(self._errors)

    def factor(self) -> float:
        """Headroom over the forecast: exp(mean error + z * its spread beyond Poisson noise), >= 1."""
        if len(self._errors) < self.min_samples:
            return 1.0
        errs = [e for e, _ in self._errors]
        mean = sum(errs) / len(errs)
        var = sum((e - mean) ** 2 for e in errs) / (len(errs) - 1)
        noise = sum(v for _, v in self._errors) / len(self._errors)
        return math.exp(max(0.0, mean + self.z * math.sqrt(max(0.0, var - noise))))
