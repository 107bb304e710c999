"""Several models on one fleet: scenario forms, shared inventory (first come, first served, pending
pods), per-model accounting, per-model baselines tuned alone then run together, and the verdict."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from variant_autoscaler.cli import main

from optimizer.fleet import Accelerator, ModelSpec, Variant
from optimizer.problem import InputError, Problem
from optimizer.profile import ParametricProfile
from optimizer.simulation.cluster import ClusterOptions, ColdStart, simulate
from optimizer.simulation.evaluation import (
    ATTAINMENT_TARGET,
    best_homogeneous_hpa,
    build_policy,
    compare,
    pick_tuned,
)
from optimizer.simulation.generators import FluctuatingArrivals, GeneratedTrace, arrival_times
from optimizer.simulation.metrics import ModelMetrics, Percentiles, summarize
from optimizer.simulation.policies.per_model import PerModelPolicies
from optimizer.simulation.policies.static_peak import StaticPeakPolicy
from optimizer.simulation.policy import Decision
from optimizer.simulation.routers import make_router
from optimizer.simulation.scenario import Scenario, load_scenario, prepare
from optimizer.simulation.traces import Trace
from optimizer.simulation.verdict import compare_runs, verdict
from optimizer.workload import SLO

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "examples" / "fleet.yaml"
PROFILE = ParametricProfile(decode_base_s=0.01, decode_per_seq_s=2e-4, decode_per_kv_token_s=1e-8,
                            prefill_base_s=0.01, prefill_per_token_s=5e-5)


def two_model_fleet(gpus: int) -> Problem:
    return Problem(
        accelerators=[Accelerator(name="gpu", memory_gb=80, cost_per_hour=2.0, available=gpus)],
        models=[ModelSpec(name="a", weight_gb=16.0, kv_bytes_per_token=131072.0),
                ModelSpec(name="b", weight_gb=16.0, kv_bytes_per_token=131072.0)],
        variants=[Variant(name="va", model="a", accelerator="gpu", max_batch=32, profile=PROFILE),
                  Variant(name="vb", model="b", accelerator="gpu", max_batch=32, profile=PROFILE)],
        slos=[SLO(model="a", ttft_s=1.0, itl_s=0.1), SLO(model="b", ttft_s=1.0, itl_s=0.1)],
    )


def poisson(model: str, rate: float, duration: float, seed: int) -> Trace:
    return GeneratedTrace(arrivals={"kind": "poisson", "rate_rps": rate}, duration_s=duration, seed=seed,
                          model=model).build()


class Asks:
    """A policy that asks for fixed replicas of one variant from a given time on (an input, not a mock)."""

    def __init__(self, variant: str, schedule: list[tuple[float, int]], name: str):
        self.variant, self.schedule, self.name, self.interval_s = variant, schedule, name, 10.0

    def decide(self, observation):
        n = next(n for t, n in reversed(self.schedule) if observation.time_s >= t)
        return Decision(desired_replicas={self.variant: n})


def in_use(result, accelerator: str) -> int:
    """Most accelerators of one type billed at the same moment, from the ledger's intervals."""
    events = []
    for life in result.ledger.lives.values():
        if life.accelerator == accelerator:
            events.append((life.requested_s, life.accelerators))
            if life.removed_s is not None:
                events.append((life.removed_s, -life.accelerators))
    peak = level = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        level += delta
        peak = max(peak, level)
    return peak


def test_scenario_takes_one_form_or_the_other():
    trace = {"source": "generated", "duration_s": 60, "arrivals": {"kind": "poisson", "rate_rps": 1}}
    both = {"fleet": "f.yaml", "model": "a", "trace": trace, "models": [{"model": "b", "trace": trace}],
            "policies": [{"kind": "ours"}]}
    with pytest.raises(ValueError, match="either `models`"):
        Scenario.model_validate(both)
    with pytest.raises(ValueError, match="needs `model` and `trace`"):
        Scenario.model_validate({"fleet": "f.yaml", "policies": [{"kind": "ours"}]})
    twice = {"fleet": "f.yaml", "models": [{"model": "a", "trace": trace}, {"model": "a", "trace": trace}],
             "policies": [{"kind": "ours"}]}
    with pytest.raises(ValueError, match="listed twice"):
        Scenario.model_validate(twice)
    multi = Scenario.model_validate({**twice, "models": [{"model": "a", "trace": trace},
                                                         {"model": "b", "trace": trace}]})
    assert multi.multi_model and multi.model_names == ["a", "b"]


def test_unknown_model_in_models_names_its_field(tmp_path):
    trace = {"source": "generated", "duration_s": 60, "arrivals": {"kind": "poisson", "rate_rps": 1}}
    doc = {"fleet": str(FLEET), "models": [{"model": "Llama-3.1-8B", "trace": trace},
                                           {"model": "nope", "trace": trace}], "policies": [{"kind": "ours"}]}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    scenario, base = load_scenario(path)
    with pytest.raises(InputError) as err:
        prepare(scenario, base, source=str(path))
    assert err.value.field == "models[1].model"


def test_shared_inventory_first_come_first_served_and_pending_is_counted():
    fleet = two_model_fleet(gpus=3)
    trace = Trace.merge([poisson("a", 2.0, 400, 1), poisson("b", 2.0, 400, 2)])
    # a holds 2 of 3 GPUs; b asks for 2 at t=50 (gets 1, waits for the other); a asks for 3 at t=100
    # and then falls back to 1 at t=200: the GPUs a frees go to b, which was short first.
    policy = PerModelPolicies([Asks("va", [(0, 2), (100, 3), (200, 1)], "a"),
                               Asks("vb", [(0, 1), (50, 2)], "b")], name="both")
    result = simulate(fleet, trace, policy, make_router("least-outstanding"),
                      ClusterOptions(cold_start=ColdStart(base_s=5.0, load_gb_per_s=100.0)))
    assert in_use(result, "gpu") <= 3
    t = np.asarray(result.timeline_s)
    pending_b = np.asarray(result.pending_timeline["vb"])
    pending_a = np.asarray(result.pending_timeline["va"])
    assert pending_b[(t >= 50) & (t < 200)].min() == 1, "b waits for its second GPU while a holds two"
    # a's replicas drain their last requests (still holding their GPUs) for under one tick
    assert pending_b[t >= 210].max() == 0, "b gets the GPU a frees, before anyone else"
    assert pending_a[(t >= 100) & (t < 200)].min() == 1, "a's third replica never fits"
    slos = {s.model: s for s in fleet.slos}
    metrics = summarize(result, slos)
    by_model = {m.model: m for m in metrics.per_model}
    assert by_model["b"].unmet_s == pytest.approx(155.0, abs=10.0)
    assert by_model["b"].pending_replica_s == pytest.approx(155.0, abs=10.0)
    assert metrics.pending_replica_s == pytest.approx(by_model["a"].pending_replica_s + by_model["b"].pending_replica_s)
    assert sum(m.requests for m in metrics.per_model) == metrics.requests
    assert sum(m.cost for m in metrics.per_model) == pytest.approx(metrics.cost)
    assert sum(m.replica_changes for m in metrics.per_model) == metrics.replica_changes


def test_per_model_composite_refuses_overlap_and_mixed_intervals():
    with pytest.raises(ValueError, match="different intervals"):
        PerModelPolicies([StaticPeakPolicy({"va": 1}, interval_s=10), StaticPeakPolicy({"vb": 1}, interval_s=20)],
                         name="x")
    both = PerModelPolicies([StaticPeakPolicy({"va": 1}, name="p"), StaticPeakPolicy({"va": 2}, name="q")], name="x")
    with pytest.raises(ValueError, match="both scale"):
        both.decide(None)


SCENARIO = """
name: two models, few H100 and A100
fleet: {fleet}
models:
  - model: Llama-3.1-8B
    slo: {{model: Llama-3.1-8B, ttft_s: 1.5, itl_s: 0.1, percentile: 95}}
    trace: {{source: generated, duration_s: 360, seed: 3, arrivals: {{kind: poisson, rate_rps: 6.0}}}}
  - model: Qwen2.5-32B
    slo: {{model: Qwen2.5-32B, ttft_s: 1.5, itl_s: 0.075, percentile: 95}}
    trace: {{source: generated, duration_s: 360, seed: 4,
             arrivals: {{kind: step, times_s: [0, 150], rates_rps: [1.5, 4.0]}}}}
cluster: {{warmup_s: 60}}
policies:
  - kind: static-peak
  - kind: hpa
    target_fractions: [0.8, 1.0]
  - kind: wva
  - kind: ours
    service_level: 1.0
pareto: null
"""


@pytest.fixture(scope="module")
def two_model_comparison(tmp_path_factory):
    doc = yaml.safe_load(SCENARIO.format(fleet=FLEET))
    fleet = yaml.safe_load(FLEET.read_text())
    for acc in fleet["accelerators"]:
        if acc["name"] in ("H100", "A100-80G"):
            acc["available"] = {"H100": 2, "A100-80G": 4}[acc["name"]]
    folder = tmp_path_factory.mktemp("multi")
    (folder / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    doc["fleet"] = "fleet.yaml"
    (folder / "s.yaml").write_text(yaml.safe_dump(doc))
    scenario, base = load_scenario(folder / "s.yaml")
    return folder, compare(prepare(scenario, base), jobs=2)


def test_hpas_are_tuned_per_model_alone_then_run_together(two_model_comparison):
    _, comparison = two_model_comparison
    tuning = comparison.tuning
    assert {o.plan.model for o in tuning} == {"Llama-3.1-8B", "Qwen2.5-32B"}
    for o in tuning:
        assert o.metrics.per_model == [], "a tuning run replays its model alone"
        assert {v for v, _ in o.timeline.items()} <= {v.name for v in comparison.prepared.variants_of(o.plan.model)}
    combined = best_homogeneous_hpa(comparison)
    assert combined.plan.role == "combined"
    for model, variant, fraction in combined.plan.choices:
        best = pick_tuned([o for o in tuning if o.plan.model == model])
        assert (best.plan.variant, best.plan.target_fraction) == (variant, fraction)
    assert {m.model for m in combined.metrics.per_model} == {"Llama-3.1-8B", "Qwen2.5-32B"}


def test_no_run_exceeds_the_inventory_and_every_request_is_accounted(two_model_comparison):
    _, comparison = two_model_comparison
    for o in comparison.outcomes:
        m = o.metrics
        assert sum(x.requests for x in m.per_model) == m.requests
        assert sum(x.cost for x in m.per_model) == pytest.approx(m.cost, rel=1e-9)
        assert sum(x.dropped for x in m.per_model) == m.dropped
        for acc, hours in m.accelerator_hours.items():
            assert hours == pytest.approx(sum(x.accelerator_hours.get(acc, 0.0) for x in m.per_model))


def test_cluster_never_bills_more_accelerators_than_exist(two_model_comparison):
    folder, comparison = two_model_comparison
    prep = comparison.prepared
    for o in comparison.outcomes:
        result = simulate(prep.problem, prep.trace, build_policy(prep, o.plan), make_router(o.plan.spec.router),
                          prep.scenario.cluster)
        for acc in prep.problem.accelerators:
            if acc.available is not None:
                assert in_use(result, acc.name) <= acc.available, (o.plan.label, acc.name)


def test_simulate_prints_per_model_rows_and_an_honest_verdict(two_model_comparison, capsys):
    folder, comparison = two_model_comparison
    assert main(["simulate", str(folder / "s.yaml"), "-o", str(folder / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "per model" in out and "HPA tuning" in out and "hpa (per-model best)" in out
    v = verdict(comparison)
    assert v.lines and v.baseline in ("hpa (per-model best)", "hpa (best fit to inventory)")
    capped = [o.plan.label for o in comparison.outcomes
              if o.metrics.pending_replica_s > 0 and o.plan.label != v.baseline]
    assert capped, "2 H100 and 4 A100 for two models: some baseline must run out of them"
    warning = next(line for line in v.lines if line.startswith("warning: the inventory capped"))
    assert all(label in warning for label in capped)
    assert all(" -" not in line.split("costs")[-1][:3] for line in v.lines if "costs" in line)
    summary = yaml.safe_load((folder / "r" / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["Llama-3.1-8B", "Qwen2.5-32B"]
    assert summary["verdict"]["lines"] == v.lines
    assert (folder / "r" / "table.txt").read_text().count("Llama-3.1-8B") >= 2


def _share(attainment: float, cost: float) -> ModelMetrics:
    nan = Percentiles(p50=0.0, p90=0.0, p99=0.0)
    return ModelMetrics(model="m", requests=100, dropped=0, slo_attainment=attainment, ttft_s=nan, itl_s=nan,
                        e2e_s=nan, cost=cost, replica_changes=0, pending_replica_s=0.0, unmet_s=0.0,
                        accelerator_hours={})


@pytest.mark.parametrize(("ours", "base", "comparable", "phrase"), [
    ((0.995, 70.0), (0.992, 100.0), True, "costs 30.0 % less"),
    ((0.995, 130.0), (0.992, 100.0), True, "costs 30.0 % more"),
    ((0.97, 50.0), (0.995, 100.0), False, "ours misses the 99.00 % target"),
    ((0.995, 150.0), (0.95, 100.0), False, "HPA misses the 99.00 % target"),
    ((0.9, 50.0), (0.95, 100.0), False, "neither reaches"),
])
def test_verdict_compares_costs_only_at_the_target(ours, base, comparable, phrase):
    ok, line = compare_runs("ours", _share(*ours), "HPA", _share(*base), ATTAINMENT_TARGET)
    assert ok is comparable
    assert phrase in line
    assert "-" not in line.split("costs")[1][:3] if "costs" in line else True


def test_fluctuating_arrivals_look_like_the_azure_trace():
    cvs, lag1, means = [], [], []
    for seed in range(6):
        t = arrival_times(FluctuatingArrivals(mean_rps=5.5, amplitude=0.0), 3600, np.random.default_rng(seed))
        counts, _ = np.histogram(t, bins=np.arange(0, 3601, 60))
        cvs.append(counts.std() / counts.mean())
        logs = np.log(np.maximum(counts, 1))
        lag1.append(np.corrcoef(logs[:-1], logs[1:])[0, 1])
        means.append(len(t) / 3600)
    poisson_cv = 1 / np.sqrt(5.5 * 60)
    assert np.mean(means) == pytest.approx(5.5, rel=0.15)
    assert 0.12 < np.mean(cvs) < 0.32 and np.mean(cvs) > 2.5 * poisson_cv
    assert np.mean(lag1) > 0.6, "minute rates stay correlated, as in the trace"


def test_fluctuating_bursts_raise_the_five_second_peak():
    calm = FluctuatingArrivals(mean_rps=4.0, amplitude=0.0, log_sd=0.0)
    bursty = calm.model_copy(update={"bursts_per_hour": 60.0, "burst_s": 5.0, "burst_factor": 6.0})
    peaks = []
    for process in (calm, bursty):
        t = arrival_times(process, 1800, np.random.default_rng(7))
        counts, _ = np.histogram(t, bins=np.arange(0, 1801, 5))
        peaks.append(counts.max() / 5)
    assert peaks[1] > 2.5 * peaks[0]


def test_a_fleet_that_starves_one_model_is_not_at_target():
    from optimizer.simulation.evaluation import meets_target
    from optimizer.simulation.metrics import RunMetrics

    starved = RunMetrics.model_construct(slo_attainment=0.993, cost=40.0, per_model=[_share(0.999, 10.0),
                                                                                   _share(0.96, 30.0)])
    fine = RunMetrics.model_construct(slo_attainment=0.995, cost=50.0, per_model=[_share(0.999, 10.0),
                                                                                _share(0.991, 40.0)])
    assert not meets_target(starved) and meets_target(fine)
    ok, line = compare_runs("ours", fine, "HPAs", starved)
    assert not ok and "HPAs misses the 99.00 % target" in line and "m 96.00 %" in line
