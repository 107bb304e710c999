"""Online correction of the capacity model from observed SLO misses, per variant.

The capacity model is a queueing approximation; on some mixes it is optimistic for a replica type
(measured: an 8B H100 replica rated 13 req/s collapsed at ~10 under the Azure trace at 4x while the
A100 replicas beside it met every target). What the cluster shows is the ground truth: how many of
the requests each variant finished missed their TTFT or ITL target (the share above the SLO bucket
of vLLM's latency histograms). So each variant carries a factor on its modelled capacity, a slow
multiplicative controller on its recent attainment:

* over the last `window_s`, with at least `min_requests` finished: attainment below `target`
  lowers the factor by `step_down` (floor `floor`), then waits `settle_s` (about a cold start)
  and judges only requests finished after the step; attainment at or above `recover_at` raises it
  by `step_up` (never above 1, so the model's optimism is corrected but its pessimism is not
  traded away for SLO misses);
* between the two it holds, which is what keeps it from oscillating;
* an interval in which a variant served more than its modelled capacity (replicas x capacity per
  replica, at the current factor) does not count: misses under overload are the plan's or the
  traffic's doing (a cold start under load, a burst), not the model's, and learning from them
  would over-provision for the rest of the run.

It only ever learns from requests the variant really served, so a variant the plan does not use
keeps its modelled capacity. Factors sit on a 2 % grid so plans (and caches) stay stable.
"""

from __future__ import annotations

import math
from collections import deque

FACTOR_GRID = 0.02


class CapacityCorrection:
    def __init__(self, *, target: float = 0.98, recover_at: float = 0.995, window_s: float = 300.0,
                 min_requests: int = 100, step_down: float = 0.85, step_up: float = 1.02, floor: float = 0.5,
                 settle_s: float = 90.0):
        if not 0 < target <= recover_at <= 1 or not 0 < floor <= 1 or not 0 < step_down < 1 <= step_up:
            raise ValueError("need 0 < target <= recover_at <= 1, 0 < floor <= 1, step_down < 1 <= step_up")
        self.target, self.recover_at, self.window_s = target, recover_at, window_s
        self.min_requests, self.step_down, self.step_up, self.floor = min_requests, step_down, step_up, floor
        self._seen: dict[str, tuple[int, int]] = {}  # replica -> (finished, misses) counters last seen
        self._recent: dict[str, deque[tuple[float, int, int]]] = {}  # variant -> (time, finished, missed)
        self._factor: dict[str, float] = {}
        self._settle_until: dict[str, float] = {}
        self.settle_s = settle_s

    def observe(self, now: float, interval_s: float, replicas,
                capacity_rps: dict[str, float] | None = None) -> None:
        """`replicas`: objects with name, variant, state and cumulative `finished` / `slo_misses`
        counters; `capacity_rps`: per variant, what one replica sustains at the SLO for the current
        mix (with the factor applied). Without it no interval counts as overloaded."""
        delta: dict[str, list[int]] = {}
        serving: dict[str, int] = {}
        for r in replicas:
            if getattr(r, "state", "ready") != "starting":
                serving[r.variant] = serving.get(r.variant, 0) + 1
            before = self._seen.get(r.name, (0, 0))
            done, missed = r.finished - before[0], r.slo_misses - before[1]
            self._seen[r.name] = (r.finished, r.slo_misses)
            if done > 0:
                d = delta.setdefault(r.variant, [0, 0])
                d[0] += done
                d[1] += max(0, missed)
        for variant, (done, missed) in delta.items():
            if capacity_rps is not None:
                modelled = serving.get(variant, 0) * capacity_rps.get(variant, 0.0) * interval_s
                if modelled <= 0 or done > modelled:
                    continue
            self._recent.setdefault(variant, deque()).append((now, done, missed))
        for variant, recent in self._recent.items():
            while recent and recent[0][0] <= now - self.window_s:
                recent.popleft()
            done = sum(d for _, d, _ in recent)
            if done < self.min_requests or now < self._settle_until.get(variant, -1.0):
                continue
            attainment = 1 - sum(m for _, _, m in recent) / done
            factor = self._factor.get(variant, 1.0)
            if attainment < self.target:
                factor = max(self.floor, factor * self.step_down)
                recent.clear()  # judge the new factor on new requests only, once replicas it adds are up
                self._settle_until[variant] = now + self.settle_s
            elif attainment >= self.recover_at:
                factor = min(1.0, factor * self.step_up)
            self._factor[variant] = factor

    def factor(self, variant: str) -> float:
        f = self._factor.get(variant, 1.0)
        return min(1.0, math.floor(f / FACTOR_GRID + 1e-9) * FACTOR_GRID) if f < 1.0 else 1.0

    def factors(self) -> dict[str, float]:
        return {v: self.factor(v) for v in self._factor if self.factor(v) < 1.0}
