"""InferLine-style autoscaling: plan for the traffic envelope, measured replica throughput.

As in the Vidur autoscaling lab's version of InferLine's tuner:

* a traffic envelope of *token* arrivals (prompt tokens plus the mean output length seen in
  recent completions) over window sizes doubling from `base_window_s` up to 60 s, updated in O(1)
  amortized time per arrival, read over the last `horizon_s` seconds;
* a replica's token throughput as an exponential moving average of what its busy time produced
  (tokens processed per busy second, from the replicas' counters), sampled only from replicas
  that had requests waiting, i.e. ran the largest batch they could: under continuous batching a
  lightly loaded replica is busy all the time at a small batch, and counting it would read a low
  throughput, plan more replicas, lighten the load further and run away to the replica limit
  (the first version here did exactly that); until a saturated sample arrives the estimate is
  the replica's throughput at its SLO capacity from the capacity model;
* target replicas = max token arrival rate over the windows / replica token throughput.

It runs one variant (InferLine plans one hardware type per model stage).
"""

from __future__ import annotations

import math

from optimizer.simulation.envelope import TrafficEnvelope, doubling_windows
from optimizer.simulation.policy import Decision, Observation, ReplicaState


class InferLinePolicy:
    def __init__(
        self,
        variant: str,
        model: str,
        *,
        initial_throughput_tps: float,
        base_window_s: float = 2.0,
        horizon_s: float = 60.0,
        ema_alpha: float = 0.3,
        interval_s: float = 15.0,
        min_replicas: int = 1,
        max_replicas: int | None = None,
        name: str | None = None,
    ):
        if initial_throughput_tps <= 0:
            raise ValueError("initial_throughput_tps must be > 0")
        self.variant = variant
        self.model = model
        self.interval_s = interval_s
        self.ema_alpha = ema_alpha
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.name = name or f"inferline[{variant}]"
        self.throughput_tps = initial_throughput_tps
        self.envelope = TrafficEnvelope(doubling_windows(base_window_s), horizon_s=horizon_s)
        self._mean_output = None
        self._counters: dict[str, tuple[float, int]] = {}

    def _update_throughput(self, observation: Observation) -> None:
        busy, tokens = 0.0, 0
        seen = {}
        for r in observation.replicas_of(self.variant, ReplicaState.READY, ReplicaState.DRAINING):
            prev = self._counters.get(r.name)
            seen[r.name] = (r.busy_s, r.tokens)
            if prev is None or r.queue_len == 0:
                continue
            busy += r.busy_s - prev[0]
            tokens += r.tokens - prev[1]
        self._counters = seen
        if busy > 0.25 * self.interval_s and tokens > 0:
            sample = tokens / busy
            self.throughput_tps += self.ema_alpha * (sample - self.throughput_tps)

    def decide(self, observation: Observation) -> Decision:
        done = observation.completions_of(self.model)
        if done.output_tokens:
            mean_out = sum(done.output_tokens) / len(done.output_tokens)
            self._mean_output = mean_out if self._mean_output is None else 0.8 * self._mean_output + 0.2 * mean_out
        arrivals = observation.arrivals_of(self.model)
        extra = self._mean_output or 0.0
        self.envelope.extend(arrivals.times_s, [n + extra for n in arrivals.input_tokens])
        self._update_throughput(observation)
        if self.envelope.count == 0:
            desired = max(self.min_replicas, observation.replica_count(self.variant))
        else:
            rate = self.envelope.max_rate(observation.time_s)
            desired = max(self.min_replicas, math.ceil(rate / self.throughput_tps - 1e-9))
        if self.max_replicas is not None:
            desired = min(desired, self.max_replicas)
        return Decision(desired_replicas={self.variant: desired},
                        note=f"throughput {self.throughput_tps:.0f} tok/s per replica")
