"""Static peak provisioning: what most clusters do today, and the cost every autoscaler must beat.

Replicas are sized once for the peak of the whole trace (known in hindsight) and never change, so
this is the attainment to aim for and the cost ceiling.
"""

from __future__ import annotations

from optimizer.simulation.policy import Decision, Observation


class StaticPeakPolicy:
    def __init__(self, replicas: dict[str, int], name: str = "static-peak", interval_s: float = 60.0):
        if not replicas or any(n < 0 for n in replicas.values()):
            raise ValueError(f"static replicas must be a non-empty mapping of counts >= 0, got {replicas}")
        self.replicas = dict(replicas)
        self.name = name
        self.interval_s = interval_s

    def decide(self, observation: Observation) -> Decision:
        return Decision(desired_replicas=self.replicas, note="static")
