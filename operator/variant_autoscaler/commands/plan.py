"""Plan the cheapest replica mix for a fleet, its demand and its SLOs.

Reads a Problem file (YAML or JSON: accelerators, models, variants, workloads, slos, options; see
README "Input format"), computes each variant's capacity per replica at SLO for every length
bucket, solves the allocation across all models jointly within accelerator inventory, and prints
replicas per variant, the routing a request scheduler should follow, the cost, the unmet demand
and what limits the plan.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

from optimizer.allocation import Allocation, allocate
from optimizer.capacity import CapacityEstimate, capacity_table
from optimizer.problem import InputError, Problem, load_problem
from variant_autoscaler.tables import print_table

NAME = "plan"
HELP = "cheapest replicas per variant meeting the SLOs within inventory, and the routing to follow"


def add_arguments(parser) -> None:
    parser.add_argument("file", help="fleet + workload + SLOs, YAML or JSON (see README: Input format)")
    parser.add_argument("--output", "-o", metavar="PLAN.json", help="also write the plan as JSON")
    parser.add_argument("--capacity", action="store_true",
                        help="also print each variant's capacity per replica at SLO for every bucket")


def run(args) -> int:
    started_s, entered = command_wall_s(), time.perf_counter()  # started_s: interpreter, imports
    problem = load_problem(args.file)
    began = time.perf_counter()
    capacity = capacity_table(problem)
    capacity_s = time.perf_counter() - began
    deadline = began + solve_budget_s(problem.options.time_limit_s, command_wall_s())
    allocation = allocate(problem, {key: est.max_rate_rps for key, est in capacity.items()}, deadline=deadline)
    solved = time.perf_counter()
    solve_s = solved - began
    console = Console(width=max(110, Console().width))
    show(problem, capacity, allocation, console, with_capacity=args.capacity)
    if args.output:
        doc = plan_document(problem, capacity, allocation)
        try:
            Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            raise InputError(args.output, "--output", f"cannot write the plan ({exc.strerror or exc})") from None
        console.print(f"plan written to {args.output}")
    console.print(f"wall time {command_wall_s():.2f} s (solve {solve_s:.2f} s: capacity table + allocation, "
                  f"time limit {problem.options.time_limit_s:g} s)", highlight=False)
    # where the wait went, so an overrun names its phase (benchmarks/bench_plan.py reads this line)
    console.print(f"phases: start {started_s:.2f} s, read {began - entered:.2f} s, capacity table "
                  f"{capacity_s:.2f} s, allocation {solved - began - capacity_s:.2f} s "
                  f"({solved - deadline:+.2f} s against its deadline), output {time.perf_counter() - solved:.2f} s",
                  highlight=False, soft_wrap=True)
    return 0


# What the user waits for is the command: it answers by about time_limit_s + WALL_SLACK_S after it
# started. The solve (capacity table, LPs, MILPs, rounding) takes at most the limit, less when
# starting up (interpreter, imports, reading the file) ate into the slack; PRINT_S is kept for the
# tables. The roundings that serve the demand are always built, so a very short limit can overrun.
WALL_SLACK_S = 1.0
PRINT_S = 0.3


def solve_budget_s(time_limit_s: float, started_s_ago: float) -> float:
    return min(time_limit_s, time_limit_s + WALL_SLACK_S - PRINT_S - started_s_ago)


_BOLD, _UNSERVED = "[bold]{}[/bold]", "[red]unserved[/red]"
def command_wall_s() -> float:
    """Seconds since this process started (Linux /proc: interpreter start and imports included)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"), time.process_time())
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED_AT


_IMPORTED_AT = time.perf_counter()


def plan_document(problem: Problem, capacity: dict[tuple[str, str], CapacityEstimate],
                  allocation: Allocation) -> dict:
    """The plan as plain JSON: the allocation plus the capacities it was computed from."""
    per_variant: dict[str, dict] = {}
    for (variant, bucket), est in sorted(capacity.items()):
        per_variant.setdefault(variant, {})[bucket] = est.model_dump(exclude={"variant", "bucket"})
    return {
        "allocation": allocation.model_dump(mode="json"),
        "capacity_per_replica": per_variant,
        "variants": {
            v.name: {"model": v.model, "accelerator": v.accelerator,
                     "accelerators_per_replica": v.accelerators_per_replica, "role": v.role.value,
                     "current_replicas": v.current_replicas,
                     "cost_per_hour_per_replica": problem.variant_cost_per_hour(v)}
            for v in problem.variants
        },
    }


def show(problem: Problem, capacity, allocation: Allocation, console: Console, *, with_capacity: bool) -> None:
    variants = {v.name: v for v in problem.variants}
    rows = []
    for name, v in variants.items():
        n = allocation.replicas.get(name, 0)
        if n == 0 and v.current_replicas == 0:
            continue
        load = allocation.normalized_load.get(name)
        rows.append([name, v.model, f"{v.accelerators_per_replica} x {v.accelerator}", v.role.value,
                     str(v.current_replicas), _BOLD.format(n),
                     f"{n * problem.variant_cost_per_hour(v):.2f}", "-" if load is None else f"{load:.2f}"])
    print_table(console, "Replicas per variant", [
        ("variant", "left"), ("model", "left"), ("accelerators", "left"), ("role", "center"),
        ("current", "right"), ("planned", "right"), ("cost $/h", "right"), ("load", "right")], rows)

    legs: dict[tuple[str, str], list] = {}
    for r in allocation.routing:
        if r.weight > 0:
            legs.setdefault((r.model, r.bucket), []).append(r)
    rows = []
    for w in problem.workloads:
        for bucket, rate in w.bucket_rates_rps().items():
            text = ", ".join(f"{r.variant} [{r.stage}] {r.weight:.0%}" for r in legs.get((w.model, bucket), ()))
            rows.append([w.model, bucket, f"{rate:.2f}", text or _UNSERVED])
    print_table(console, "Routing per (model, bucket): share of requests per variant and stage",
           [("model", "left"), ("bucket", "left"), ("req/s", "right"), ("routes", "left")], rows)

    if with_capacity:
        rows = [[variant, bucket, f"{est.max_rate_rps:.3f}", est.reason or est.limiting]
                for (variant, bucket), est in sorted(capacity.items())]
        print_table(console, "Capacity per replica at SLO (req/s) and what limits it",
               [("variant", "left"), ("bucket", "left"), ("req/s", "right"), ("limit", "left")], rows)

    unmet = {m: r for m, r in allocation.unmet_demand_rps.items() if r > 1e-9}
    console.print(f"[bold]Cost {allocation.cost_per_hour:.2f} $/h[/bold]"
                  + (f" (+ change penalty {allocation.change_cost_per_hour:.2f})"
                     if allocation.change_cost_per_hour else ""))
    if unmet:
        console.print("[bold red]Unmet demand:[/bold red] "
                      + ", ".join(f"{m} {r:.2f} req/s" for m, r in sorted(unmet.items())))
    else:
        console.print("All demand is served at SLO.")
    for line in allocation.binding_constraints:
        console.print(f"  limit: {line}")
    for line in allocation.notes:
        console.print(f"  note: {line}")
    console.print(f"solver: {allocation.status} ({allocation.method}), proven gap {allocation.gap:.2%}, "
                  f"{allocation.solve_time_s * 1000:.0f} ms")
