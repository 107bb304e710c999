"""The traffic envelope equals a brute-force computation; the hypervolume formula on worked examples."""

from pathlib import Path

import numpy as np
import pytest

from optimizer.simulation.envelope import TrafficEnvelope, doubling_windows
from optimizer.simulation.hypervolume import normalized_hypervolume, pareto_front

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
AZURE = SHARED / "data" / "traces" / "azure2023_conv.csv"


def brute_loads(times, weights, size):
    """Load of the window (t_i - size, t_i] ending at each arrival, by direct summation."""
    t = np.asarray(times)
    w = np.asarray(weights)
    return np.array([w[(t > ti - size) & (t <= ti)].sum() for ti in t])


def brute_peaks(times, weights, sizes, now=None, horizon=None):
    t = np.asarray(times)
    out = []
    for size in sizes:
        loads = brute_loads(times, weights, size)
        if now is not None:
            loads = loads[t > now - horizon]
        out.append(loads.max() if loads.size else 0.0)
    return np.array(out)


def random_trace(rng, n):
    gaps = rng.exponential(rng.uniform(0.05, 2.0), size=n)
    gaps[rng.uniform(size=n) < 0.1] = 0.0  # simultaneous arrivals
    times = np.cumsum(gaps)
    weights = rng.integers(1, 3000, size=n).astype(float)
    return times, weights


def test_doubling_windows_stop_at_sixty_seconds():
    assert doubling_windows(1.0) == (1, 2, 4, 8, 16, 32, 60)
    assert doubling_windows(5.0, 60.0) == (5, 10, 20, 40, 60)


@pytest.mark.parametrize("seed", range(6))
def test_envelope_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    times, weights = random_trace(rng, int(rng.integers(50, 400)))
    sizes = doubling_windows(float(rng.choice([0.5, 1.0, 3.0])), 60.0)
    horizon = float(rng.uniform(5, 80))
    one_by_one = TrafficEnvelope(sizes, horizon_s=horizon)
    batched = TrafficEnvelope(sizes, horizon_s=horizon)
    cuts = np.sort(rng.choice(np.arange(1, len(times)), size=5, replace=False))
    start = 0
    for cut in [*cuts.tolist(), len(times)]:
        for t, w in zip(times[start:cut], weights[start:cut], strict=True):
            one_by_one.add(float(t), float(w))
        batched.extend(times[start:cut], weights[start:cut])
        now = float(times[cut - 1] + rng.uniform(0, 10))
        expected = brute_peaks(times[:cut], weights[:cut], sizes, now, horizon)
        assert np.allclose(one_by_one.peaks(now), expected)
        assert np.allclose(batched.peaks(now), expected)
        start = cut
    all_time = brute_peaks(times, weights, sizes)
    assert np.allclose(one_by_one.peaks(), all_time)
    assert np.allclose(batched.peaks(), all_time)
    assert batched.max_rate() == pytest.approx(float(np.max(all_time / np.array(sizes))))


def test_envelope_forgets_bursts_older_than_the_horizon():
    env = TrafficEnvelope((1.0, 10.0), horizon_s=30.0)
    env.extend([0.0, 0.1, 0.2, 0.3])
    env.extend([50.0])
    assert env.peaks().tolist() == [4.0, 4.0]
    assert env.peaks(60.0).tolist() == [1.0, 1.0]
    assert env.peaks(81.0).tolist() == [0.0, 0.0]


def test_envelope_rejects_out_of_order_arrivals():
    env = TrafficEnvelope()
    env.add(5.0)
    with pytest.raises(ValueError):
        env.add(4.0)
    with pytest.raises(ValueError):
        env.extend([6.0, 5.5])


@pytest.mark.skipif(not AZURE.exists(), reason="../shared not present: the real Azure conv trace is not available")
def test_azure_envelope_matches_published_figures():
    from optimizer.simulation.traces import load_azure_csv

    tr = load_azure_csv(AZURE)
    env = TrafficEnvelope((1.0, 64.0))
    env.extend(tr.arrival_s)
    rates = env.peaks() / np.array([1.0, 64.0])
    # InferLine's envelope of this trace as quoted in the field notes: 19 req/s over 1 s, 8.7 over 64 s.
    assert rates[0] == pytest.approx(19.0, abs=0.5)
    assert rates[1] == pytest.approx(8.7, abs=0.1)


def test_hypervolume_worked_example():
    # Three (cost, latency) points, references 100 and 10 -> normalized (0.2,0.8), (0.4,0.4), (0.8,0.2).
    # HV = (1-0.8)(1-0.2) + (0.4-0.2)(1-0.8) + (0.8-0.4)(1-0.4) = 0.16 + 0.04 + 0.24 = 0.44
    points = [(40.0, 4.0), (20.0, 8.0), (80.0, 2.0)]
    assert normalized_hypervolume(points, 100.0, 10.0) == pytest.approx(0.44)


def test_hypervolume_ignores_dominated_points_and_clips_at_the_reference():
    base = [(20.0, 8.0), (40.0, 4.0), (80.0, 2.0)]
    dominated = [*base, (50.0, 5.0), (90.0, 9.0)]
    assert normalized_hypervolume(dominated, 100.0, 10.0) == pytest.approx(0.44)
    # A point beyond the cost reference adds nothing; one beyond the latency reference neither.
    assert normalized_hypervolume([*base, (150.0, 1.0), (10.0, 30.0)], 100.0, 10.0) == pytest.approx(0.44)
    # One point: the rectangle it dominates.
    assert normalized_hypervolume([(50.0, 5.0)], 100.0, 10.0) == pytest.approx(0.25)
    assert normalized_hypervolume([], 100.0, 10.0) == 0.0
    assert pareto_front(dominated) == [(20.0, 8.0), (40.0, 4.0), (80.0, 2.0)]
