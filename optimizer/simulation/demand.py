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
* **mix**: buckets by prompt length (the router sees the prompt, not the future output), each
  with its share of the arrivals of the last `mix_horizon_s` seconds, its mean prompt, and the
  mean output length of the finished requests of that bucket (an exponential average, starting
  from `prior_output_tokens`).
"""

from __future__ import annotations

import bisect
from collections import deque

from optimizer.simulation.envelope import TrafficEnvelope
from optimizer.simulation.policy import Observation
from optimizer.workload import LengthBucket, Workload

DEFAULT_INPUT_EDGES = (256, 1024, 2048, 4096)


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
        output_ema: float = 0.2,
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
        self.output_ema = output_ema
        n = len(self.bounds)
        self._mix: deque[tuple[float, int, int]] = deque()  # (time, bucket, prompt tokens)
        self._count = [0] * n
        self._tokens = [0] * n
        self._output = [float(prior_output_tokens)] * n
        self._recent: deque[float] = deque()  # arrival times of the last 2 trend windows
        self._planned: deque[tuple[float, float]] = deque()  # (time, planned rate) of the last lead time

    def bucket_of(self, input_tokens: int) -> int:
        return bisect.bisect_right(self._edges, input_tokens)

    def observe(self, observation: Observation) -> None:
        arrivals = observation.arrivals_of(self.model)
        self.envelope.extend(arrivals.times_s)
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
        sums: dict[int, list[float]] = {}
        for n_in, n_out in zip(done.input_tokens, done.output_tokens, strict=True):
            s = sums.setdefault(self.bucket_of(n_in), [0.0, 0])
            s[0] += n_out
            s[1] += 1
        for b, (total, count) in sums.items():
            weight = 1.0 - (1.0 - self.output_ema) ** count
            self._output[b] += weight * (total / count - self._output[b])

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
        rate = max(envelope, newer / w + max(0.0, slope) * self.lead_time_s)
        while self._planned and self._planned[0][0] <= now - self.lead_time_s:
            self._planned.popleft()
        held = max((r for _, r in self._planned), default=0.0)
        self._planned.append((now, rate))
        return max(rate, held)

    def workload(self, now: float) -> Workload:
        total = sum(self._count)
        buckets = []
        for b, (lo, hi) in enumerate(self.bounds):
            if total and self._count[b] == 0:
                continue
            if total:
                share = self._count[b] / total
                mean_in = self._tokens[b] / self._count[b]
            else:
                share, mean_in = 1.0 / len(self.bounds), (lo + (hi or 2 * lo)) / 2
            buckets.append(LengthBucket(name=self.labels[b], input_tokens=max(1.0, mean_in),
                                        output_tokens=max(1.0, self._output[b]), share=share))
        return Workload(model=self.model, arrival_rate_rps=self.rate_rps(now), buckets=buckets)
