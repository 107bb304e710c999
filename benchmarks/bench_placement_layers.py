"""Layer placement on Helix's reference clusters against Helix's published max flows.

Run: .venv/bin/python -m pytest -q benchmarks/bench_placement_layers.py -s
 or: .venv/bin/python benchmarks/bench_placement_layers.py [--time-limit 60]

Uses the measured per-layer tables in ../shared (Helix's own), so that node throughputs are the
ones Helix priced its placements with; prints, per cluster, our max flow, when it was reached, the
proven upper bound and Helix's published figures. Also prints how far the reconstructed node
throughputs are from the capacities in Helix's own graph of its single-cluster MILP placement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from optimizer.placement.cluster import load_cluster  # noqa: E402
from optimizer.placement.layers import place_layers  # noqa: E402
from optimizer.placement.throughput import NodeThroughputModel, layer_time_sources  # noqa: E402

SHARED = REPO.parent / "shared"
PROFILES = SHARED / "data" / "profiles" / "helix"
HELIX_GRAPH = SHARED / "data" / "maxflow" / "helix_single24_llama70b.json"
TIME_LIMIT = float(os.environ.get("PLACEMENT_BENCH_TIME", "60"))

# Published max flows (tokens/s), LLaMA-2-70B (Helix, ASPLOS'25).
PUBLISHED = {
    "helix_single24.yaml": {"Helix MILP": 1289.56, "Petals": 952.11, "Swarm": 757.85, "homogeneous": 531.70},
    "helix_3region24.yaml": {"Helix MILP": 1212.18, "Petals": 952.11, "Swarm": 616.38},
    "helix_hetero42.yaml": {"Petals": 3292.24, "Swarm": 4892.24},
}


def reconstruction_error() -> float:
    """Largest relative gap between our node throughputs and the start->end capacities of Helix's graph."""
    cluster = load_cluster(REPO / "examples" / "clusters" / "helix_single24.yaml")
    model = cluster.model("llama-2-70b")
    tm = NodeThroughputModel(cluster, model, layer_time_sources(cluster, model, PROFILES))
    graph = json.loads(HELIX_GRAPH.read_text())
    worst = 0.0
    for e in graph["edges"]:
        if e["u"].endswith("_start"):
            worst = max(worst, min(abs(row[k] / e["capacity"] - 1) for row in tm.table.values()
                                   for k in range(1, len(row))))
    return worst


def run_cluster(name: str, time_limit: float, model: str = "llama-2-70b"):
    cluster = load_cluster(REPO / "examples" / "clusters" / name)
    m = cluster.model(model)
    tm = NodeThroughputModel(cluster, m, layer_time_sources(cluster, m, PROFILES))
    began = time.monotonic()
    result = place_layers(cluster, m, tm, time_limit_s=time_limit)
    total = time.monotonic() - began
    reached = min(t for t, _, v in result.timeline if v >= result.max_flow * (1 - 1e-9))
    return result, reached, total


def report(time_limit: float) -> list[str]:
    lines = [f"node-throughput reconstruction vs Helix's single-cluster graph: max {reconstruction_error():.4%} off"]
    for name, published in PUBLISHED.items():
        result, reached, total = run_cluster(name, time_limit)
        refs = ", ".join(f"{k} {v:.2f} ({result.max_flow / v:.2f}x)" for k, v in published.items())
        lines.append(f"{name}: ours {result.max_flow:.2f} tokens/s reached at {reached:.2f} s "
                     f"(run {total:.1f} s, limit {time_limit:.0f} s); upper bound {result.bound.upper_bound:.2f} "
                     f"(gap {result.gap:.1%}); {refs}")
    return lines


@pytest.mark.skipif(not PROFILES.is_dir(), reason="../shared not present: Helix's measured profiles are needed")
def test_layer_placement_against_helix_published_flows():
    lines = report(TIME_LIMIT)
    print("\n" + "\n".join(lines))
    assert "ours" in lines[-1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT)
    args = parser.parse_args()
    if not PROFILES.is_dir():
        sys.exit(f"../shared not present: {PROFILES}")
    print("\n".join(report(args.time_limit)))
