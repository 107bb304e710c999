"""Ours: the decision engine every interval (capacity model + allocation), as an autoscaling policy.

Each interval it turns the observations into a `Problem` -- the fleet with its current replicas,
one `Workload` per model from `DemandEstimator` (planned rate and prompt-length buckets), the
SLOs, and the options that make it a policy: `service_level` (plan each replica for that share
of its SLO capacity: lower buys latency headroom at a cost, the knob that traces the latency-cost
front) and `change_penalty` ($/h charged per replica added or removed, which keeps the fleet
still when a change would save little). `optimizer.capacity.capacity_table` gives each (variant,
bucket) its capacity and `optimizer.allocation.allocate` the cheapest replicas and the routing
shares, which go to the weighted router as guidance.

Scale-down waits `scale_down_delay_s`: a variant keeps the highest count the engine wanted over
that time, because a replica removed now and needed again in a minute costs a cold start and
the requests that arrive meanwhile.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from optimizer.problem import Problem
from optimizer.simulation.demand import DEFAULT_INPUT_EDGES, DemandEstimator
from optimizer.simulation.policy import Decision, Observation, RouteGuidance

MIN_PLANNED_RATE_RPS = 0.05
"""Demand floor: keeps one replica of a model that saw no traffic recently (no scale to zero)."""


def _default_allocator(problem: Problem, capacity: Mapping[tuple[str, str], float]):
    from optimizer.allocation import allocate

    return allocate(problem, capacity)


class EnginePolicy:
    def __init__(
        self,
        problem: Problem,
        *,
        service_level: float = 0.85,
        change_penalty: float = 0.5,
        interval_s: float = 30.0,
        scale_down_delay_s: float = 120.0,
        lead_time_s: float = 60.0,
        input_edges: tuple[int, ...] = DEFAULT_INPUT_EDGES,
        allocator: Callable | None = None,
        name: str = "ours",
    ):
        if not 0 < service_level <= 1:
            raise ValueError(f"service_level must be in (0, 1], got {service_level}")
        self.base = problem
        self.service_level = service_level
        self.change_penalty = change_penalty
        self.interval_s = interval_s
        self.scale_down_delay_s = scale_down_delay_s
        self.name = name
        self.allocator = allocator or _default_allocator
        models = [s.model for s in problem.slos]
        self.estimators = {m: DemandEstimator(m, input_edges=input_edges, lead_time_s=lead_time_s) for m in models}
        self._ranges = {
            label: bounds
            for est in self.estimators.values()
            for label, bounds in zip(est.labels, est.bounds, strict=True)
        }
        self._history: deque[tuple[float, dict[str, int]]] = deque()
        self.last_problem: Problem | None = None
        self.last_allocation = None

    def _problem(self, observation: Observation) -> Problem:
        now = observation.time_s
        workloads = []
        for est in self.estimators.values():
            est.observe(observation)
            w = est.workload(now)
            if w.arrival_rate_rps < MIN_PLANNED_RATE_RPS:
                w = w.model_copy(update={"arrival_rate_rps": MIN_PLANNED_RATE_RPS})
            workloads.append(w)
        variants = [v.model_copy(update={"current_replicas": observation.replica_count(v.name)})
                    for v in self.base.variants]
        options = self.base.options.model_copy(update={
            "service_level": self.service_level, "change_penalty_per_replica": self.change_penalty})
        return Problem(accelerators=self.base.accelerators, models=self.base.models, variants=variants,
                       workloads=workloads, slos=self.base.slos, options=options)

    def decide(self, observation: Observation) -> Decision:
        from optimizer.capacity import capacity_table

        problem = self._problem(observation)
        capacity = {key: est.max_rate_rps for key, est in capacity_table(problem).items()}
        allocation = self.allocator(problem, capacity)
        self.last_problem, self.last_allocation = problem, allocation
        wanted = {v.name: int(allocation.replicas.get(v.name, 0)) for v in problem.variants}

        now = observation.time_s
        self._history.append((now, wanted))
        while self._history and self._history[0][0] < now - self.scale_down_delay_s:
            self._history.popleft()
        desired = {v: max(h.get(v, 0) for _, h in self._history) for v in wanted}
        rate = sum(w.arrival_rate_rps for w in problem.workloads)
        return Decision(desired_replicas=desired, routing=self._guidance(allocation),
                        note=f"planned {rate:.2f} req/s, ${allocation.cost_per_hour:.2f}/h")

    def _guidance(self, allocation) -> list[RouteGuidance]:
        rules = []
        for route in allocation.routes():
            lo, hi = self._ranges.get(route.bucket, (0, None))
            rules.append(RouteGuidance(model=route.model, min_input_tokens=lo, max_input_tokens=hi,
                                       stage=route.stage, weights=route.weights))
        return rules
