"""Balanced routing shares: every variant ends at the same utilisation when the fleet allows it,
never more than the allocation's vertex routing, and buckets go only where they can be served."""

import pytest

from optimizer.balanced_routing import balanced_shares


def utilisation(shares, rates, replicas, capacity):
    load = {}
    for b, weights in shares.items():
        for v, y in weights.items():
            load[v] = load.get(v, 0.0) + rates[b] * y / (replicas[v] * capacity[(v, b)])
    return load


def test_two_variants_share_every_bucket_to_equal_utilisation():
    rates = {"short": 10.0, "long": 2.0}
    replicas = {"h100": 1, "a100": 4}
    capacity = {("h100", "short"): 20.0, ("h100", "long"): 4.0, ("a100", "short"): 8.0, ("a100", "long"): 1.5}
    shares, top = balanced_shares(rates, replicas, capacity)
    for weights in shares.values():
        assert sum(weights.values()) == pytest.approx(1.0)
    load = utilisation(shares, rates, replicas, capacity)
    assert top == pytest.approx(max(load.values()))
    assert load["h100"] == pytest.approx(load["a100"], abs=1e-6)
    # the vertex that puts all of "short" on the H100 runs it at 50 % + the A100s' long bucket...
    vertex = utilisation({"short": {"h100": 1.0}, "long": {"a100": 1.0}}, rates, replicas, capacity)
    assert top <= max(vertex.values()) + 1e-9


def test_a_bucket_goes_only_to_variants_that_serve_it():
    rates = {"short": 4.0, "long": 1.0}
    replicas = {"l4": 3, "a100": 1}
    capacity = {("l4", "short"): 2.0, ("a100", "short"): 6.0, ("a100", "long"): 2.0}
    shares, top = balanced_shares(rates, replicas, capacity)
    assert set(shares["long"]) == {"a100"} and shares["long"]["a100"] == pytest.approx(1.0)
    load = utilisation(shares, rates, replicas, capacity)
    assert max(load.values()) == pytest.approx(top)


def test_nothing_servable_is_none():
    assert balanced_shares({"long": 1.0}, {"l4": 2}, {("l4", "short"): 2.0}) is None
    assert balanced_shares({"short": 1.0}, {"l4": 0}, {("l4", "short"): 2.0}) is None
