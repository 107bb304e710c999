"""InferLine's traffic envelope: the most arrivals (or tokens) seen in any window of each size.

InferLine plans capacity for the burstiest stretch of traffic at every time scale, not for the
mean: for window sizes doubling from about one service time up to 60 s it records the largest
number of arrivals inside any window of that size. A policy compares that envelope with what the
replicas can absorb. Weights make the same structure count tokens instead of requests.

Definition used throughout (and by the brute-force test): the load of the window ending at arrival
i is the total weight of arrivals j with t_i - size < t_j <= t_i. `peaks()` is the maximum of that
load over all arrivals so far; `peaks(now)` over the arrivals of the last `horizon_s` seconds
(t_i > now - horizon_s), which is what an online policy wants after traffic has calmed down.

Updates are O(1) amortized per window size: each window keeps a pointer to its oldest arrival and a
running sum (two-pointer sliding window), and a monotone deque of window loads gives the maximum
over the horizon (each load enters and leaves the deque once). `extend` is the vectorized
equivalent of calling `add` for every element of a sorted batch, for replaying million-request
traces in well under a second.
"""

from __future__ import annotations

from collections import deque

import numpy as np

MAX_WINDOW_S = 60.0


def doubling_windows(base_s: float = 1.0, max_s: float = MAX_WINDOW_S) -> tuple[float, ...]:
    """base, 2*base, 4*base, ... below max_s, then max_s itself (InferLine's window ladder)."""
    if base_s <= 0 or max_s < base_s:
        raise ValueError(f"need 0 < base_s <= max_s, got base_s={base_s}, max_s={max_s}")
    sizes, w = [], base_s
    for _ in range(64):
        if w >= max_s:
            break
        sizes.append(w)
        w *= 2
    sizes.append(max_s)
    return tuple(sizes)


class TrafficEnvelope:
    """Maximum load in any window of each size, over all time and over a recent horizon."""

    def __init__(self, window_sizes_s: tuple[float, ...] | None = None, horizon_s: float | None = None):
        sizes = tuple(sorted(window_sizes_s or doubling_windows()))
        if not sizes or sizes[0] <= 0:
            raise ValueError(f"window sizes must be > 0, got {sizes}")
        if horizon_s is not None and horizon_s <= 0:
            raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
        self.window_sizes_s = sizes
        self.horizon_s = horizon_s
        k = len(sizes)
        self._t: list[float] = []
        self._w: list[float] = []
        self._offset = 0
        self._head = [0] * k
        self._sum = [0.0] * k
        self._peak = [0.0] * k
        self._recent: list[deque] = [deque() for _ in range(k)]
        self._last_t = -np.inf
        self.count = 0

    def add(self, t: float, weight: float = 1.0) -> None:
        """Record one arrival at time t (not earlier than the previous one)."""
        if t < self._last_t:
            raise ValueError(f"arrivals must come in time order: {t} after {self._last_t}")
        self._last_t = t
        self.count += 1
        self._t.append(t)
        self._w.append(weight)
        times, weights, off = self._t, self._w, self._offset
        for k, size in enumerate(self.window_sizes_s):
            s = self._sum[k] + weight
            h = self._head[k]
            edge = t - size
            while times[h - off] <= edge:
                s -= weights[h - off]
                h += 1
            self._head[k], self._sum[k] = h, s
            if s > self._peak[k]:
                self._peak[k] = s
            if self.horizon_s is not None:
                recent = self._recent[k]
                while recent and recent[-1][1] <= s:
                    recent.pop()
                recent.append((t, s))
        self._compact()

    def extend(self, times, weights=None) -> None:
        """Record a sorted batch of arrivals; same result as `add` on each, vectorized."""
        t_new = np.asarray(times, dtype=float)
        if t_new.size == 0:
            return
        w_new = np.ones_like(t_new) if weights is None else np.asarray(weights, dtype=float)
        if w_new.shape != t_new.shape:
            raise ValueError("times and weights must have the same length")
        if t_new[0] < self._last_t or np.any(np.diff(t_new) < 0):
            raise ValueError("arrivals must come in time order")
        start = self._head[-1] - self._offset
        t_all = np.concatenate([np.asarray(self._t[start:], dtype=float), t_new])
        w_all = np.concatenate([np.asarray(self._w[start:], dtype=float), w_new])
        n_old = len(t_all) - len(t_new)
        csum = np.concatenate([[0.0], np.cumsum(w_all)])
        base = self._head[-1]
        for k, size in enumerate(self.window_sizes_s):
            lo = np.searchsorted(t_all, t_new - size, side="right")
            lo = np.maximum(lo, self._head[k] - base)
            loads = csum[n_old + 1 + np.arange(len(t_new))] - csum[lo]
            self._head[k] = base + int(lo[-1])
            self._sum[k] = float(loads[-1])
            self._peak[k] = max(self._peak[k], float(loads.max()))
            if self.horizon_s is not None:
                self._push_recent(k, t_new, loads)
        keep = self._head[-1] - base
        self._t = t_all[keep:].tolist()
        self._w = w_all[keep:].tolist()
        self._offset = base + keep
        self._last_t = float(t_new[-1])
        self.count += len(t_new)
        self._compact()

    def _push_recent(self, k: int, t_new: np.ndarray, loads: np.ndarray) -> None:
        later_max = np.maximum.accumulate(loads[::-1])[::-1]
        survives = np.empty(len(loads), dtype=bool)
        survives[-1] = True
        survives[:-1] = loads[:-1] > later_max[1:]
        recent = self._recent[k]
        top = later_max[0]
        while recent and recent[-1][1] <= top:
            recent.pop()
        recent.extend(zip(t_new[survives].tolist(), loads[survives].tolist(), strict=True))

    def _compact(self) -> None:
        drop = self._head[-1] - self._offset
        if drop > 1024 and drop * 2 > len(self._t):
            del self._t[:drop]
            del self._w[:drop]
            self._offset += drop

    def peaks(self, now: float | None = None) -> np.ndarray:
        """Largest window load per window size: over all arrivals, or those after now - horizon_s."""
        if now is None:
            return np.asarray(self._peak)
        if self.horizon_s is None:
            raise ValueError("peaks(now) needs an envelope built with horizon_s")
        edge = now - self.horizon_s
        out = np.zeros(len(self.window_sizes_s))
        for k, recent in enumerate(self._recent):
            while recent and recent[0][0] <= edge:
                recent.popleft()
            if recent:
                out[k] = recent[0][1]
        return out

    def max_rate(self, now: float | None = None) -> float:
        """The highest load per second over all window sizes (requests/s, or tokens/s with weights)."""
        return float(np.max(self.peaks(now) / np.asarray(self.window_sizes_s)))
