"""How fast the allocation proves a 1 % gap: 10 / 50 / 100 models x 10 accelerator types x 10 buckets.

Inventory binds on purpose (the cheapest types hold 60 % of what demand wants, see
allocation_instances.py), which is what makes the problem hard. Target: gap <= 1 % in <= 2 s.
Wall time depends on the machine's load, so CPU seconds (this process + its solver workers) are
printed too; on an idle 2-core machine the wall time is about parent CPU + workers' CPU / 2.

    .venv/bin/python benchmarks/bench_allocation.py                  # table, time limit 2 s and 60 s
    .venv/bin/python benchmarks/bench_allocation.py --seeds 3 --models 100 --time-limit 60
    .venv/bin/python benchmarks/bench_allocation.py --warm 0 0.1 1   # also the next cycle, warm-started
    .venv/bin/python benchmarks/bench_allocation.py --models 10 --seeds 3 --time-limit 20 --gap 0.001

`--warm SHARES`: after each solve, the next control cycle: the demand of that share of the models
moves (each by a factor drawn from 0.95-1.05), and the allocation is solved again with the same
limit, cold (rows `cold<share>`) and warm-started from the first solve (`Allocation.warm_start`,
rows `warm<share>`; share 0: the very same problem again).
    .venv/bin/python -m pytest -q benchmarks/bench_allocation.py -o python_files='bench_*.py' -s
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import pytest
from allocation_instances import make_instance

from optimizer.allocation import allocate
from optimizer.problem import AllocationOptions


def measure(n_models: int, seed: int, time_limit_s: float, sizes_per_accelerator: int = 1,
            warm_shares: tuple[float, ...] = (), relative_gap: float = 0.01) -> list[dict]:
    """The cold solve's row, then one warm-started row per share in `warm_shares` (see the module doc)."""
    inst = make_instance(n_models, seed=seed, sizes_per_accelerator=sizes_per_accelerator)
    first, a = _solve(inst.problem, inst.capacity, n_models, seed, time_limit_s, None, relative_gap)
    rows = [first]
    for share in warm_shares:
        moved = _moved(inst.problem, share, seed)
        if share > 0:
            row, _ = _solve(moved, inst.capacity, n_models, seed, time_limit_s, None, relative_gap)
            rows.append({**row, "method": f"cold{share:g}"})
        row, _ = _solve(moved, inst.capacity, n_models, seed, time_limit_s, a.warm_start, relative_gap)
        rows.append({**row, "method": f"warm{share:g}"})
    return rows


def _moved(problem, share: float, seed: int):
    """`problem` with the demand of `share` of its models scaled by a factor from 0.95-1.05."""
    rng = np.random.default_rng(1000 + seed)
    workloads = []
    for w in problem.workloads:
        moves = rng.random() < share
        factor = float(rng.uniform(0.95, 1.05))
        workloads.append(w.model_copy(update={"arrival_rate_rps": w.arrival_rate_rps * factor}) if moves else w)
    return problem.model_copy(update={"workloads": workloads})


def _solve(problem, capacity, n_models: int, seed: int, time_limit_s: float, warm_start, relative_gap: float = 0.01):
    opts = problem.options.model_copy(update={"time_limit_s": time_limit_s, "relative_gap": relative_gap})
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, wall = time.process_time(), time.perf_counter()
    a = allocate(problem, capacity, options=AllocationOptions.model_validate(opts.model_dump()),
                 warm_start=warm_start)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    exhausted = [b.split()[2] for b in a.binding_constraints if b.startswith("inventory of")]
    return {
        "models": n_models, "variants": len(problem.variants), "seed": seed, "limit_s": time_limit_s,
        "method": a.method, "status": a.status, "wall_s": wall, "cpu_s": cpu, "worker_cpu_s": workers,
        "objective": a.objective, "bound": a.lower_bound, "gap_pct": 100 * a.gap, "rounds": a.iterations,
        "exhausted": ",".join(exhausted),
    }, a


def _line(r: dict) -> str:
    return (f"{r['models']:>4} {r['variants']:>5} {r['seed']:>4} {r['limit_s']:>6g} {r['method']:>13} "
            f"{r['status']:>11} {r['wall_s']:>7.2f} {r['cpu_s']:>6.2f} {r['worker_cpu_s']:>7.2f} "
            f"{r['objective']:>10.2f} {r['bound']:>10.2f} {r['gap_pct']:>6.3f} {r['rounds']:>3}  {r['exhausted']}")


HEADER = ("models  vars seed limit_s        method      status  wall_s  cpu_s workers  objective      bound "
          " gap_%  rd  exhausted")


@pytest.mark.parametrize("n_models", [10, 50, 100])
def test_allocation_gap_and_time(n_models):
    r = measure(n_models, seed=1, time_limit_s=2.0)[0]
    print("\n" + HEADER + "\n" + _line(r))
    assert r["bound"] <= r["objective"] + 1e-9
    assert r["exhausted"], "the benchmark must bind inventory"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--time-limit", type=float, nargs="+", default=[2.0, 60.0])
    parser.add_argument("--sizes-per-accelerator", type=int, default=1,
                        help="accelerators-per-replica options per accelerator type (2 doubles the variants)")
    parser.add_argument("--gap", type=float, default=0.01,
                        help="relative gap at which the allocation may stop (the issue's 20 s goal is 0.001)")
    parser.add_argument("--warm", type=float, nargs="*", default=[],
                        help="after each solve, re-solve warm with this share of the models' demand moved")
    args = parser.parse_args()
    print(HEADER)
    for limit in args.time_limit:
        for n in args.models:
            for seed in range(1, args.seeds + 1):
                for row in measure(n, seed, limit, args.sizes_per_accelerator, tuple(args.warm), args.gap):
                    print(_line(row), flush=True)


if __name__ == "__main__":
    main()
