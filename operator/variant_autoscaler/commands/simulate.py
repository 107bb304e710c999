"""Replay a trace on a simulated heterogeneous cluster under several autoscaling policies and compare them.

With no SCENARIO the bundled default runs (examples/scenarios/default.yaml: the example fleet's
Llama-3.1-70B variants under 30 minutes of chat traffic that rises and falls). Prints the comparison table and
writes a report folder: summary.json, table.txt and PNG plots (arrival rate, replicas over time
per variant for each policy, latency percentiles, the latency-cost Pareto front).
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

NAME = "simulate"
HELP = "compare autoscaling policies on a simulated cluster replaying a trace"

DEFAULT_SCENARIO = Path(__file__).resolve().parents[3] / "examples" / "scenarios" / "default.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", nargs="?", help="scenario YAML (default: the bundled default scenario)")
    parser.add_argument("-o", "--output", help="report folder (default: ./reports/simulate-<timestamp>/)")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel runs (default: one per CPU core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from optimizer.problem import InputError
    from optimizer.simulation.evaluation import best_homogeneous_hpa, compare, plan_runs
    from optimizer.simulation.report import TABLE_COLUMNS, table_rows, write_report
    from optimizer.simulation.scenario import load_scenario, prepare

    console = Console(width=max(150, Console().width))
    path = Path(args.scenario) if args.scenario else DEFAULT_SCENARIO
    if not path.exists():
        raise InputError(str(path), "", "scenario file not found" + ("" if args.scenario else
                         " (the bundled default lives in the repository's examples/scenarios/)"))
    if args.jobs is not None and args.jobs < 1:
        raise InputError("--jobs", "", f"must be >= 1, got {args.jobs}")
    started = time.perf_counter()
    scenario, base_dir = load_scenario(path)
    prep = prepare(scenario, base_dir, source=str(path))
    plans = plan_runs(prep)
    console.print(f"[bold]{scenario.name}[/]: {len(prep.trace)} requests of {scenario.model} over "
                  f"{prep.trace.duration_s / 60:.1f} min, {len(prep.problem.variants)} variants, {len(plans)} runs")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.no_progress, transient=True) as progress:
        task = progress.add_task("simulating", total=len(plans))

        def done(outcome):
            progress.update(task, advance=1, description=f"done {outcome.plan.label}")

        comparison = compare(prep, jobs=args.jobs, on_done=done)

    table = Table(title=f"{scenario.name}: policies compared (scored after {scenario.cluster.warmup_s:g} s warm-up)")
    for col in TABLE_COLUMNS:
        table.add_column(col, justify="left" if col == "policy" else "right")
    for row in table_rows(comparison):
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)
    best = best_homogeneous_hpa(comparison)
    ours = next((o for o in comparison.outcomes if o.plan.label == "ours"), None)
    if best is not None and ours is not None and best.metrics.cost > 0:
        saving = 1 - ours.metrics.cost / best.metrics.cost
        console.print(f"ours vs best homogeneous HPA ({escape(best.plan.label)}): {100 * saving:+.1f} % cost saving, "
                      f"SLO attainment {100 * ours.metrics.slo_attainment:.2f} % vs "
                      f"{100 * best.metrics.slo_attainment:.2f} %")
    if comparison.hypervolume:
        hv = escape(", ".join(f"{k} {v:.3f}" for k, v in comparison.hypervolume.items()))
        console.print(f"normalized hypervolume (P90 {scenario.pareto.latency.upper()} vs cost): {hv}")

    folder = Path(args.output) if args.output else Path("reports") / f"simulate-{datetime.now():%Y%m%d-%H%M%S}"
    write_report(comparison, folder)
    console.print(f"report written to {folder.resolve()} ({time.perf_counter() - started:.1f} s)")
    return 0
