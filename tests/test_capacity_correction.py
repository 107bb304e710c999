"""Online capacity correction: lowers a variant's capacity when its replicas miss the SLO while
serving no more than the model said they could, ignores misses under overload, recovers slowly."""

from dataclasses import dataclass

import pytest

from optimizer.capacity_correction import CapacityCorrection


@dataclass
class Counters:
    name: str
    variant: str
    finished: int = 0
    slo_misses: int = 0
    state: str = "ready"


def feed(correction, replicas, intervals, done_per_replica, missed_per_replica, capacity, start=0.0):
    t = start
    for _ in range(intervals):
        t += 15.0
        for r in replicas:
            r.finished += done_per_replica
            r.slo_misses += missed_per_replica
        correction.observe(t, 15.0, replicas, capacity)
    return t


def test_misses_within_modelled_capacity_lower_the_factor_then_it_recovers():
    c = CapacityCorrection()
    reps = [Counters("h-1", "h100")]
    # 10 req/s served where the model rates one replica at 13: 5 % of them miss
    t = feed(c, reps, 6, 150, 8, {"h100": 13.0})
    low = c.factor("h100")
    assert low == pytest.approx(c.step_down, abs=0.02), "one step, then it waits for the change to take effect"
    t = feed(c, reps, 40, 150, 8, {"h100": 13.0}, start=t)
    lower = c.factor("h100")
    assert c.floor <= lower < low
    # the plan adds a replica; both meet the SLO with room to spare: the factor climbs back, never above 1
    reps.append(Counters("h-2", "h100"))
    feed(c, reps, 200, 75, 0, {"h100": 13.0 * lower}, start=t)
    assert c.factor("h100") == 1.0
    assert c.factors() == {}


def test_misses_under_overload_do_not_count():
    c = CapacityCorrection()
    reps = [Counters("h-1", "h100")]
    feed(c, reps, 40, 300, 30, {"h100": 13.0})  # 20 req/s on a replica rated 13: the plan's fault, not the model's
    assert c.factor("h100") == 1.0


def test_few_requests_teach_nothing_and_other_variants_keep_their_capacity():
    c = CapacityCorrection(min_requests=100)
    reps = [Counters("h-1", "h100"), Counters("a-1", "a100")]
    feed(c, reps[:1], 3, 20, 5, {"h100": 13.0})  # 60 requests in the window: not enough
    assert c.factor("h100") == 1.0
    feed(c, reps, 20, 80, 8, {"h100": 13.0, "a100": 6.0})
    assert c.factor("h100") < 1.0 and c.factor("a100") < 1.0
    assert set(c.factors()) == {"h100", "a100"}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        CapacityCorrection(target=0.999, recover_at=0.99)
