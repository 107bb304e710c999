"""Ours (capacity model + allocation each interval) as a policy, alone and driving the cluster simulator."""

import numpy as np

from optimizer.capacity import capacity_table
from optimizer.fleet import Accelerator, ModelSpec, Variant
from optimizer.problem import Problem
from optimizer.profile import ParametricProfile
from optimizer.simulation.cluster import ClusterOptions, ClusterSimulator, ColdStart
from optimizer.simulation.generators import GeneratedTrace, StepArrivals
from optimizer.simulation.metrics import summarize
from optimizer.simulation.policies.engine import EnginePolicy
from optimizer.simulation.policy import ArrivalSample, CompletionSample, Observation
from optimizer.simulation.routers import WeightedRouter
from optimizer.workload import SLO

MODEL = "m"
FAST = ParametricProfile(decode_base_s=0.008, decode_per_seq_s=1e-4, decode_per_kv_token_s=5e-9,
                         prefill_base_s=0.008, prefill_per_token_s=2e-5)
SLOW = ParametricProfile(decode_base_s=0.03, decode_per_seq_s=4e-4, decode_per_kv_token_s=3e-8,
                         prefill_base_s=0.03, prefill_per_token_s=2e-4)


def fleet() -> Problem:
    return Problem(
        accelerators=[Accelerator(name="big", memory_gb=80, cost_per_hour=6.0, available=6),
                      Accelerator(name="small", memory_gb=24, cost_per_hour=1.0, available=20)],
        models=[ModelSpec(name=MODEL, weight_gb=16.0, kv_bytes_per_token=131072.0)],
        variants=[Variant(name="big", model=MODEL, accelerator="big", max_batch=128, profile=FAST),
                  Variant(name="small", model=MODEL, accelerator="small", max_batch=16, profile=SLOW)],
        slos=[SLO(model=MODEL, ttft_s=1.5, itl_s=0.08, percentile=95)],
    )


def arrivals(rate, t0, t1, rng, long_share=0.2):
    n = rng.poisson(rate * (t1 - t0))
    times = np.sort(rng.uniform(t0, t1, n)).tolist()
    ins = [3000 if rng.uniform() < long_share else 300 for _ in range(n)]
    return ArrivalSample(model=MODEL, times_s=times, input_tokens=ins)


def observe(policy, rate, rng, t=60.0):
    done = CompletionSample(model=MODEL, input_tokens=[300, 3000], output_tokens=[150, 200])
    obs = Observation(time_s=t, interval_s=60.0, arrivals=[arrivals(rate, t - 60.0, t, rng)], completions=[done])
    return policy.decide(obs)


def mix_capacity(problem, desired):
    caps = capacity_table(problem)
    w = problem.workloads[0]
    total = 0.0
    for v, n in desired.items():
        load = sum(b.share / caps[(v, b.label)].max_rate_rps for b in w.buckets if caps[(v, b.label)].max_rate_rps > 0)
        if all(caps[(v, b.label)].max_rate_rps > 0 for b in w.buckets):
            total += n / load
    return total


def test_engine_plans_enough_capacity_for_what_it_saw_and_more_for_more():
    costs = []
    for rate in (2.0, 8.0):
        policy = EnginePolicy(fleet(), service_level=0.9, change_penalty=0.0, input_edges=(1000,))
        decision = observe(policy, rate, np.random.default_rng(1))
        planned = policy.last_problem.workloads[0].arrival_rate_rps
        assert planned >= 0.9 * rate  # the envelope of what arrived, not less
        served = sum(r.rate_rps for r in policy.last_allocation.routing if r.stage == "PD")
        assert served >= 0.999 * planned
        assert sum(policy.last_allocation.unmet_demand_rps.values()) < 1e-6
        assert sum(decision.desired_replicas.values()) >= 1
        # Routing guidance covers both prompt-length buckets, weights summing to 1 per bucket.
        by_bucket = {}
        for rule in decision.routing:
            by_bucket[(rule.min_input_tokens, rule.max_input_tokens)] = sum(rule.weights.values())
        assert set(by_bucket) == {(0, 1000), (1000, None)}
        assert all(abs(v - 1.0) < 1e-6 for v in by_bucket.values())
        costs.append(sum(fleet().variant_cost_per_hour(v) * decision.desired_replicas[v.name]
                         for v in fleet().variants))
    assert costs[1] > costs[0]


def test_engine_in_the_cluster_follows_a_step_up_and_down():
    trace = GeneratedTrace(arrivals=StepArrivals(times_s=[0, 300, 600], rates_rps=[2.0, 20.0, 2.0]),
                           duration_s=1000.0, seed=3, model=MODEL).build()
    problem = fleet()
    policy = EnginePolicy(problem, service_level=0.8, change_penalty=0.5, interval_s=15.0,
                          scale_down_delay_s=120.0, lead_time_s=30.0)
    opts = ClusterOptions(cold_start=ColdStart(base_s=20.0, load_gb_per_s=4.0), warmup_s=60.0)
    result = ClusterSimulator(problem, trace, policy, WeightedRouter(), opts).run()
    assert np.all(np.isfinite(result.completion_s) ^ result.dropped)
    t = np.asarray(result.timeline_s)
    capacity = []
    for k in range(len(t)):
        counts = {v: result.timeline[v][k][0] for v in result.timeline}
        capacity.append(sum(problem.variant_cost_per_hour(v) * counts[v.name] for v in problem.variants))
    capacity = np.asarray(capacity)
    before = capacity[(t > 200) & (t < 300)].mean()
    during = capacity[(t > 450) & (t < 600)].mean()
    after = capacity[(t > 900)].mean()
    assert during > 1.5 * before
    assert after < during
    m = summarize(result, {MODEL: problem.slos[0]})
    assert m.dropped == 0
    # What no policy can save: requests of the 10x step that arrive before a replica requested at
    # the first tick after it can be ready (one interval plus a cold start); all the rest meet the SLO.
    unavoidable = ((trace.arrival_s >= 300) & (trace.arrival_s < 300 + 15.0 + opts.cold_start.seconds("big", 16.0))).sum()
    assert m.slo_attainment > 1 - unavoidable / m.requests - 0.02
