"""Turn what a cluster observed into the demand the optimizer plans for: a rate and a length mix.

The optimizer sizes replicas for a `Workload` (requests/s and length buckets); a policy only sees
arrival times with prompt lengths, and the lengths of finished requests. This estimator bridges
the two and is where an autoscaler decides how much of the future it plans for:

* **rate**: the highest arrival rate over windows of `rate_windows_s` within the last
  `rate_horizon_s` (InferLine's envelope at the time scales a replica's cold start cares about),
  plus the recent trend extrapolated over `lead_time_s`, because capacity requested now serves
  only after a cold start and traffic that is rising keeps rising meanwhile; and a planned rate
  is held for `lead_time_s`, so replicas requested for a rise are not cancelled while they are
  still starting when the trend term fades (cancelling them wastes their cold start and leaves
  the rise uncovered);
* **forecast** (with `forecast=True`, what the simulator's `ours` runs): instead of the envelope,
  the trend and the hold, the path of a Kalman forecast of the rate over the lead time
  (`optimizer.forecast`); it leads a steady rise the two-count trend cannot see beyond its noise and
  follows a fall at once. Only the burst allowance is then held for the lead time;
* **forecast error** (with `forecast_error_z`, what the simulator's `ours` runs): the forecast times
  the headroom its own record of errors one lead time ahead asks for (`optimizer.forecast_error`):
  a rise within a cold start that the path did not lead falls on the replicas already there;
* **bursts** (with `burst_absorb_s`): the level times the traffic's own burst factor over seconds
  (`optimizer.simulation.burst`), for bursts too short for any scale-up to catch;
* **mix**: buckets by prompt length (the router sees the prompt, not the future output), each
  with its share of the arrivals of the last `mix_horizon_s` seconds, its mean prompt, and the
  mean output length of that bucket's requests finished in the same horizon (blended with
  `prior_output_tokens` as if it were `PRIOR_WEIGHT` requests, so an empty bucket has a value and
  a few long answers do not swing it: output lengths are heavy-tailed, and an average over one
  interval moved by a quarter from one interval to the next).

A bucket's published lengths move only when the estimate has drifted more than 5 % from them,
shares are whole percent and the rate is rounded up to a 2 % grid: the capacity model caches
solved cases and the policy caches allocations, and a forecast that moves by a fraction of a
token each interval would miss both every time (the capacity model then costs 60 ms a cycle
instead of nothing) for a precision no forecast has.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from optimizer.planned_rate import RATE_GRID, PlannedRate, on_grid
from optimizer.simulation.burst import BurstAllowance
from optimizer.simulation.envelope import TrafficEnvelope
from optimizer.simulation.policy import Observation
from optimizer.workload import LengthBucket, Workload

DEFAULT_INPUT_EDGES = (256, 1024, 2048, 4096)
LENGTH_DEADBAND = 0.05
PRIOR_WEIGHT = 5
TREND_Z = 2.0
"""A trend counts only beyond this many standard errors of its estimate from two Poisson counts."""


def bucket_label(lo: int, hi: int | None) -> str:
    return f"in{lo}-{hi}" if hi is not None else f"in{lo}+"


class DemandEstimator:
    def __init__(
        self,
        model: str,
        *,
        input_edges: tuple[int, ...] = DEFAULT_INPUT_EDGES,
        rate_windows_s: tuple[float, ...] = (30.0, 60.0),
        rate_horizon_s: float = 120.0,
        trend_window_s: float = 60.0,
        lead_time_s: float = 60.0,
        mix_horizon_s: float = 600.0,
        prior_output_tokens: float = 256.0,
        burst_absorb_s: float | None = None,
        interval_s: float = 15.0,
        forecast: bool = False,
        forecast_error_z: float | None = None,
    ):
        edges = tuple(sorted(set(int(e) for e in input_edges)))
        if any(e <= 0 for e in edges):
            raise ValueError(f"input_edges must be > 0, got {input_edges}")
        self.model = model
        self.bounds: list[tuple[int, int | None]] = list(zip((0, *edges), (*edges, None), strict=True))
        self.labels = [bucket_label(lo, hi) for lo, hi in self.bounds]
        self._edges = list(edges)
        self.envelope = TrafficEnvelope(tuple(rate_windows_s), horizon_s=rate_horizon_s)
        self.trend_window_s = trend_window_s
        self.lead_time_s = lead_time_s
        self.mix_horizon_s = mix_horizon_s
        self.prior_output_tokens = float(prior_output_tokens)
        n = len(self.bounds)
        self._mix: deque[tuple[float, int, int]] = deque()  # (time, bucket, prompt tokens)
        self._count = [0] * n
        self._tokens = [0] * n
        self._done: deque[tuple[float, int, int]] = deque()  # (time, bucket, output tokens)
        self._out_sum = [0] * n
        self._out_n = [0] * n
        self._recent: deque[float] = deque()  # arrival times of the last 2 trend windows
        self._held_plans: deque[tuple[float, float]] = deque()  # (time, planned rate) of the last lead time
        self._published: dict[int, tuple[float, float]] = {}  # bucket -> (input, output) last planned for
        self._since: float | None = None  # first observation
        self.planned = PlannedRate(lead_time_s, interval_s, error_z=forecast_error_z) if forecast else None
        self.bursts = None if burst_absorb_s is None else BurstAllowance(
            absorb_s=burst_absorb_s, interval_s=interval_s, lead_time_s=lead_time_s)

    def bucket_of(self, input_tokens: int) -> int:
        return bisect.bisect_right(self._edges, input_tokens)

    def observe(self, observation: Observation) -> None:
        arrivals = observation.arrivals_of(self.model)
        if self._since is None:
            self._since = observation.time_s - observation.interval_s
        self.envelope.extend(arrivals.times_s)
        if self.planned is not None:
            self.planned.observe(observation.time_s, len(arrivals.times_s), observation.interval_s)
        if self.bursts is not None:
            self.bursts.observe(arrivals.times_s, observation.time_s)
        for t, n_in in zip(arrivals.times_s, arrivals.input_tokens, strict=True):
            b = self.bucket_of(n_in)
            self._mix.append((t, b, n_in))
            self._count[b] += 1
            self._tokens[b] += n_in
            self._recent.append(t)
        now = observation.time_s
        while self._mix and self._mix[0][0] <= now - self.mix_horizon_s:
            _, b, n_in = self._mix.popleft()
            self._count[b] -= 1
            self._tokens[b] -= n_in
        while self._recent and self._recent[0] <= now - 2 * self.trend_window_s:
            self._recent.popleft()
        done = observation.completions_of(self.model)
        for n_in, n_out in zip(done.input_tokens, done.output_tokens, strict=True):
            b = self.bucket_of(n_in)
            self._done.append((now, b, n_out))
            self._out_sum[b] += n_out
            self._out_n[b] += 1
        while self._done and self._done[0][0] <= now - self.mix_horizon_s:
            _, b, n_out = self._done.popleft()
            self._out_sum[b] -= n_out
            self._out_n[b] -= 1

    def output_tokens(self, b: int) -> float:
        """Mean output length of bucket b, blended with the prior."""
        return (self.prior_output_tokens * PRIOR_WEIGHT + self._out_sum[b]) / (PRIOR_WEIGHT + self._out_n[b])

    def rate_rps(self, now: float) -> float:
        """Planned arrival rate: the recent envelope, raised by a rising trend, held for the lead time."""
        if self.envelope.count == 0:
            return 0.0
        envelope = self.envelope.max_rate(now)
        w = self.trend_window_s
        split = bisect.bisect_right(self._recent, now - w) if self._recent else 0
        older = split
        newer = len(self._recent) - split
        slope = (newer - older) / (w * w)
        # Before two windows have been watched the older one is empty, not quiet: no trend yet
        # (it read a steady start as a rise from zero and planned 3x the traffic).
        if self._since is None or now - self._since < 2 * w:
            slope = 0.0
        # Only the part of the slope its own Poisson noise cannot explain is extrapolated: two
        # minute counts at 4 req/s differ by ~22 by chance, which over a 110 s cold start read as
        # +0.7 req/s, and holding the highest plan of the lead time turned that noise into a
        # standing 30-50 % over-provisioning on the default demo.
        slope = max(0.0, slope) - TREND_Z * math.sqrt(newer + older) / (w * w)
        rate = max(envelope, newer / w + max(0.0, slope) * self.lead_time_s)
        burst = self.bursts.rate_rps() if self.bursts is not None else 0.0
        if self.planned is not None:
            # The forecast replaces the envelope, the trend and the hold of the whole plan: its path
            # already leads a rise and follows a fall. Only the burst allowance is held (it swings
            # from interval to interval, and a plan that dips between bursts swaps replicas).
            rate = self.planned.rate_rps(now, floor_rps=burst)
        rate = max(rate, burst)
        while self._held_plans and self._held_plans[0][0] <= now - self.lead_time_s:
            self._held_plans.popleft()
        held = max((r for _, r in self._held_plans), default=0.0)
        self._held_plans.append((now, burst if self.planned is not None else rate))
        return on_grid(max(rate, held), RATE_GRID, up=True)

    def _lengths(self, b: int, n_in: float, n_out: float) -> tuple[float, float]:
        old = self._published.get(b)
        if old is None or abs(n_in / old[0] - 1) > LENGTH_DEADBAND or abs(n_out / old[1] - 1) > LENGTH_DEADBAND:
            self._published[b] = (round(n_in), round(n_out))
        return self._published[b]

    def workload(self, now: float) -> Workload:
        total = sum(self._count)
        cells = []
        for b, (lo, hi) in enumerate(self.bounds):
            if total:
                share = round(100 * self._count[b] / total)
                mean_in = self._tokens[b] / max(1, self._count[b])
            else:
                share, mean_in = 1, (lo + (hi or 2 * lo)) / 2
            if share > 0:
                cells.append((b, share, mean_in))
        if not cells:  # every bucket under half a percent: keep the busiest
            b = max(range(len(self.bounds)), key=lambda i: self._count[i])
            cells = [(b, 1, self._tokens[b] / max(1, self._count[b]))]
        whole = sum(share for _, share, _ in cells)
        buckets = []
        for b, share, mean_in in cells:
            n_in, n_out = self._lengths(b, max(1.0, mean_in), max(1.0, self.output_tokens(b)))
            buckets.append(LengthBucket(name=self.labels[b], share=share / whole, input_tokens=n_in,
                                        output_tokens=n_out))
        return Workload(model=self.model, arrival_rate_rps=self.rate_rps(now), buckets=buckets)
