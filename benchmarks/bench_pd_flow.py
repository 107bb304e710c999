"""Which networkx max-flow algorithm is fastest on a real placement graph, and what analysis costs.

The Helix graph (100 nodes, 105 edges, long chains of compute stages) is the shape the `flow`
command meets. `optimizer.pd_flow.VALUE_ALGORITHM` is chosen from these figures; the reported split
stays Edmonds-Karp whatever wins, so it is reproducible.

    .venv/bin/python -m pytest -q benchmarks/bench_pd_flow.py --benchmark-columns=min,median,mean,rounds
"""

from pathlib import Path

import networkx as nx
import pytest

from optimizer.pd_flow import ALGORITHMS, analyze, load_flow_graph

HELIX = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "maxflow" / "helix_single24_llama70b.json"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pd_flow.yaml"
HELIX_MAX_FLOW = 1289.5558


@pytest.fixture(scope="module")
def helix():
    if not HELIX.exists():
        pytest.skip(f"../shared not present: {HELIX} is missing")
    graph = load_flow_graph(HELIX)
    return graph, graph.to_networkx()


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_max_flow_value_helix(benchmark, helix, name):
    graph, g = helix
    value = benchmark(nx.maximum_flow_value, g, graph.source, graph.sink, flow_func=ALGORITHMS[name])
    assert value == pytest.approx(HELIX_MAX_FLOW, abs=1e-3)


def test_analyze_helix(benchmark, helix):
    graph, _ = helix
    result = benchmark(analyze, graph)
    assert result.max_flow == pytest.approx(HELIX_MAX_FLOW, abs=1e-3)


def test_analyze_example(benchmark):
    graph = load_flow_graph(EXAMPLE)
    result = benchmark(analyze, graph)
    assert result.max_flow == pytest.approx(120)
