"""Headroom for bursts shorter than a decision interval, learned from the traffic's own burstiness.

A plan sized on minute rates misses what happens within seconds: code-completion traffic sends
~100 requests in 6 s between idle minutes, and no scale-up helps once the burst has begun (a cold
start lasts a minute or two). What a burst costs depends on how long it lasts: the requests that
arrive within a window of w seconds must all have started within w + `absorb_s` (the TTFT budget
lets a queue absorb the rest). The capacity model already sizes replicas for Poisson arrivals at
the level, so only the excess counts: arrivals in the window beyond level x w plus `POISSON_Z`
Poisson standard deviations, spread over w + `absorb_s`. Every interval this records, for windows
of 2 s up to 30 s, the largest such extra rate as a ratio to the minute's level; the allowance is
the level now times a high quantile of those ratios over the last `memory_s` seconds, so it
follows a daily swing in level while remembering how bursty the traffic is. Poisson-like traffic
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

from optimizer.simulation.envelope import TrafficEnvelope

BURST_WINDOWS_S = (2.0, 5.0, 10.0, 30.0)
POISSON_Z = 4.0
"""Arrivals above the level by less than this many Poisson standard deviations are not a burst:
the capacity model's queueing already covers Poisson fluctuation at the SLO percentile."""
LEVEL_WINDOW_S = 60.0


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
        self._recent: deque[float] = deque()
        self._ratios: deque[tuple[float, float]] = deque()
        self._since: float | None = None
        self.lead_time_s = lead_time_s
        self._history: deque[float] = deque()  # arrivals of the last lead time + one level window
        self._jumps: deque[tuple[float, float]] = deque()  # (time, growth ratio over a lead time)
        self._levels: deque[tuple[float, float]] = deque()  # (time, level)

    def observe(self, times_s, now: float) -> None:
        if self._since is None:
            self._since = now
        self.envelope.extend(times_s)
        self._recent.extend(times_s)
        while self._recent and self._recent[0] <= now - LEVEL_WINDOW_S:
            self._recent.popleft()
        level = self.level_rps()
        # The level needs a whole minute of watching: before that it reads low, and the first
        # minute's ratios (6x at the start of the default demo) would stay in the memory for 15 min.
        if level > 0 and now - self._since >= LEVEL_WINDOW_S:
            w = np.asarray(self.windows_s)
            expected = level * w
            excess = np.maximum(self.envelope.peaks(now) - expected - POISSON_Z * np.sqrt(expected), 0.0)
            self._ratios.append((now, 1.0 + float(np.max(excess / (w + self.absorb_s))) / level))
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
        return len(self._recent) / LEVEL_WINDOW_S

    def ratio(self) -> float:
        """The burst factor over the level that the plan covers (1 when bursts are not larger)."""
        if not self._ratios:
            return 1.0
        return max(1.0, float(np.quantile([r for _, r in self._ratios], self.quantile)))

    def jump_rate_rps(self) -> float:
        """Traffic that has jumped faster than a cold start: the level times the largest jump seen,
        never above the highest level of the memory (a burst is not planned on top of the burst it is)."""
        if not self._jumps:
            return 0.0
        growth = max(g for _, g in self._jumps)
        highest = max(x for _, x in self._levels)
        return min(self.level_rps() * growth, highest)

    def rate_rps(self) -> float:
        return max(self.level_rps() * self.ratio(), self.jump_rate_rps())
