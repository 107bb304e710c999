"""The arrival-rate forecast (optimizer.forecast): tracks a level, leads a ramp, adapts to a step."""

import math

import numpy as np
import pytest

from optimizer.forecast import ArrivalForecast, log_count_moments

DT = 15.0


def feed(forecast: ArrivalForecast, rates, seed: int = 3) -> None:
    rng = np.random.default_rng(seed)
    for r in rates:
        forecast.observe(int(rng.poisson(r * DT)), DT)


def test_steady_poisson_traffic_gives_its_rate_and_no_growth():
    for rate in (0.5, 4.0, 40.0):
        f = ArrivalForecast(DT, z=0.0)
        feed(f, [rate] * 80)
        assert f.level_rps() == pytest.approx(rate, rel=0.12)
        # No growth worth a lead time: over two minutes the forecast moves by under 5 %.
        assert abs(f.growth_per_s()) * 120 < 0.05
        assert f.upper_rps(120) == pytest.approx(f.level_rps(), rel=0.05)


def test_predicted_count_noise_keeps_the_level_unbiased_at_a_few_arrivals_per_interval():
    """The default variance of 1 / (n + 1/2) from the count seen trusts busy intervals most: over 12
    draws the level reads 2.1x the rate at 0.05 req/s and 1.24x at 0.25 (15 s intervals).
    count_noise="predicted" gives every interval the weight of the count the filter expected."""
    for rate in (0.05, 0.25, 1.0, 12.0):
        levels, biased = [], []
        for seed in range(12):
            f = ArrivalForecast(DT, z=0.0, count_noise="predicted")
            feed(f, [rate] * 120, seed=seed)
            levels.append(f.level_rps())
            g = ArrivalForecast(DT, z=0.0)
            feed(g, [rate] * 120, seed=seed)
            biased.append(g.level_rps())
        assert np.mean(levels) == pytest.approx(rate, rel=0.12), rate
        if rate <= 0.25:
            assert np.mean(biased) > 1.2 * rate, "the default still reads sparse traffic high"
    with pytest.raises(ValueError):
        ArrivalForecast(DT, count_noise="seen")


def test_log_count_moments_match_a_poisson_count_and_its_normal_limit():
    rng = np.random.default_rng(4)
    for mu in (0.3, 3.0, 30.0):
        draws = np.log(rng.poisson(mu, 200_000) + 0.5)
        mean, var, slope = log_count_moments(mu)
        assert mean == pytest.approx(draws.mean(), abs=0.01) and var == pytest.approx(draws.var(), rel=0.03)
        assert 0 < slope <= 1.05
    assert log_count_moments(1e6) == pytest.approx((math.log(1e6), 1e-6, 1.0))
    assert log_count_moments(0.3)[2] < 0.5, "near no arrivals the count barely moves with the rate"


def test_a_ramp_is_forecast_ahead_not_trailed():
    """A diurnal-like rise of ~1 req/s per minute: the two-count trend cannot see it beyond its noise,
    the filter pools the intervals and plans for where the rate will be one lead time ahead."""
    rates = np.linspace(5.0, 17.0, 48)  # 12 minutes
    f = ArrivalForecast(DT, z=0.0)
    feed(f, rates)
    lead = 63.0
    truth_then = rates[-1] + (rates[-1] - rates[-2]) / DT * lead
    ahead = f.upper_rps(lead)
    assert ahead > f.level_rps()
    assert abs(ahead / truth_then - 1) < abs(rates[-1] / truth_then - 1)  # closer than "now"
    assert ahead == pytest.approx(truth_then, rel=0.12)


def test_a_step_is_followed_within_two_minutes_and_a_drop_is_not_held():
    f = ArrivalForecast(DT, z=0.0)
    feed(f, [4.0] * 40 + [8.0] * 8)
    assert f.level_rps() == pytest.approx(8.0, rel=0.15)
    feed(f, [3.0] * 8, seed=5)
    assert f.upper_rps(0) == pytest.approx(3.0, rel=0.2)


def test_the_upper_band_widens_with_z_and_horizon():
    f = ArrivalForecast(DT, z=1.645)
    feed(f, [6.0] * 60)
    g = ArrivalForecast(DT, z=0.0)
    feed(g, [6.0] * 60)
    assert f.upper_rps(0) > g.upper_rps(0)
    assert f.upper_rps(300) >= f.upper_rps(60) >= f.upper_rps(0)


def test_wandering_traffic_selects_faster_noise_than_calm_traffic():
    calm = ArrivalForecast(DT)
    feed(calm, [10.0] * 120)
    rng = np.random.default_rng(9)
    wild_rates = 10.0 * np.exp(np.cumsum(rng.normal(0, 0.15, 120)))
    wild = ArrivalForecast(DT)
    feed(wild, wild_rates)
    assert wild.selected_noise()[0] > calm.selected_noise()[0]


def test_no_observation_means_no_forecast_and_bad_input_is_refused():
    f = ArrivalForecast(DT)
    assert f.level_rps() == 0.0 and f.upper_rps(60) == 0.0 and f.selected_noise() is None
    with pytest.raises(ValueError):
        f.observe(-1, DT)
    with pytest.raises(ValueError):
        f.observe(3, 0.0)
    with pytest.raises(ValueError):
        ArrivalForecast(0.0)
    f.observe(0, DT)  # an idle interval is an observation, not an error
    assert math.isfinite(f.level_rps()) and f.level_rps() < 0.2
