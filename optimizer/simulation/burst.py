"""Headroom for bursts shorter than a decision interval, learned from the traffic's own burstiness.

A plan sized on minute rates misses what happens within seconds: code-completion traffic sends
~100 requests in 6 s between idle minutes, and no scale-up helps once the burst has begun (a cold
start lasts a minute or two). What a burst costs depends on how long it lasts: the requests that
arrive within a window of w seconds must all have started within w + `absorb_s` (the TTFT budget
lets a queue absorb the rest). The capacity model already sizes replicas for Poisson arrivals at
the level, so only the excess counts: arrivals in the window beyond level x w plus `POISSON_Z`
Poisson standard deviations, spread over w + `absorb_s`. The level is the minute's *calm* level,
its arrivals less its largest burst (`calm_level_rps`): a burst counted in the level as well as in
its excess was counted twice. Every interval this records, for windows of 2 s up to 30 s, the
largest such extra rate; the ratio is a high quantile of those over the last `memory_s` seconds
against the memory's median calm level, and the allowance is the calm level now plus that headroom
scaled to the calm level of the last `SCALE_WINDOW_S`, so it follows a daily swing in level while
remembering how bursty the traffic is. Poisson-like traffic
(the default demo's) pays nothing for it (the ratio stays 1.00-1.03); a burst of 80 requests in 5 s at
a level of 8 req/s plans for about 10, and 5 s bursts at 4x the level an hour's worth of times (the
code-completion shape) for 2-3x the level.

Bursts that last minutes are a different problem: they are seen, but a scale-up serves only after a
cold start (`lead_time_s`). So it also records how much the minute's level grew over one lead time
beyond Poisson noise; when such jumps recur, the plan keeps capacity for the level they lead to
(the current level times the largest jump of the memory, capped at the highest level it holds: an
onset is a few intervals of an hour, which a quantile would not see).
A Markov-modulated 12 <-> 28 req/s hour with 2-minute bursts then plans ~28 in the calm minutes,
as a static fleet would, instead of missing every onset; a diurnal rise never trips it.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from scipy.special import ndtr
from scipy.stats import poisson

from optimizer.simulation.envelope import TrafficEnvelope

BURST_WINDOWS_S = (2.0, 5.0, 10.0, 30.0)
POISSON_Z = 4.0
"""Arrivals above the level by less than this many Poisson standard deviations are not a burst:
the capacity model's queueing already covers Poisson fluctuation at the SLO percentile."""
LEVEL_WINDOW_S = 60.0
SCALE_WINDOW_S = 300.0
"""The burst headroom scales with the mean calm level over this long (a daily swing, not a minute's noise)."""


class BurstAllowance:
    def __init__(self, *, absorb_s: float, interval_s: float, windows_s: tuple[float, ...] = BURST_WINDOWS_S,
                 memory_s: float = 3600.0, quantile: float = 0.95, lead_time_s: float | None = None):
        if absorb_s < 0 or interval_s <= 0 or memory_s <= 0 or not 0 < quantile <= 1:
            raise ValueError("need absorb_s >= 0, interval_s > 0, memory_s > 0, 0 < quantile <= 1")
        self.windows_s = tuple(sorted(windows_s))
        self.absorb_s = absorb_s
        self.memory_s = memory_s
        self.quantile = quantile
        self.envelope = TrafficEnvelope(self.windows_s, horizon_s=max(interval_s, max(self.windows_s)))
        # Peaks over the level's whole minute, so a burst is taken out of the calm level for as
        # long as the level counts it (the ratios keep the shorter horizon: a longer one would
        # count each chance 4-sigma second of Poisson traffic in twice as many intervals).
        self._minute = TrafficEnvelope(self.windows_s, horizon_s=LEVEL_WINDOW_S)
        self._calm = 0.0
        self._recent: deque[float] = deque()
        self._ratios: deque[tuple[float, float, float]] = deque()  # (time, extra req/s, calm level)
        self._since: float | None = None
        self.lead_time_s = lead_time_s
        self._history: deque[float] = deque()  # arrivals of the last lead time + one level window
        self._jumps: deque[tuple[float, float]] = deque()  # (time, growth ratio over a lead time)
        self._levels: deque[tuple[float, float]] = deque()  # (time, level)

    def observe(self, times_s, now: float) -> None:
        if self._since is None:
            self._since = now
        self.envelope.extend(times_s)
        self._minute.extend(times_s)
        self._recent.extend(times_s)
        while self._recent and self._recent[0] <= now - LEVEL_WINDOW_S:
            self._recent.popleft()
        level = self.level_rps()
        self._calm = calm_level_rps(len(self._recent), self._minute.peaks(now), self.windows_s)
        calm = self._calm
        # The level needs a whole minute of watching: before that it reads low, and the first
        # minute's ratios (6x at the start of the default demo) would stay in the memory for 15 min.
        if calm > 0 and now - self._since >= LEVEL_WINDOW_S:
            excess = _excess(self.envelope.peaks(now), calm, self.windows_s)
            extra_rps = float(np.max(excess / (np.asarray(self.windows_s) + self.absorb_s)))
            self._ratios.append((now, extra_rps, calm))
        while self._ratios and self._ratios[0][0] <= now - self.memory_s:
            self._ratios.popleft()
        if self.lead_time_s is not None:
            self._observe_jumps(times_s, now, level)

    def _observe_jumps(self, times_s, now: float, level: float) -> None:
        """Growth of the minute's level over one lead time, beyond what Poisson noise explains."""
        lead = self.lead_time_s
        self._history.extend(times_s)
        while self._history and self._history[0] <= now - lead - LEVEL_WINDOW_S:
            self._history.popleft()
        if now - self._since >= lead + LEVEL_WINDOW_S:
            arr = np.asarray(self._history)
            then = int(np.count_nonzero(arr <= now - lead))
            now_n = len(arr) - int(np.count_nonzero(arr <= now - LEVEL_WINDOW_S))
            excess = max(0.0, now_n - then - POISSON_Z * np.sqrt(now_n + then))
            if then > 0:
                self._jumps.append((now, 1.0 + excess / then))
            self._levels.append((now, level))
        for memory in (self._jumps, self._levels):
            while memory and memory[0][0] <= now - self.memory_s:
                memory.popleft()

    def level_rps(self) -> float:
        """Arrivals of the last minute per second, bursts included."""
        return len(self._recent) / LEVEL_WINDOW_S

    def calm_level_rps(self) -> float:
        """The last minute's level without its burst (see `calm_level_rps`)."""
        return self._calm

    def ratio(self) -> float:
        """The burst factor over the level that the plan covers (1 when bursts are not larger)."""
        if not self._ratios:
            return 1.0
        # The extra rate is set against the memory's typical calm level, not each interval's own:
        # a burst into a quiet minute (calm level 0.3 req/s) read as a ratio of 160, which the
        # quantile kept and the next busy minute multiplied into a plan of 300 req/s.
        typical = float(np.median([c for _, _, c in self._ratios]))
        if typical <= 0:
            return 1.0
        extra = float(np.quantile([e for _, e, _ in self._ratios], self.quantile))
        return max(1.0, 1.0 + extra / typical)

    def jump_rate_rps(self) -> float:
        """Traffic that has jumped faster than a cold start: the level times the largest jump seen,
        never above the highest level of the memory (a burst is not planned on top of the burst it is)."""
        if not self._jumps:
            return 0.0
        growth = max(g for _, g in self._jumps)
        highest = max(x for _, x in self._levels)
        return min(self.level_rps() * growth, highest)

    def recent_calm_rps(self) -> float:
        """Mean calm level of the last `SCALE_WINDOW_S`: what the burst headroom follows."""
        if not self._ratios:
            return self._calm
        edge = self._ratios[-1][0] - SCALE_WINDOW_S
        recent = [c for t, _, c in self._ratios if t > edge]
        return float(np.mean(recent))

    def rate_rps(self) -> float:
        """The calm level plus the burst headroom: a burst is counted once, by the headroom, not also
        in the level; the headroom follows the level of minutes, not of this one minute (a minute's
        Poisson noise of +-15 % times a burst factor of 6 swung the plan by a replica every minute)."""
        headroom = (self.ratio() - 1.0) * self.recent_calm_rps()
        return max(self.calm_level_rps() + headroom, self.jump_rate_rps())


def _excess(peaks: np.ndarray, level_rps: float, windows_s: tuple[float, ...]) -> np.ndarray:
    """Arrivals per window beyond the level and its Poisson noise (0 where none)."""
    expected = level_rps * np.asarray(windows_s)
    return np.maximum(peaks - poisson_threshold(expected), 0.0)


def poisson_threshold(expected) -> np.ndarray:
    """Counts a Poisson window of mean `expected` exceeds as rarely as a normal one exceeds mean + `POISSON_Z` sd.

    Why not mean + z sqrt(mean): at a few arrivals per window the Poisson tail is far heavier than the
    normal one (mean 0.5: 4 arrivals in 2 s happen once in ~600 windows, "4 sd" in the normal
    reading), so at 0.2 req/s chance clusters of a few prompts read as bursts, a burst factor of
    1.2-1.4 on traffic with none, and the plan held a second prefill server for it."""
    expected = np.asarray(expected, dtype=float)
    return np.maximum(poisson.isf(ndtr(-POISSON_Z), expected), expected + POISSON_Z * np.sqrt(expected))


def calm_level_rps(count: int, peaks: np.ndarray, windows_s: tuple[float, ...], rounds: int = 3) -> float:
    """The minute's level with its largest burst taken out: `count` arrivals in `LEVEL_WINDOW_S`,
    less the largest excess of any window over the level (a few fixed-point rounds, since the level
    the excess is measured from includes the burst).

    Why: the ratio was measured against, and applied to, the minute's level, which includes the
    burst. A 5 s burst of 120 requests over 3 req/s read as a level of 5, a ratio of 3.8 instead of
    6, and a plan of 3.8 x the calm level between bursts (too little: 1 replica where the burst needs
    2) and of 3.8 x 5 just after each burst (too late: a replica that arrives after the burst it
    was for), so the fleet swung between 1 and 5 replicas and missed every burst."""
    level = count / LEVEL_WINDOW_S
    for _ in range(rounds):
        extra = float(np.max(_excess(peaks, level, windows_s), initial=0.0))
        level = max(0.0, count - extra) / LEVEL_WINDOW_S
    return level
