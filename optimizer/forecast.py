"""Short-horizon arrival-rate forecast: a local linear trend Kalman filter on the log of the rate.

Why: capacity requested now serves only after a cold start, so the plan must cover the rate one
lead time ahead. A trend read from the difference of two minute counts is as noisy as the counts
(two minutes at 12 req/s differ by ~38 requests by chance), so it has to be discounted by its own
noise and then misses a steady diurnal rise of 1 req/s per minute altogether: the plan lagged the
default demo's 8B by a minute of growth. A Kalman filter pools every interval it has seen, weighs
each by its Poisson noise, and says how sure it is: the plan covers the forecast's upper quantile.

The state is (log rate, growth per second), observed once per interval as log((n + 1/2) / dt):
working on the log makes the noise grids scale-free (the same filter fits 0.5 and 50 req/s). By
default its variance is 1 / (n + 1/2) of the count seen, which trusts the busy intervals most, so
the level reads high wherever counts are small (+23 % at 0.25 req/s with 15 s intervals, 2.1x at
0.05 req/s; +1 % at 12 req/s). `count_noise="predicted"` takes the observation's relation to the
state and its noise from each filter's own predicted count instead (the exact moments of
log(n + 1/2) for a Poisson count, linearised as an extended Kalman filter does): unbiased at every
rate, but it also reacts more slowly to a count above the prediction, and the simulator's azure70b
fell from 99.35 % to 96.93 % with it (longctx70b, whose plan it lowers by ~20 %, did not get cheaper:
its burst allowance then set the plan); so it is not the default. How fast level and growth may wander is not assumed: a small
bank of filters, one per (level noise, growth noise) pair of `LEVEL_NOISE` x `GROWTH_NOISE`, runs
side by side and the forecast comes from the one whose one-step predictions explained the recent
intervals best (log-likelihood, exponentially forgotten over `memory_s`). Calm traffic then
selects slow filters with tight bands, wandering traffic fast ones with wide bands.

The filters are `filterpy.kalman.KalmanFilter`; this module only builds them, picks among them and
reads a forecast off the chosen one.
"""

from __future__ import annotations

import math

import numpy as np
from filterpy.kalman import KalmanFilter
from scipy.special import gammaln

LEVEL_NOISE = (1e-5, 1e-4, 1e-3, 1e-2)
"""Variance per second of the log-rate's own random walk (1e-3: ~25 % per minute)."""
GROWTH_NOISE = (1e-10, 1e-9, 1e-8, 1e-7)
"""Variance per second of the growth rate's random walk, in (1/s)^2 per s."""
FORECAST_Z = 0.0
"""The plan covers the forecast's path plus this many standard deviations. 0: the capacity model
already sizes replicas for Poisson arrivals at the SLO percentile, and on six draws of the default
demo z = 0.5 cost 25-35 % more than z = 0 for no attainment that z = 0 lacked (both >= 99 %)."""
PATH_POINTS = 5


COUNT_NOISE = ("observed", "predicted")
"""How an interval's count is weighed. "observed" (the default): log((n + 1/2) / dt) with variance
1 / (n + 1/2) of the count seen. "predicted": the exact moments of log(n + 1/2) at each filter's own
predicted count, linearised as an extended Kalman filter does (see the module docstring)."""
_EXACT_COUNT_LIMIT = 400.0
"""Above this many expected arrivals per interval log(n + 1/2) is taken as normal around log(mean)."""
_MIN_SLOPE = 1e-3


def log_count_moments(mean_count: float) -> tuple[float, float, float]:
    """Mean and variance of log(n + 1/2) for n ~ Poisson(mean_count), and its slope d mean / d log(mean_count).

    Why exact: at a few arrivals per interval log(n + 1/2) is skewed and its spread, 1 / mean_count
    in the limit, is far from 1 / (n + 1/2) of the one count seen; near zero arrivals it barely moves
    with the rate (the slope falls below 1), which a plain log observation would misread as a steady
    level. Sums the Poisson pmf over n up to mean + 12 sd + 12; above `_EXACT_COUNT_LIMIT` the normal
    limit (log mean, 1 / mean, 1).
    """
    mu = max(float(mean_count), 1e-9)
    if mu > _EXACT_COUNT_LIMIT:
        return math.log(mu), 1.0 / mu, 1.0
    n = np.arange(int(math.ceil(mu + 12.0 * math.sqrt(mu) + 12.0)) + 1, dtype=float)
    pmf = np.exp(n * math.log(mu) - mu - gammaln(n + 1.0))
    pmf /= pmf.sum()
    logs = np.log(n + 0.5)
    mean = float(pmf @ logs)
    var = max(float(pmf @ (logs - mean) ** 2), 1e-12)
    # d E[f(n)] / d mu = E[f(n + 1) - f(n)] for a Poisson count; times mu for the log scale.
    slope = max(mu * float(pmf @ (np.log(n + 1.5) - logs)), _MIN_SLOPE)
    return mean, var, slope


def _log_likelihood(kf: KalmanFilter) -> float:
    """The last measurement's log-likelihood: filterpy's `log_likelihood` with one observed dimension,
    without its scipy multivariate-normal call (0.4 ms each, 16 per interval per model: 0.2 s a cycle
    at 100 models in the operator)."""
    y, var = float(kf.y[0, 0]), float(kf.S[0, 0])
    return -0.5 * (math.log(2.0 * math.pi * var) + y * y / var)


class ArrivalForecast:
    def __init__(self, interval_s: float, *, memory_s: float = 1800.0, z: float = FORECAST_Z,
                 level_noise: tuple[float, ...] = LEVEL_NOISE, growth_noise: tuple[float, ...] = GROWTH_NOISE,
                 count_noise: str = "observed"):
        if interval_s <= 0 or memory_s <= 0 or z < 0:
            raise ValueError("need interval_s > 0, memory_s > 0, z >= 0")
        if count_noise not in COUNT_NOISE:
            raise ValueError(f"count_noise must be one of {COUNT_NOISE}, got {count_noise!r}")
        self.count_noise = count_noise
        self.interval_s = float(interval_s)
        self.z = float(z)
        self._forget = math.exp(-interval_s / memory_s)
        self._noise = [(q_l, q_g) for q_l in level_noise for q_g in growth_noise]
        self._filters: list[KalmanFilter] | None = None
        self._score = np.zeros(len(self._noise))
        self.observed = 0

    def _bank(self, x0: float, dt: float) -> list[KalmanFilter]:
        bank = []
        for q_l, q_g in self._noise:
            kf = KalmanFilter(dim_x=2, dim_z=1)
            kf.x = np.array([[x0], [0.0]])
            kf.P = np.diag([1.0, 1e-5])
            kf.H = np.array([[1.0, 0.0]])
            self._set_dt(kf, q_l, q_g, dt)
            bank.append(kf)
        return bank

    @staticmethod
    def _set_dt(kf: KalmanFilter, q_l: float, q_g: float, dt: float) -> None:
        kf.F = np.array([[1.0, dt], [0.0, 1.0]])
        # Growth noise integrates into the level over the step: the usual local-linear-trend Q.
        kf.Q = np.array([[q_l * dt + q_g * dt ** 3 / 3, q_g * dt ** 2 / 2], [q_g * dt ** 2 / 2, q_g * dt]])

    def observe(self, arrivals: float, duration_s: float, *, elapsed_s: float | None = None) -> None:
        """Count of arrivals in the last `duration_s` seconds, `elapsed_s` (default: `duration_s`) after
        the previous reading. They differ where the count comes from a rate measured over a window
        longer than the time between readings (the operator's Prometheus window): the count of the
        window carries its noise, the time since the last reading moves the state."""
        if duration_s <= 0 or arrivals < 0 or (elapsed_s is not None and elapsed_s <= 0):
            raise ValueError("need duration_s > 0, elapsed_s > 0 and arrivals >= 0")
        dt = duration_s if elapsed_s is None else elapsed_s
        z = math.log((arrivals + 0.5) / duration_s)
        if self._filters is None:
            self._filters = self._bank(z, dt)
        for k, kf in enumerate(self._filters):
            self._set_dt(kf, *self._noise[k], dt)
            kf.predict()
            if self.count_noise == "observed":
                kf.update(np.array([[z]]), R=np.array([[1.0 / (arrivals + 0.5)]]))
                self._score[k] = self._forget * self._score[k] + _log_likelihood(kf)
                continue
            # Linearised around the predicted log rate x: z ~ mean(x) + slope (state - x), variance
            # var(x); update() takes z - H state, so the offset moves into the observation.
            x = float(kf.x[0, 0])
            mean, var, slope = log_count_moments(math.exp(x) * duration_s)
            kf.H = np.array([[slope, 0.0]])
            z_lin = z - (mean - math.log(duration_s)) + slope * x
            kf.update(np.array([[z_lin]]), R=np.array([[var]]))
            self._score[k] = self._forget * self._score[k] + _log_likelihood(kf)
        self.observed += 1

    def state(self) -> tuple:
        """What `restore` needs to put the forecast back as it is now (each filter's mean and covariance)."""
        kept = None if self._filters is None else [(kf.x.copy(), kf.P.copy()) for kf in self._filters]
        return kept, self._score.copy(), self.observed

    def restore(self, state: tuple) -> None:
        kept, score, observed = state
        if kept is None:
            self._filters = None
        else:
            if self._filters is None:
                self._filters = self._bank(0.0, self.interval_s)
            for kf, (x, p) in zip(self._filters, kept, strict=True):
                kf.x, kf.P = x.copy(), p.copy()
        self._score = score.copy()
        self.observed = observed

    def _best(self) -> KalmanFilter | None:
        if self._filters is None:
            return None
        return self._filters[int(np.argmax(self._score))]

    def level_rps(self) -> float:
        kf = self._best()
        return 0.0 if kf is None else math.exp(float(kf.x[0, 0]))

    def growth_per_s(self) -> float:
        kf = self._best()
        return 0.0 if kf is None else float(kf.x[1, 0])

    def upper_rps(self, horizon_s: float) -> float:
        """The highest upper-quantile rate over the next `horizon_s` seconds (0: now)."""
        kf = self._best()
        if kf is None:
            return 0.0
        k = int(np.argmax(self._score))
        q_l, q_g = self._noise[k]
        x, p = kf.x[:, 0], kf.P
        best = 0.0
        for h in np.linspace(0.0, max(horizon_s, 0.0), PATH_POINTS):
            mean = x[0] + x[1] * h
            var = p[0, 0] + 2 * h * p[0, 1] + h * h * p[1, 1] + q_l * h + q_g * h ** 3 / 3
            best = max(best, math.exp(mean + self.z * math.sqrt(max(var, 0.0))))
        return best

    def selected_noise(self) -> tuple[float, float] | None:
        """(level, growth) noise of the filter in use: how wild the traffic has looked."""
        return None if self._filters is None else self._noise[int(np.argmax(self._score))]
