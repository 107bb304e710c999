"""The rate to plan for (optimizer.planned_rate): the simulator's `ours` and the operator share it."""

import numpy as np
import pytest

from optimizer.planned_rate import PlannedRate

LEAD_S, INTERVAL_S = 60.0, 15.0


def feed(planned: PlannedRate, rates, seed: int = 0) -> list[float]:
    """Poisson counts at each rate, one interval each; the plan after every one."""
    rng = np.random.default_rng(seed)
    plans = []
    for i, rate in enumerate(rates):
        end = (i + 1) * INTERVAL_S
        planned.observe(end, int(rng.poisson(rate * INTERVAL_S)), INTERVAL_S)
        plans.append(planned.rate_rps(end))
    return plans


def test_steady_traffic_is_planned_at_about_its_rate():
    plans = feed(PlannedRate(LEAD_S, INTERVAL_S), [8.0] * 120)
    assert 7.2 < np.median(plans[40:]) < 9.2


def test_a_steady_rise_is_planned_ahead_of_the_rate_now():
    rates = np.linspace(4.0, 16.0, 80)  # +0.6 req/s per minute
    plans = feed(PlannedRate(LEAD_S, INTERVAL_S), rates)
    ahead = np.array(plans[30:]) / rates[30:]
    assert np.median(ahead) > 1.02  # it covers the rate one lead time on, not the rate now


def test_the_error_record_adds_headroom_only_when_the_traffic_strays():
    rng = np.random.default_rng(3)
    wandering = 8.0 * np.exp(np.cumsum(rng.normal(0.0, 0.12, 160)))  # a random walk of the log rate
    with_band = feed(PlannedRate(LEAD_S, INTERVAL_S), wandering, seed=1)
    without = feed(PlannedRate(LEAD_S, INTERVAL_S, error_z=None), wandering, seed=1)
    assert np.mean(np.array(with_band[40:]) / np.array(without[40:])) > 1.05
    calm_with = feed(PlannedRate(LEAD_S, INTERVAL_S), [8.0] * 160, seed=1)
    calm_without = feed(PlannedRate(LEAD_S, INTERVAL_S, error_z=None), [8.0] * 160, seed=1)
    assert np.mean(np.array(calm_with[40:]) / np.array(calm_without[40:])) < 1.05


def test_the_plan_never_goes_below_the_floor():
    planned = PlannedRate(LEAD_S, INTERVAL_S)
    feed(planned, [2.0] * 20)
    assert planned.rate_rps(20 * INTERVAL_S + 1, floor_rps=30.0) == 30.0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="lead_time_s"):
        PlannedRate(-1.0, INTERVAL_S)
    with pytest.raises(ValueError, match="interval_s"):
        PlannedRate(LEAD_S, 0.0)


def test_restoring_a_snapshot_undoes_the_readings_since():
    twin, planned = PlannedRate(LEAD_S, INTERVAL_S), PlannedRate(LEAD_S, INTERVAL_S)
    feed(twin, [5.0] * 30)
    feed(planned, [5.0] * 30)
    snap = planned.state()
    planned.observe(31 * INTERVAL_S, 400, INTERVAL_S)  # a reading taken again, much higher
    planned.rate_rps(31 * INTERVAL_S)
    planned.restore(snap)
    for p in (twin, planned):
        p.observe(31 * INTERVAL_S, 80, INTERVAL_S)
    assert planned.rate_rps(31 * INTERVAL_S) == twin.rate_rps(31 * INTERVAL_S)
    assert planned.forecast.observed == twin.forecast.observed == 31
