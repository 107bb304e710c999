"""Does flow control on our saturation help? The default demo's `ours` policy under four routers.

Issue 15 item 4. The same policy (ours, examples/scenarios/default.yaml, warm-up excluded) runs
with:

* `weighted`: ours' default router (our routing weights, least-outstanding within a variant);
* `least-outstanding`: no flow control, no weights;
* `flow-utilization`: llm-d's default saturation detector (mean over endpoints of
  max(waiting/5, KV/0.8)), requests held at the pool while it is >= 1.0, least-outstanding dispatch;
* `flow-ours`: held while outstanding / SLO concurrency (from our capacity model) is >= 1.0,
  dispatch by our weights within replicas below their concurrency.

Run: `.venv/bin/python benchmarks/bench_router_flow_control.py [--seed-offset K] [ROUTER...]` (four
simulations of 30 min of traffic, one after another, ~15 s each). `--seed-offset K` adds K to each
model's trace seed (other traffic, same shape: a check that one seed's figures are not luck).
Prints cost, SLO attainment and the share of requests held at the pool per router; the README table under "Using with the llm-d router"
holds the figures. Nothing is asserted: flow control may not help.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import yaml

from optimizer.simulation.cluster import ClusterSimulator
from optimizer.simulation.evaluation import RunPlan, build_policy
from optimizer.simulation.metrics import summarize
from optimizer.simulation.routers import make_router
from optimizer.simulation.scenario import OursSpec, Scenario, prepare

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "examples" / "scenarios" / "default.yaml"
ROUTER_NAMES = ("weighted", "least-outstanding", "flow-utilization", "flow-ours")


def held_share(result) -> float:
    """Share of requests whose first dispatch came after their arrival (held at the pool)."""
    first: dict[int, float] = {}
    for rid, _, t in result.assignments:
        first.setdefault(rid, t)
    if not first:
        return 0.0
    ids = np.fromiter(first, dtype=np.int64)
    when = np.fromiter(first.values(), dtype=float)
    return float(np.mean(when - result.arrival_s[ids] > 1e-9))


def main(routers: tuple[str, ...] = ROUTER_NAMES, seed_offset: int = 0) -> list[tuple[str, object]]:
    doc = yaml.safe_load(DEFAULT.read_text())
    for traffic in doc["models"]:
        traffic["trace"]["seed"] += seed_offset
    doc["policies"] = [p for p in doc["policies"] if p.get("kind") == "ours"]
    doc.pop("pareto", None)
    prep = prepare(Scenario.model_validate(doc), DEFAULT.parent)
    base = next(p for p in prep.scenario.policies if isinstance(p, OursSpec))
    rows = []
    slos = {s.model: s for s in prep.problem.slos}
    options = prep.scenario.cluster.model_copy(update={"record_assignments": True})
    print(f"{'router':<20}{'cost $':>9}{'$/h':>8}{'SLO att':>9}{'TTFT att':>10}{'dropped':>9}"
          f"{'p99 TTFT s':>12}{'held':>8}{'wall s':>8}")
    for name in routers:
        spec = base.model_copy(update={"router": name})
        t0 = time.perf_counter()
        policy = build_policy(prep, RunPlan(label=f"ours/{name}", spec=spec))
        result = ClusterSimulator(prep.problem, prep.trace, policy, make_router(name), options).run()
        m = summarize(result, slos)
        print(f"{name:<20}{m.cost:>9.2f}{m.cost_per_hour:>8.2f}{m.slo_attainment:>9.2%}{m.ttft_attainment:>10.2%}"
              f"{m.dropped:>9d}{m.ttft_s.p99:>12.2f}{held_share(result):>8.2%}{time.perf_counter() - t0:>8.0f}",
              flush=True)
        rows.append((name, m))
    return rows


if __name__ == "__main__":
    args = sys.argv[1:]
    offset = 0
    if args[:1] == ["--seed-offset"]:
        if len(args) < 2 or not args[1].lstrip("-").isdigit():
            sys.exit("--seed-offset needs an integer")
        offset, args = int(args[1]), args[2:]
    unknown = [a for a in args if a not in ROUTER_NAMES]
    if unknown:
        sys.exit(f"unknown router(s) {unknown}; known: {list(ROUTER_NAMES)}")
    main(tuple(args) or ROUTER_NAMES, offset)
