"""The forecast's own error record as headroom (optimizer.forecast_error)."""

import math

import numpy as np
import pytest

from optimizer.forecast_error import ForecastErrorBand

DT = 15.0
LEAD = 60.0


def run(rates, forecasts, *, z=1.0, seed=0):
    """Feed Poisson counts at `rates` (one per interval) and a forecast per interval; return the band."""
    rng = np.random.default_rng(seed)
    band = ForecastErrorBand(LEAD, z=z)
    for k, (rate, fc) in enumerate(zip(rates, forecasts, strict=True)):
        end = (k + 1) * DT
        band.observe(end, int(rng.poisson(rate * DT)), DT)
        band.predicted(end, fc)
    return band


def test_an_exact_forecast_of_poisson_traffic_asks_for_almost_no_headroom():
    rates = [10.0] * 200
    band = run(rates, rates)
    assert band.checked > 100
    assert 1.0 <= band.factor() < 1.03


def test_a_forecast_that_trails_a_rise_gets_the_rise_over_its_lead_time_as_headroom():
    # The rate grows 1 % per interval; the forecast says "the rate now", and the window it is checked
    # on (one lead time to one lead time + 60 s ahead) is 5-8 intervals later: ~6.7 % higher.
    rates = [5.0 * 1.01 ** k for k in range(150)]
    band = run(rates, rates)
    assert 1.04 < band.factor() < 1.12


def test_wandering_traffic_gets_more_headroom_than_calm_traffic_and_z_scales_it():
    rng = np.random.default_rng(3)
    walk = np.exp(np.cumsum(rng.normal(0.0, 0.06, 240)))
    wander = list(8.0 * walk)
    calm = [8.0] * 240
    wide = run(wander, wander).factor()
    assert wide > run(calm, calm).factor() + 0.05
    assert run(wander, wander, z=2.0).factor() > wide > run(wander, wander, z=0.0).factor() >= 1.0


def test_an_over_forecast_never_plans_below_the_forecast():
    rates = [4.0] * 100
    band = run(rates, [8.0] * 100)
    assert band.factor() == 1.0


def test_no_headroom_before_enough_forecasts_were_checked():
    band = ForecastErrorBand(LEAD)
    band.predicted(0.0, 1.0)
    for k in range(1, 6):
        band.observe(k * DT, 100, DT)
    assert band.checked == 0 and band.factor() == 1.0
    # The forecast made at 0 is checked on the window (60 s, 120 s], once it has passed.
    for k in range(6, 9):
        band.observe(k * DT, 30, DT)
    assert band.checked == 1
    assert band._errors[0][0] == pytest.approx(math.log(190.5 / 60.0))


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        ForecastErrorBand(-1.0)
    with pytest.raises(ValueError):
        ForecastErrorBand(60.0, z=-1.0)
    with pytest.raises(ValueError):
        ForecastErrorBand(60.0).observe(15.0, -1, 15.0)
