"""Replay a trace on a simulated heterogeneous cluster under several autoscaling policies and compare them.

With no SCENARIO the bundled default runs (examples/scenarios/default.yaml: three models of the example
fleet sharing its GPU inventory under chat traffic shaped like the Azure LLM inference trace). Prints the
comparison table (per model too, when several share the fleet), the verdict against the HPA users run
today, and writes a report folder: summary.json, table.txt and PNG plots (arrival rate, replicas over time
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
    from optimizer.simulation.evaluation import compare, expected_runs
    from optimizer.simulation.report import (
        MODEL_COLUMNS,
        TABLE_COLUMNS,
        TUNING_COLUMNS,
        model_rows,
        table_rows,
        tuning_rows,
        write_report,
    )
    from optimizer.simulation.scenario import load_scenario, prepare
    from optimizer.simulation.verdict import verdict

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
    total = expected_runs(prep)
    traffic = ", ".join(f"{len(m.trace)} of {m.model}" for m in prep.per_model)
    inventory = ", ".join(f"{a.available} {a.name}" for a in prep.problem.accelerators if a.available is not None)
    console.print(f"[bold]{escape(scenario.name)}[/]: {traffic} requests over {prep.trace.duration_s / 60:.1f} min, "
                  f"{len(prep.problem.variants)} variants sharing {inventory or 'unlimited inventory'}, {total} runs")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.no_progress, transient=True) as progress:
        task = progress.add_task("simulating", total=total)

        def done(outcome):
            progress.update(task, advance=1, description=f"done {outcome.plan.label}")

        comparison = compare(prep, jobs=args.jobs, on_done=done)

    def show(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], left: int = 1) -> None:
        table = Table(title=title)
        for k, col in enumerate(columns):
            table.add_column(col, justify="left" if k < left else "right")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)

    show(f"{escape(scenario.name)}: policies compared (scored after {scenario.cluster.warmup_s:g} s warm-up)",
         TABLE_COLUMNS, table_rows(comparison))
    if scenario.multi_model:
        show("per model", MODEL_COLUMNS, model_rows(comparison), left=2)
    if comparison.tuning:
        show("HPA tuning: each model alone on the fleet, every PD variant and target (* = chosen)",
             TUNING_COLUMNS, tuning_rows(comparison), left=2)
    if comparison.hypervolume:
        hv = escape(", ".join(f"{k} {v:.3f}" for k, v in comparison.hypervolume.items()))
        console.print(f"normalized hypervolume (P90 {scenario.pareto.latency.upper()} vs cost): {hv}")
        hv = escape(", ".join(f"{k} {v:.3f}" for k, v in comparison.hypervolume_at_target.items()))
        console.print(f"  the same, counting only runs at >= 99 % attainment: {hv}")

    for line in verdict(comparison).lines:
        console.print(escape(line))

    folder = Path(args.output) if args.output else Path("reports") / f"simulate-{datetime.now():%Y%m%d-%H%M%S}"
    write_report(comparison, folder)
    console.print(f"report written to {folder.resolve()} ({time.perf_counter() - started:.1f} s)")
    return 0
