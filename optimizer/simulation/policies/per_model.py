"""One autoscaler per model, side by side on one fleet: what a cluster of per-model HPAs is.

Each member decides only its own model's variants; nothing coordinates them, so when their
scale-ups together exceed an accelerator type's inventory the cluster places them first come,
first served and the rest wait as pending pods (`optimizer.simulation.cluster`). The members
share the decision interval of the spec they came from.
"""

from __future__ import annotations

from collections.abc import Sequence

from optimizer.simulation.policy import Decision, Observation, Policy


class PerModelPolicies:
    def __init__(self, members: Sequence[Policy], name: str):
        if not members:
            raise ValueError("a per-model composite needs at least one member policy")
        intervals = {m.interval_s for m in members}
        if len(intervals) != 1:
            raise ValueError(f"the per-model members of {name} decide at different intervals: {sorted(intervals)}")
        self.members = list(members)
        self.name = name
        self.interval_s = intervals.pop()

    def decide(self, observation: Observation) -> Decision:
        desired: dict[str, int] = {}
        routing = []
        notes = []
        for member in self.members:
            d = member.decide(observation)
            overlap = desired.keys() & d.desired_replicas.keys()
            if overlap:
                raise ValueError(f"{member.name} and another member of {self.name} both scale {sorted(overlap)}")
            desired.update(d.desired_replicas)
            routing.extend(d.routing)
            if d.note:
                notes.append(f"{member.name}: {d.note}")
        return Decision(desired_replicas=desired, routing=routing, note="; ".join(notes))
