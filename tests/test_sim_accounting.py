"""Cost accounting on hand-computed cases: per replica-second, cold start included, draining billed."""

import pytest

from optimizer.simulation.accounting import CostLedger


def test_cost_by_hand():
    ledger = CostLedger()
    # An H100x2 replica at $8/h per replica: requested at 0, ready at 100 s, removed at 1900 s.
    ledger.open("a", "70b-h100x2", "H100", 2, 8.0, requested_s=0.0)
    ledger.ready("a", 100.0)
    ledger.close("a", 1900.0)
    # An L4 replica at $0.72/h, warm from 600 s, still running at the end (3600 s).
    ledger.open("b", "8b-l4", "L4", 1, 0.72, requested_s=600.0, ready_s=600.0)
    # A replica cancelled during its cold start: billed from request to cancellation.
    ledger.open("c", "8b-l4", "L4", 1, 0.72, requested_s=1000.0)
    ledger.close("c", 1030.0)

    # a: 1900 s * 8/3600 = 4.2222; b: 3000 s * 0.72/3600 = 0.6; c: 30 s * 0.72/3600 = 0.006
    assert ledger.cost(3600.0) == pytest.approx(4.222222 + 0.6 + 0.006, abs=1e-6)
    # Cold start: a 100 s, c 30 s (never ready), b 0 s.
    assert ledger.cold_start_cost(3600.0) == pytest.approx(100 * 8 / 3600 + 30 * 0.72 / 3600)
    # Accelerator-hours count every accelerator of a replica: a = 2 x 1900 s, L4 = 3000 s + 30 s.
    hours = ledger.accelerator_hours(3600.0)
    assert hours["H100"] == pytest.approx(2 * 1900 / 3600)
    assert hours["L4"] == pytest.approx(3030 / 3600)
    assert ledger.cost_by_variant(3600.0)["8b-l4"] == pytest.approx(0.606)
    # Billing up to an earlier horizon only counts what ran by then.
    assert ledger.cost(1000.0) == pytest.approx(1000 * 8 / 3600 + 400 * 0.72 / 3600)


def test_ledger_rejects_double_billing():
    ledger = CostLedger()
    ledger.open("a", "v", "L4", 1, 1.0, 0.0)
    with pytest.raises(ValueError):
        ledger.open("a", "v", "L4", 1, 1.0, 5.0)
    ledger.close("a", 10.0)
    with pytest.raises(ValueError):
        ledger.close("a", 20.0)
