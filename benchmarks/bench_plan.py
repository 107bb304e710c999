"""What the user of `variant-autoscaler plan` waits for: the whole command's wall time against its
time limit, on the allocation benchmark's fleets (allocation_instances.py: 10 accelerator types,
10 buckets, binding inventory) written out as Problem files.

The limit (options.time_limit_s) covers the whole solve, capacity table included; the command
prints its own wall time (process start to last line), the solve's, and where the wait went
(start-up, capacity table, allocation and how far past its deadline it ended, output). Target
(issue 17): wall <= limit + 1 s at 100 models. Columns: the wall time measured from outside (fork
to exit), the CPU the command and its workers used, the 1-minute load average after the run (the
machine is shared: wall time stretches with it), the command's own figures, and the plan's status
and proven gap.

    .venv/bin/python benchmarks/bench_plan.py                          # 10 / 50 / 100 models, 2 s
    .venv/bin/python benchmarks/bench_plan.py --models 100 --time-limit 2 5 --runs 3
    .venv/bin/python -m pytest -q benchmarks/bench_plan.py -o python_files='bench_*.py'   # check only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from allocation_instances import make_instance

CLI = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "variant-autoscaler"
WALL = re.compile(r"wall time ([\d.]+) s \(solve ([\d.]+) s")
SOLVER = re.compile(r"solver: (\w+) \((\w+)\), proven gap ([\d.]+)%")
PHASES = re.compile(r"phases: start ([\d.]+) s, read ([\d.]+) s, capacity table ([\d.]+) s, allocation ([\d.]+) s "
                    r"\(([-+][\d.]+) s against its deadline\), output ([\d.]+) s")


def problem_file(n_models: int, time_limit_s: float, folder: Path, seed: int = 1) -> Path:
    inst = make_instance(n_models, seed=seed)
    options = inst.problem.options.model_copy(update={"time_limit_s": time_limit_s, "relative_gap": 0.01})
    path = folder / f"fleet_{n_models}_{time_limit_s:g}.json"
    path.write_text(json.dumps(inst.problem.model_copy(update={"options": options}).model_dump(mode="json")))
    return path


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_plan(path: Path) -> dict:
    t, cpu = time.perf_counter(), children_cpu_s()
    out = subprocess.run([str(CLI), "plan", str(path)], capture_output=True, text=True, timeout=600)
    outside = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"plan failed ({out.returncode}): {out.stderr.strip()}")
    wall, solve = map(float, WALL.search(out.stdout).groups())
    status, method, gap = SOLVER.search(out.stdout).groups()
    start, read, capacity, allocation, past, output = map(float, PHASES.search(out.stdout).groups())
    return {"outside_s": outside, "wall_s": wall, "solve_s": solve, "status": status, "method": method,
            "gap_pct": float(gap), "served": "All demand is served" in out.stdout, "start_s": start + read,
            "capacity_s": capacity, "allocation_s": allocation, "past_deadline_s": past, "output_s": output,
            "cpu_s": children_cpu_s() - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--time-limit", type=float, nargs="+", default=[2.0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    print("| models | limit | run | wall, outside | CPU (with workers) | load (1 min) | wall, reported | start + read "
          "| capacity table | allocation (against its deadline) | output | status | gap | all served |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for limit in args.time_limit:
            for n in args.models:
                path = problem_file(n, limit, Path(tmp))
                for run in range(1, args.runs + 1):
                    r = run_plan(path)
                    print(f"| {n} | {limit:g} s | {run} | {r['outside_s']:.2f} s | {r['cpu_s']:.2f} s "
                          f"| {os.getloadavg()[0]:.2f} | {r['wall_s']:.2f} s | {r['start_s']:.2f} s "
                          f"| {r['capacity_s']:.2f} s | {r['allocation_s']:.2f} s ({r['past_deadline_s']:+.2f} s) "
                          f"| {r['output_s']:.2f} s | {r['status']} ({r['method']}) | {r['gap_pct']:.2f} % "
                          f"| {'yes' if r['served'] else 'no'} |", flush=True)


def test_plan_reports_its_wall_time(tmp_path):
    r = run_plan(problem_file(10, 2.0, tmp_path))
    assert r["wall_s"] >= r["solve_s"] > 0
    assert r["outside_s"] >= r["wall_s"] - 0.05  # measured from outside, the process lives at least as long
    assert r["served"]
    # the phases account for the reported wall time (each is read off the same clocks)
    phases = r["start_s"] + r["capacity_s"] + r["allocation_s"] + r["output_s"]
    assert abs(phases - r["wall_s"]) <= 0.1, r
    assert r["capacity_s"] + r["allocation_s"] == pytest.approx(r["solve_s"], abs=0.02)


if __name__ == "__main__":
    main()
