"""Plan the cheapest replica mix for a fleet, its demand and its SLOs.

Reads a Problem file (YAML or JSON: accelerators, models, variants, workloads, slos, options; see
README "Input format"), computes each variant's capacity per replica at SLO for every length
bucket, solves the allocation across all models jointly within accelerator inventory, and prints
replicas per variant, the routing a request scheduler should follow, the cost, the unmet demand
and what limits the plan.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from optimizer.allocation import Allocation, allocate
from optimizer.capacity import CapacityEstimate, capacity_table
from optimizer.problem import InputError, Problem, load_problem

NAME = "plan"
HELP = "cheapest replicas per variant meeting the SLOs within inventory, and the routing to follow"


def add_arguments(parser) -> None:
    parser.add_argument("file", help="fleet + workload + SLOs, YAML or JSON (see README: Input format)")
    parser.add_argument("--output", "-o", metavar="PLAN.json", help="also write the plan as JSON")
    parser.add_argument("--capacity", action="store_true",
                        help="also print each variant's capacity per replica at SLO for every bucket")


def run(args) -> int:
    problem = load_problem(args.file)
    capacity = capacity_table(problem)
    allocation = allocate(problem, {key: est.max_rate_rps for key, est in capacity.items()})
    console = Console(width=max(110, Console().width))
    show(problem, capacity, allocation, console, with_capacity=args.capacity)
    if args.output:
        doc = plan_document(problem, capacity, allocation)
        try:
            Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            raise InputError(args.output, "--output", f"cannot write the plan ({exc.strerror or exc})") from None
        console.print(f"plan written to {args.output}")
    return 0


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
    table = Table(title="Replicas per variant", box=box.SIMPLE_HEAVY)
    for col, justify in (("variant", "left"), ("model", "left"), ("accelerators", "left"), ("role", "center"),
                         ("current", "right"), ("planned", "right"), ("cost $/h", "right"),
                         ("load", "right")):
        table.add_column(col, justify=justify)
    for name, v in variants.items():
        n = allocation.replicas.get(name, 0)
        if n == 0 and v.current_replicas == 0:
            continue
        load = allocation.normalized_load.get(name)
        table.add_row(name, v.model, f"{v.accelerators_per_replica} x {v.accelerator}", v.role.value,
                      str(v.current_replicas), f"[bold]{n}[/bold]",
                      f"{n * problem.variant_cost_per_hour(v):.2f}", "-" if load is None else f"{load:.2f}")
    console.print(table)

    routes = Table(title="Routing per (model, bucket): share of requests per variant and stage",
                   box=box.SIMPLE_HEAVY)
    for col in ("model", "bucket", "req/s", "routes"):
        routes.add_column(col, justify="right" if col == "req/s" else "left")
    for w in problem.workloads:
        for bucket, rate in w.bucket_rates_rps().items():
            legs = [r for r in allocation.routing if r.model == w.model and r.bucket == bucket and r.weight > 0]
            text = ", ".join(f"{r.variant} [{r.stage}] {r.weight:.0%}" for r in legs) or "[red]unserved[/red]"
            routes.add_row(w.model, bucket, f"{rate:.2f}", text)
    console.print(routes)

    if with_capacity:
        cap = Table(title="Capacity per replica at SLO (req/s) and what limits it", box=box.SIMPLE_HEAVY)
        cap.add_column("variant")
        cap.add_column("bucket")
        cap.add_column("req/s", justify="right")
        cap.add_column("limit")
        for (variant, bucket), est in sorted(capacity.items()):
            cap.add_row(variant, bucket, f"{est.max_rate_rps:.3f}", est.reason or est.limiting)
        console.print(cap)

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
