"""The operator plans on the rate one lead time ahead (variant_autoscaler.demand_forecast).

The inputs are the collector's own result objects (variant_autoscaler_testbed.observations builds
them from a demand per model, as the controller tests do); the clock is the cycle's time.
"""

import numpy as np
import pytest
from operator_harness import TINY_MODEL, settings_dict
from variant_autoscaler.collector import VariantSelector
from variant_autoscaler.demand_forecast import MAX_GAP_INTERVALS, forecast_demand
from variant_autoscaler.settings import OperatorSettings
from variant_autoscaler_testbed.observations import observations

MODEL = TINY_MODEL["name"]
SELECTORS = [VariantSelector(name="ns/chat", namespace="ns", model=MODEL, deployment="chat")]
OK = {MODEL: (True, "1 variant(s) reporting")}


def settings(**over) -> OperatorSettings:
    return OperatorSettings.model_validate(settings_dict(interval_s=30, **over))


def planned(memory: dict, rate: float, now: float, s: OperatorSettings, ok=OK, waiting: float = 0.0) -> float | None:
    """The planned rate, or None where the model is left at its measured rate."""
    collection = observations({MODEL: rate}, SELECTORS)
    if waiting:
        obs = collection.models[MODEL].model_copy(update={"waiting": waiting})
        collection = collection.model_copy(update={"models": {MODEL: obs}})
    out = forecast_demand(memory, collection, ok, s, now)
    return out[MODEL].arrival_rate_rps if MODEL in out else None


def test_a_steady_rise_is_planned_ahead_and_never_below_the_rate_measured_now():
    s, memory = settings(forecast_lead_time_s=120), {}
    rates = np.linspace(2.0, 12.0, 40)  # +0.5 req/s per 30 s cycle
    plans = [planned(memory, r, 30.0 * i, s) for i, r in enumerate(rates)]
    assert all(p >= r for p, r in zip(plans, rates, strict=True))
    assert np.median(np.array(plans[10:]) / rates[10:]) > 1.05


def test_steady_demand_is_planned_at_its_rate():
    s, memory = settings(), {}
    plans = [planned(memory, 6.0, 30.0 * i, s) for i in range(40)]
    assert max(plans[5:]) < 6.0 * 1.05


def test_a_second_reading_within_half_an_interval_replaces_the_first():
    s = settings()
    once, many = {}, {}
    for i in range(10):
        planned(once, 4.0 + i, 30.0 * i, s)
        for k in range(5):  # extra cycles (a resource changed) a few seconds apart
            planned(many, 4.0 + i, 30.0 * i + 2.0 * k, s)
    assert once[MODEL].planned.forecast.observed == 10
    assert many[MODEL].planned.forecast.observed == 10
    assert abs(planned(once, 14.0, 300.0, s) - planned(many, 14.0, 308.0, s)) < 0.1


def test_after_a_long_gap_the_forecast_starts_over():
    s, memory = settings(), {}
    for i in range(20):
        planned(memory, 2.0 + i, 30.0 * i, s)  # rising fast: the old record would plan far above 5
    gap = 19 * 30.0 + (MAX_GAP_INTERVALS + 1) * 30.0
    assert abs(planned(memory, 5.0, gap, s) - 5.0) < 0.15
    assert memory[MODEL].planned.forecast.observed == 1


def test_models_without_fresh_metrics_are_not_planned_and_keep_their_forecast():
    s, memory = settings(), {}
    planned(memory, 3.0, 0.0, s)
    held = {MODEL: (False, "no vLLM series")}
    assert planned(memory, 3.0, 30.0, s, ok=held) is None
    assert memory[MODEL].planned.forecast.observed == 1


def test_forecast_off_plans_on_the_measured_rate_and_forgets():
    memory = {}
    planned(memory, 3.0, 0.0, settings())
    assert planned(memory, 3.0, 30.0, settings(forecast=False)) is None and memory == {}


def test_a_changed_lead_time_rebuilds_the_forecast():
    memory = {}
    for i in range(5):
        planned(memory, 3.0, 30.0 * i, settings(forecast_lead_time_s=60))
    planned(memory, 3.0, 150.0, settings(forecast_lead_time_s=300))
    assert memory[MODEL].planned.lead_time_s == 300 and memory[MODEL].planned.forecast.observed == 1


def test_a_window_without_requests_plans_zero_so_an_idle_model_can_scale_down():
    s, memory = settings(), {}
    for i in range(10):
        planned(memory, 4.0, 30.0 * i, s)
    assert planned(memory, 0.0, 300.0, s) is None  # left at the measured 0
    assert memory[MODEL].planned.forecast.observed == 11


def test_queued_requests_are_planned_as_the_rate_that_serves_them_within_the_lead_time():
    for forecast in (True, False):
        s = settings(forecast=forecast, forecast_lead_time_s=120)
        memory, without = {}, {}
        for i in range(10):
            base = planned(without, 4.0, 30.0 * i, s) or 4.0
            queued = planned(memory, 4.0, 30.0 * i, s, waiting=60.0)
        assert queued == pytest.approx(base + 60.0 / 120, rel=0.03), forecast


def test_a_rate_read_more_often_than_its_window_is_not_inflated_by_tiny_counts():
    """1 s cycles on a 10 s rate window (the fault matrix's settings) at 1.5 req/s: one second's count
    (1.5) read through the forecast's +1/2 term would plan 2 req/s; the window's count (15) does not."""
    s, memory = OperatorSettings.model_validate(settings_dict(interval_s=1, rate_window_s=10)), {}
    plans = [planned(memory, 1.5, 1000.0 + i, s) or 1.5 for i in range(300)]
    assert max(plans[20:]) < 1.5 * 1.08, max(plans[20:])
