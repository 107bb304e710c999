"""What a run costs: every replica is billed per second from the moment it is requested.

A cloud bills an accelerator from the moment it is provisioned, not from the moment the model has
loaded, and keeps billing a replica that drains its last requests. So each replica's bill runs from
its scale-up decision (cold start included) to the moment it leaves, and the ledger keeps the
cold-start share separately to show what slow starts cost.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReplicaLife:
    """One replica's billing record; times in simulated seconds."""

    replica_id: str
    variant: str
    accelerator: str
    accelerators: int
    cost_per_hour: float
    """Price of the whole replica (all its accelerators) for one hour."""
    requested_s: float
    ready_s: float | None = None
    removed_s: float | None = None

    def billed_s(self, end_s: float) -> float:
        stop = end_s if self.removed_s is None else min(self.removed_s, end_s)
        return max(0.0, stop - self.requested_s)

    def cold_start_s(self, end_s: float) -> float:
        ready = end_s if self.ready_s is None else self.ready_s
        stop = end_s if self.removed_s is None else self.removed_s
        return max(0.0, min(ready, stop, end_s) - self.requested_s)


class CostLedger:
    """Billing records of all replicas of one run."""

    def __init__(self):
        self.lives: dict[str, ReplicaLife] = {}

    def open(self, replica_id: str, variant: str, accelerator: str, accelerators: int,
             cost_per_hour: float, requested_s: float, ready_s: float | None = None) -> ReplicaLife:
        if replica_id in self.lives:
            raise ValueError(f"replica {replica_id} is already billed")
        life = ReplicaLife(replica_id, variant, accelerator, accelerators, cost_per_hour, requested_s, ready_s)
        self.lives[replica_id] = life
        return life

    def ready(self, replica_id: str, t: float) -> None:
        self.lives[replica_id].ready_s = t

    def close(self, replica_id: str, t: float) -> None:
        life = self.lives[replica_id]
        if life.removed_s is not None:
            raise ValueError(f"replica {replica_id} already left at {life.removed_s}")
        life.removed_s = max(t, life.requested_s)

    def cost(self, end_s: float) -> float:
        return sum(life.billed_s(end_s) * life.cost_per_hour for life in self.lives.values()) / 3600.0

    def cold_start_cost(self, end_s: float) -> float:
        return sum(life.cold_start_s(end_s) * life.cost_per_hour for life in self.lives.values()) / 3600.0

    def cost_by_variant(self, end_s: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for life in self.lives.values():
            out[life.variant] = out.get(life.variant, 0.0) + life.billed_s(end_s) * life.cost_per_hour / 3600.0
        return out

    def accelerator_hours(self, end_s: float) -> dict[str, float]:
        """Accelerator-hours per accelerator type (a TP-4 replica for one hour counts 4)."""
        out: dict[str, float] = {}
        for life in self.lives.values():
            out[life.accelerator] = out.get(life.accelerator, 0.0) + life.billed_s(end_s) * life.accelerators / 3600.0
        return out
