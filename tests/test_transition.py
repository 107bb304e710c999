"""The transition planner moves toward the optimizer's decision without ever making things unsafe."""

from __future__ import annotations

import random

import pytest

from optimizer.transition import (
    ScalingPolicy,
    ScalingRules,
    StabilizationHistory,
    TransitionPolicy,
    VariantState,
    plan_transition,
)

NO_WINDOWS = TransitionPolicy(scale_up_window_s=0, scale_down_window_s=0)


def state(name, *, group="m/both", acc="H100", cur=0, ready=None, desired=0, **kw) -> VariantState:
    return VariantState(name=name, group=group, accelerator=acc, current_replicas=cur,
                        ready_replicas=cur if ready is None else ready, desired_replicas=desired, **kw)


def plan(variants, inventory=None, policy=NO_WINDOWS, history=None, now=0.0):
    return plan_transition(variants, inventory or {}, policy, history or StabilizationHistory(), now)


def test_new_variant_scales_up_first_and_old_scales_down_only_once_new_replicas_are_ready():
    old = dict(name="old", acc="H100", desired=0)
    new = dict(name="new", acc="L4", desired=4)
    p1 = plan([state(cur=2, **old), state(cur=0, **new)])
    assert p1.step("new").target_replicas == 4
    assert p1.step("old").target_replicas == 2
    assert "waiting_for_ready" in p1.step("old").limited_by
    p2 = plan([state(cur=2, **old), state(cur=4, ready=3, **new)], history=p1.history, now=30)
    assert p2.step("old").target_replicas == 2
    p3 = plan([state(cur=2, **old), state(cur=4, ready=4, **new)], history=p2.history, now=60)
    assert p3.step("old").target_replicas == 0
    assert p3.step("old").direction == "down"


def test_other_models_do_not_block_a_scale_down():
    p = plan([state("a", group="m1/both", cur=3, desired=1),
              state("b", group="m2/both", cur=0, desired=2)])
    assert p.step("a").target_replicas == 1
    assert p.step("b").target_replicas == 2


def test_scale_up_fits_the_inventory_counting_pending_and_terminating_pods():
    variants = [state("a", group="g1", cur=3, ready=1, pods=3, desired=6),
                state("c", group="g2", cur=1, pods=2, desired=1)]
    p = plan(variants, inventory={"H100": 8})
    # occupied: a 3 (two of them pending), c 2 (one terminating) -> 3 free
    assert p.step("a").target_replicas == 6
    p = plan(variants, inventory={"H100": 6})
    assert p.step("a").target_replicas == 4
    assert "inventory" in p.step("a").limited_by
    p = plan(variants, inventory={"H100": 5})
    assert p.step("a").target_replicas == 3


def test_inventory_counts_accelerators_per_replica():
    p = plan([state("tp4", cur=1, desired=5, accelerators_per_replica=4)], inventory={"H100": 13})
    assert p.step("tp4").target_replicas == 3


@pytest.mark.parametrize("desired", [0, 2, 9])
def test_missing_metrics_hold_replicas_and_never_scale_down(desired):
    p = plan([state("a", cur=4, desired=desired, metrics_available=False)])
    assert p.step("a").target_replicas == 4
    assert "metrics_unavailable" in p.step("a").limited_by


def test_missing_metrics_never_leave_a_variant_at_zero_below_its_minimum():
    p = plan([state("a", cur=0, desired=0, min_replicas=1, metrics_available=False)])
    assert p.step("a").target_replicas == 1


def test_held_cycles_are_recommendations_at_the_held_size():
    """Metrics down longer than the scale-down window: the window is full of holds when they return."""
    policy = TransitionPolicy(scale_down_window_s=100)
    p = plan([state("a", cur=4, desired=4)], policy=policy, now=0)
    for t in (50, 100, 150):
        p = plan([state("a", cur=4, desired=0, metrics_available=False)], policy=policy, history=p.history, now=t)
    assert p.history.recommendations["a"] == ((50, 4), (100, 4), (150, 4))
    p = plan([state("a", cur=4, desired=1)], policy=policy, history=p.history, now=160)
    assert p.step("a").target_replicas == 4 and "stabilization" in p.step("a").limited_by
    p = plan([state("a", cur=4, desired=1)], policy=policy, history=p.history, now=251)
    assert p.step("a").target_replicas == 1


def test_first_readings_after_a_metrics_gap_may_scale_up_but_not_down_until_a_fresh_window():
    policy = TransitionPolicy(scale_down_window_s=0, fresh_data_window_s=10)
    p = plan([state("a", cur=3, desired=3)], policy=policy, now=0)
    p = plan([state("a", cur=3, desired=3, metrics_available=False)], policy=policy, history=p.history, now=2)
    p = plan([state("a", cur=3, desired=1)], policy=policy, history=p.history, now=4)  # a rate spanning the gap
    assert p.step("a").target_replicas == 3 and "metrics_recovering" in p.step("a").limited_by
    p = plan([state("a", cur=3, desired=5)], policy=policy, history=p.history, now=6)
    assert p.step("a").target_replicas == 5
    p = plan([state("a", cur=5, desired=1)], policy=policy, history=p.history, now=13)
    assert p.step("a").target_replicas == 5
    p = plan([state("a", cur=5, desired=1)], policy=policy, history=p.history, now=14)
    assert p.step("a").target_replicas == 1 and "a" not in p.history.metrics_back_since


def test_scale_down_waits_for_the_window_and_takes_its_highest_recommendation():
    policy = TransitionPolicy(scale_up_window_s=0, scale_down_window_s=300)
    h = plan([state("a", cur=5, desired=5)], policy=policy, now=0).history
    p = plan([state("a", cur=5, desired=2)], policy=policy, history=h, now=100)
    assert p.step("a").target_replicas == 5 and "stabilization" in p.step("a").limited_by
    p = plan([state("a", cur=5, desired=3)], policy=policy, history=p.history, now=200)
    assert p.step("a").target_replicas == 5
    p = plan([state("a", cur=5, desired=2)], policy=policy, history=p.history, now=301)
    assert p.step("a").target_replicas == 3  # 2 at t=100 and 3 at t=200 are in the window
    p = plan([state("a", cur=3, desired=2)], policy=policy, history=p.history, now=501)
    assert p.step("a").target_replicas == 2


def test_scale_up_is_immediate_with_a_zero_window_and_the_window_minimum_otherwise():
    p = plan([state("a", cur=1, desired=6)], policy=TransitionPolicy(scale_down_window_s=300))
    assert p.step("a").target_replicas == 6
    policy = TransitionPolicy(scale_up_window_s=60, scale_down_window_s=0)
    p = plan([state("a", cur=1, desired=3)], policy=policy, now=0)
    assert p.step("a").target_replicas == 3
    p = plan([state("a", cur=3, desired=6)], policy=policy, history=p.history, now=30)
    assert p.step("a").target_replicas == 3 and "stabilization" in p.step("a").limited_by
    p = plan([state("a", cur=3, desired=6)], policy=policy, history=p.history, now=61)
    assert p.step("a").target_replicas == 6


def test_a_restarted_operator_does_not_skip_the_scale_down_window():
    policy = TransitionPolicy(scale_down_window_s=300)
    p = plan([state("a", cur=5, desired=1)], policy=policy, now=1000)
    assert p.step("a").target_replicas == 5
    p = plan([state("a", cur=5, desired=1)], policy=policy, history=p.history, now=1301)
    assert p.step("a").target_replicas == 1


def test_max_change_per_cycle_limits_both_directions():
    policy = TransitionPolicy(scale_up_window_s=0, scale_down_window_s=0, max_change_per_cycle=2)
    p = plan([state("up", group="a", cur=1, desired=10), state("down", group="b", cur=9, desired=0)], policy=policy)
    assert p.step("up").target_replicas == 3
    assert p.step("down").target_replicas == 7
    assert "max_change" in p.step("up").limited_by


def test_per_variant_behavior_windows_replace_the_global_ones():
    """behavior.scaleDown.stabilizationWindowSeconds 0 on one variant: it scales down at once while
    its neighbour waits for the global 300 s window."""
    policy = TransitionPolicy(scale_up_window_s=0, scale_down_window_s=300)
    fast = ScalingRules(stabilization_window_s=0)
    h = plan([state("a", group="a", cur=5, desired=5, scale_down=fast), state("b", group="b", cur=5, desired=5)],
             policy=policy, now=1000).history
    p = plan([state("a", group="a", cur=5, desired=2, scale_down=fast), state("b", group="b", cur=5, desired=2)],
             policy=policy, history=h, now=1010)
    assert p.step("a").target_replicas == 2 and p.step("b").target_replicas == 5


def test_rate_policies_follow_the_hpa_arithmetic():
    """Pods 2 / 60 s or Percent 50 / 60 s, selectPolicy Max: from 4 replicas up to max(6, 6) = 6; within
    the same period, the 2 already added count, so the next cycle may not go further; after the
    period it may. Min takes the smaller, Disabled forbids the direction; scale-down Percent floors."""
    rules = ScalingRules(policies=(ScalingPolicy(type="Pods", value=2, period_s=60),
                                   ScalingPolicy(type="Percent", value=50, period_s=60)))
    p = plan([state("a", cur=4, desired=20, scale_up=rules)], now=0)
    assert p.step("a").target_replicas == 6 and "rate_policy" in p.step("a").limited_by
    p = plan([state("a", cur=6, desired=20, scale_up=rules)], history=p.history, now=30)
    assert p.step("a").target_replicas == 6, "2 added at t=0 are within the 60 s period: start 4, limit 6"
    p = plan([state("a", cur=6, desired=20, scale_up=rules)], history=p.history, now=61)
    assert p.step("a").target_replicas == 9, "new period from 6: Pods 8, Percent 9, Max -> 9"
    low = rules.model_copy(update={"select_policy": "Min"})
    assert plan([state("a", cur=6, desired=20, scale_up=low)]).step("a").target_replicas == 8
    off = ScalingRules(select_policy="Disabled")
    assert plan([state("a", cur=6, desired=20, scale_up=off)]).step("a").target_replicas == 6
    assert plan([state("a", cur=6, desired=1, scale_up=off)]).step("a").target_replicas == 1, "only scale-up is off"
    down = ScalingRules(policies=(ScalingPolicy(type="Percent", value=30, period_s=60),))
    assert plan([state("a", cur=5, desired=0, min_replicas=0, scale_down=down)]).step("a").target_replicas == 3
    with pytest.raises(ValueError):
        ScalingPolicy(type="Pods", value=0, period_s=60)
    with pytest.raises(ValueError):
        ScalingRules(stabilization_window_s=3601)


def test_bounds_are_hard():
    p = plan([state("lo", group="a", cur=3, desired=0, min_replicas=2),
              state("hi", group="b", cur=3, desired=10, max_replicas=4),
              state("over", group="c", cur=6, desired=6, max_replicas=4, metrics_available=False)])
    assert p.step("lo").target_replicas == 2
    assert p.step("hi").target_replicas == 4
    assert p.step("over").target_replicas == 4


def test_minimum_is_granted_even_when_the_inventory_is_short():
    p = plan([state("a", cur=0, desired=0, min_replicas=2), state("b", group="x", cur=2, desired=2)],
             inventory={"H100": 2})
    assert p.step("a").target_replicas == 2


def test_same_accelerator_swap_rolls_one_replica_at_a_time_instead_of_deadlocking():
    inv = {"H100": 2}
    a = dict(name="a", desired=0)
    b = dict(name="b", desired=2)
    p = plan([state(cur=2, **a), state(cur=0, **b)], inventory=inv)
    assert (p.step("a").target_replicas, p.step("b").target_replicas) == (1, 0)
    assert "rolling_swap" in p.step("a").limited_by
    # a's pod is still terminating: nothing moves
    p = plan([state(cur=1, pods=2, **a), state(cur=0, **b)], inventory=inv)
    assert (p.step("a").target_replicas, p.step("b").target_replicas) == (1, 0)
    p = plan([state(cur=1, pods=1, **a), state(cur=0, **b)], inventory=inv)
    assert (p.step("a").target_replicas, p.step("b").target_replicas) == (1, 1)
    p = plan([state(cur=1, **a), state(cur=1, ready=0, **b)], inventory=inv)
    assert (p.step("a").target_replicas, p.step("b").target_replicas) == (1, 1)
    p = plan([state(cur=1, **a), state(cur=1, **b)], inventory=inv)
    assert (p.step("a").target_replicas, p.step("b").target_replicas) == (0, 1)
    p = plan([state(cur=0, **a), state(cur=1, **b)], inventory=inv)
    assert (p.step("a").target_replicas, p.step("b").target_replicas) == (0, 2)


def test_settled_only_when_everything_is_at_its_target_and_ready():
    assert plan([state("a", cur=2, desired=2)]).settled
    assert not plan([state("a", cur=2, ready=1, desired=2)]).settled
    assert not plan([state("a", cur=2, desired=3)]).settled


def test_duplicate_names_and_bad_bounds_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        plan([state("a"), state("a")])
    with pytest.raises(ValueError, match="min_replicas"):
        state("a", min_replicas=3, max_replicas=2)


def test_invariants_hold_on_random_clusters():
    rng = random.Random(20240611)
    for _case in range(400):
        accs = ["H100", "L4"]
        inventory = {a: rng.choice([None, rng.randint(0, 12)]) for a in accs}
        policy = TransitionPolicy(scale_up_window_s=0, scale_down_window_s=rng.choice([0, 100]),
                                  max_change_per_cycle=rng.choice([None, 1, 3]))
        variants = []
        for i in range(rng.randint(1, 6)):
            cur = rng.randint(0, 5)
            lo = rng.randint(0, 2)
            hi = rng.choice([None, rng.randint(lo, 6)])
            variants.append(state(
                f"v{i}", group=rng.choice(["g1", "g2"]), acc=rng.choice(accs), cur=cur, ready=rng.randint(0, cur),
                pods=rng.choice([None, cur + rng.randint(0, 2)]), desired=rng.randint(0, 8), min_replicas=lo,
                max_replicas=hi, accelerators_per_replica=rng.choice([1, 2]),
                metrics_available=rng.random() > 0.2))
        history = plan(variants, inventory, policy, now=0).history
        p = plan(variants, inventory, policy, history=history, now=rng.choice([10.0, 200.0]))
        by_name = {v.name: v for v in variants}
        for s in p.steps:
            v = by_name[s.name]
            assert s.target_replicas >= v.min_replicas
            if v.max_replicas is not None:
                assert s.target_replicas <= v.max_replicas
            if not v.metrics_available:
                assert s.target_replicas >= v.clamp(v.current_replicas)
            within_bounds = v.clamp(v.current_replicas) == v.current_replicas and v.current_replicas >= v.min_replicas
            if policy.max_change_per_cycle and within_bounds:
                assert abs(s.target_replicas - v.current_replicas) <= policy.max_change_per_cycle
        for acc, cap in inventory.items():
            if cap is None:
                continue
            on = [v for v in variants if v.accelerator == acc]
            if any(v.current_replicas < v.min_replicas for v in on):
                continue
            occupied = sum(v.occupied_replicas * v.accelerators_per_replica for v in on)
            after = sum(max(p.step(v.name).target_replicas, v.occupied_replicas) * v.accelerators_per_replica
                        for v in on)
            assert after <= max(cap, occupied), (acc, cap, variants, p.steps)
        for s in p.steps:
            v = by_name[s.name]
            if s.target_replicas >= v.current_replicas or v.current_replicas > (v.max_replicas or 10**9):
                continue
            growing = [by_name[o.name] for o in p.steps if o.name != s.name and by_name[o.name].group == v.group
                       and o.target_replicas > by_name[o.name].ready_replicas
                       and o.stabilized_replicas >= by_name[o.name].current_replicas]
            assert not growing or "rolling_swap" in s.limited_by and s.target_replicas == v.current_replicas - 1 \
                or s.target_replicas == v.min_replicas, (v, s, growing)


def test_a_model_with_unserved_demand_never_loses_a_ready_replica():
    """Inventory 0 everywhere: the optimizer wants 0 of everything; the serving replica stays."""
    p = plan([state("h100", cur=1, desired=0, demand_unserved=True)], inventory={"H100": 0})
    assert p.step("h100").target_replicas == 1 and "demand_unserved" in p.step("h100").limited_by
    # replicas that are not ready yet may go; a lowered maxReplicas applies at once
    p = plan([state("a", cur=4, ready=2, desired=0, demand_unserved=True)], inventory={"H100": 0})
    assert p.step("a").target_replicas == 2
    p = plan([state("a", cur=4, desired=0, max_replicas=1, demand_unserved=True)], inventory={"H100": 0})
    assert p.step("a").target_replicas == 1
    # the control case: all demand served elsewhere, the same variant drains
    p = plan([state("a", cur=1, desired=0), state("b", acc="L4", cur=3, desired=3)], inventory={"H100": 0})
    assert p.step("a").target_replicas == 0


def test_a_carried_demand_scales_up_but_never_down():
    p = plan([state("a", cur=0, desired=2, metrics_available=False, demand_carried=True)])
    assert p.step("a").target_replicas == 2 and "demand_carried" in p.step("a").limited_by
    p = plan([state("a", cur=3, desired=1, metrics_available=False, demand_carried=True)])
    assert p.step("a").target_replicas == 3


def test_one_half_of_a_pd_pair_is_not_scaled_up_alone():
    """The optimizer wants a prefill and a decode replica, but no A100 is free for the decode half: the prefill
    half gets no replica either (alone it serves nothing), and the model's "both" replica stays."""
    variants = [state("both", group="m", acc="L4", cur=1, desired=0),
                state("pre", group="m", role="prefill", acc="H100", desired=1),
                state("dec", group="m", role="decode", acc="A100", desired=1)]
    p = plan(variants, {"L4": 4, "H100": 4, "A100": 0})
    assert [p.step(n).target_replicas for n in ("both", "pre", "dec")] == [1, 0, 0]
    assert "pair_incomplete" in p.step("pre").limited_by and "inventory" in p.step("dec").limited_by
    assert "not scaled up alone" in p.step("pre").reason
    p = plan(variants, {"L4": 4, "H100": 4, "A100": 4})  # both halves fit: both start, "both" waits for them
    assert [p.step(n).target_replicas for n in ("both", "pre", "dec")] == [1, 1, 1]

