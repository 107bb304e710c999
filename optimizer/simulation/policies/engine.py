"""Ours: the decision engine every interval (capacity model + allocation), as an autoscaling policy.

Each interval it turns the observations into a `Problem` -- the fleet with its current replicas,
one `Workload` per model from `DemandEstimator` (planned rate and prompt-length buckets), the
SLOs, and the options that make it a policy: `service_level` (plan each replica for that share
of its SLO capacity: lower buys latency headroom at a cost, the knob that traces the latency-cost
front) and `change_penalty` ($/h charged per replica added or removed, which keeps the fleet
still when a change would save little). `optimizer.capacity.capacity_table` gives each (variant,
bucket) its capacity and `optimizer.allocation.allocate` the cheapest replicas and the routing
shares, which go to the weighted router as guidance.

The allocation is an end state; the way there goes through `optimizer.transition.plan_transition`,
the same planner the operator uses, so the simulated policy is the deployed one: scale-ups at
once within inventory, and make-before-break across the variants of a model (a variant the
allocation drops keeps serving until its replacements are ready), so swapping one accelerator
type for another never leaves a gap of a cold start.

Scale-down waits `scale_down_delay_s` on the demand side: the planned rate is the busiest
stretch of the last `scale_down_delay_s` seconds, so capacity follows a rise at the next interval
but a fall only once it has lasted, because a replica removed now and needed again in a minute
costs a cold start and the requests that arrive meanwhile. `scale_down_window_s` adds the HPA's
per-variant stabilization on top (off by default: holding each variant at its recent maximum
keeps both sides of every swap between near-equal alternatives, which cost more than it saved).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from optimizer.capacity import capacity_table
from optimizer.problem import Problem
from optimizer.simulation.demand import DEFAULT_INPUT_EDGES, DemandEstimator
from optimizer.simulation.policy import Decision, Observation, ReplicaState, RouteGuidance
from optimizer.transition import StabilizationHistory, TransitionPolicy, VariantState, plan_transition

MIN_PLANNED_RATE_RPS = 0.05
MEMO_SIZE = 256
"""Allocations remembered by (demand, current replicas): a steady cluster asks the same question."""
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
        scale_down_window_s: float = 0.0,
        lead_time_s: float = 60.0,
        input_edges: tuple[int, ...] = DEFAULT_INPUT_EDGES,
        rate_windows_s: tuple[float, ...] = (30.0, 60.0),
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
        self.estimators = {
            m: DemandEstimator(m, input_edges=input_edges, lead_time_s=lead_time_s, rate_windows_s=rate_windows_s,
                               rate_horizon_s=max(scale_down_delay_s, 2 * interval_s))
            for m in models
        }
        self._ranges = {
            label: bounds
            for est in self.estimators.values()
            for label, bounds in zip(est.labels, est.bounds, strict=True)
        }
        self.transition = TransitionPolicy(scale_up_window_s=0.0, scale_down_window_s=scale_down_window_s)
        self._stabilization = StabilizationHistory()
        self._memo: dict[tuple, object] = {}
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
        problem = self._problem(observation)
        key = (tuple(w.model_dump_json() for w in problem.workloads),
               tuple(v.current_replicas for v in problem.variants))
        allocation = self._memo.get(key)
        if allocation is None:
            capacity = {k: est.max_rate_rps for k, est in capacity_table(problem).items()}
            allocation = self.allocator(problem, capacity)
            if len(self._memo) >= MEMO_SIZE:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = allocation
        self.last_problem, self.last_allocation = problem, allocation
        desired = self._step(observation, problem, allocation)
        rate = sum(w.arrival_rate_rps for w in problem.workloads)
        return Decision(desired_replicas=desired, routing=self._guidance(allocation),
                        note=f"planned {rate:.2f} req/s, ${allocation.cost_per_hour:.2f}/h")

    def _step(self, observation: Observation, problem: Problem, allocation) -> dict[str, int]:
        """This interval's replicas on the way to the allocation (make-before-break, inventory)."""
        states = []
        for v in problem.variants:
            live = observation.replicas_of(v.name, ReplicaState.STARTING, ReplicaState.READY)
            draining = observation.replicas_of(v.name, ReplicaState.DRAINING)
            ready = sum(1 for r in live if r.state is ReplicaState.READY)
            states.append(VariantState(
                name=v.name, group=v.model, accelerator=v.accelerator,
                accelerators_per_replica=v.accelerators_per_replica, current_replicas=len(live),
                ready_replicas=ready, pods=len(live) + len(draining),
                desired_replicas=int(allocation.replicas.get(v.name, 0)),
                min_replicas=v.min_replicas, max_replicas=v.max_replicas))
        inventory = {a.name: a.available for a in problem.accelerators}
        plan = plan_transition(states, inventory, self.transition, self._stabilization, observation.time_s)
        self._stabilization = plan.history
        return {step.name: step.target_replicas for step in plan.steps}

    def _guidance(self, allocation) -> list[RouteGuidance]:
        """Routing weights per (model, bucket, stage) as prompt-length rules for the weighted router."""
        grouped: dict[tuple[str, str, str], dict[str, float]] = {}
        for route in allocation.routing:
            if route.weight > 0:
                grouped.setdefault((route.model, route.bucket, route.stage), {})[route.variant] = route.weight
        rules = []
        for (model, bucket, stage), weights in grouped.items():
            lo, hi = self._ranges.get(bucket, (0, None))
            rules.append(RouteGuidance(model=model, min_input_tokens=lo, max_input_tokens=hi, stage=stage,
                                       weights=weights))
        return rules
