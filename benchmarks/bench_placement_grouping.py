"""P/D grouping ablation on the reference clusters: spectral+KL against random and greedy groupings.

Run: .venv/bin/python -m pytest -q benchmarks/bench_placement_grouping.py -s
 or: .venv/bin/python benchmarks/bench_placement_grouping.py [--time-limit 10] [--sweep]

Per cluster and model: max flow (requests/s) of each method with the same evaluator, and by how
much spectral+KL beats the random mean, the best random seed and greedy. Uses the measured Helix
per-layer tables from ../shared when present, the clusters' inline profiles otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from optimizer.placement.ablation import bandwidth_sweep, format_sweep, grouping_ablation  # noqa: E402
from optimizer.placement.cluster import load_cluster  # noqa: E402
from optimizer.placement.throughput import layer_time_sources  # noqa: E402

PROFILES = REPO.parent / "shared" / "data" / "profiles" / "helix"
TIME_LIMIT = float(os.environ.get("PLACEMENT_BENCH_GROUP_TIME", "10"))
CASES = [
    ("helix_single24.yaml", "llama-2-70b"),
    ("helix_single24.yaml", "llama-30b"),
    ("helix_3region24.yaml", "llama-2-70b"),
    ("helix_3region24.yaml", "llama-30b"),
    ("helix_hetero42.yaml", "llama-2-70b"),
]


def report(time_limit: float, sweep: bool = False) -> tuple[list[str], list[tuple[str, float, float, float]]]:
    profiles = PROFILES if PROFILES.is_dir() else None
    lines = [f"per-layer times: {'measured (../shared)' if profiles else 'inline fits'}; seeds 10; "
             f"spectral+KL limit {time_limit:.0f} s"]
    margins = []
    for name, model in CASES:
        cluster = load_cluster(REPO / "examples" / "clusters" / name)
        m = cluster.model(model)
        times = layer_time_sources(cluster, m, profiles)
        began = time.monotonic()
        rows, _ = grouping_ablation(cluster, m, times, seeds=10, time_limit_s=time_limit)
        took = time.monotonic() - began
        ours, rmean, rbest, greedy = (r.max_flow_rps for r in rows)
        lines.append(
            f"{name} {model}: spectral+KL {ours:.3f} req/s ({rows[0].groups} groups, {rows[0].cost_per_hour:.2f}/h, "
            f"TTFT {rows[0].ttft_s or float('nan'):.2f} s, ITL {rows[0].itl_s or float('nan'):.3f} s) | "
            f"random mean {rmean:.3f} (+{_gain(ours, rmean)}) best {rbest:.3f} (+{_gain(ours, rbest)}) | "
            f"greedy {greedy:.3f} (+{_gain(ours, greedy)}) [{took:.1f} s]")
        margins.append((f"{name}/{model}", ours, rmean, greedy))
        if sweep and name == "helix_3region24.yaml" and model == "llama-30b":
            lines.append(format_sweep(bandwidth_sweep(cluster, m, times, time_limit_s=min(3.0, time_limit))))
    return lines, margins


def _gain(ours: float, other: float) -> str:
    return "inf" if other <= 0 else f"{(ours / other - 1) * 100:.0f}%"


def test_spectral_kl_against_random_and_greedy_on_reference_clusters():
    lines, margins = report(TIME_LIMIT, sweep=True)
    print("\n" + "\n".join(lines))
    for case, ours, rmean, greedy in margins:
        assert ours >= rmean and ours >= greedy, case


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT)
    parser.add_argument("--sweep", action="store_true", help="also sweep the KV-link bandwidth (3-region, 30B)")
    args = parser.parse_args()
    print("\n".join(report(args.time_limit, args.sweep)[0]))
