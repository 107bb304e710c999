"""P->D max-flow analysis: the textbook example exactly, the Helix graph, independent cross-checks,
bottleneck classification on constructed graphs, and the `flow` command end to end."""

import json
import math
import random
import subprocess
from pathlib import Path
from types import SimpleNamespace

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog
from scipy.sparse.csgraph import maximum_flow
from variant_autoscaler.tables import RICH_TABLE_MAX_ROWS

from optimizer.flow_residual import flow_can_vary, flow_can_vary_and_reach
from optimizer.pd_flow import (
    ALGORITHMS,
    MAX_LISTED,
    MAX_SCALE_OPTIONS,
    PROBE_EDGE_BUDGET,
    FlowGraph,
    GraphFieldError,
    analyze,
    build_pd_graph,
    load_flow_graph,
    max_flow_value,
)
from optimizer.problem import InputError
from optimizer.scaled_max_flow import INT64_MIN_EDGES, NEAR_CUT_MIN_EDGES, solve

# an int32 overflow in the engine shows as a cast warning: make it fail
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pd_flow.yaml"
HELIX = ROOT.parent / "shared" / "data" / "maxflow" / "helix_single24_llama70b.json"
CLI = ROOT / ".venv" / "bin" / "variant-autoscaler"

EXAMPLE_EDGES = [("S", "P1", 60), ("S", "P2", 70), ("P1", "D1", 40), ("P1", "D2", 25),
                 ("P2", "D1", 30), ("P2", "D2", 50), ("D1", "T", 65), ("D2", "T", 55)]


def graph_of(edges, source="S", sink="T") -> FlowGraph:
    return FlowGraph(source=source, sink=sink, edges=[{"u": u, "v": v, "capacity": c} for u, v, c in edges])


def flows(analysis) -> dict[tuple[str, str], float]:
    return {(e.u, e.v): e.flow for e in analysis.edges}


def lp_max_flow(graph: FlowGraph) -> float:
    """Max flow as a linear program (HiGHS via scipy): an answer that shares no code with networkx."""
    nodes = sorted({e.u for e in graph.edges} | {e.v for e in graph.edges})
    index = {n: i for i, n in enumerate(nodes)}
    inner = [n for n in nodes if n not in (graph.source, graph.sink)]
    a_eq = np.zeros((len(inner), len(graph.edges)))
    row = {n: r for r, n in enumerate(inner)}
    objective = np.zeros(len(graph.edges))
    for j, e in enumerate(graph.edges):
        if e.u in row:
            a_eq[row[e.u], j] -= 1
        if e.v in row:
            a_eq[row[e.v], j] += 1
        objective[j] = -(e.u == graph.source) + (e.v == graph.source)
    assert index
    res = linprog(objective, A_eq=a_eq, b_eq=np.zeros(len(inner)),
                  bounds=[(0, e.capacity) for e in graph.edges], method="highs")
    assert res.status == 0, res.message
    return -res.fun


def scipy_max_flow(edges, source, sink) -> int:
    """Max flow of an integer-capacity graph by scipy's csgraph (Dinic/Edmonds-Karp in C)."""
    nodes = sorted({u for u, _, _ in edges} | {v for _, v, _ in edges})
    index = {n: i for i, n in enumerate(nodes)}
    m = sp.csr_matrix(
        ([c for _, _, c in edges], ([index[u] for u, _, _ in edges], [index[v] for _, v, _ in edges])),
        shape=(len(nodes), len(nodes)), dtype=np.int64,
    )
    return int(maximum_flow(m, index[source], index[sink]).flow_value)


def assert_is_a_maximum_flow(graph: FlowGraph, analysis):
    """Capacity bounds, conservation at every node, and a cut whose capacity equals the flow."""
    net: dict[str, float] = {}
    for e in analysis.edges:
        assert -1e-9 <= e.flow <= (e.capacity if e.capacity is not None else float("inf")) + 1e-9
        net[e.u] = net.get(e.u, 0.0) - e.flow
        net[e.v] = net.get(e.v, 0.0) + e.flow
    for node, balance in net.items():
        if node not in (graph.source, graph.sink):
            assert balance == pytest.approx(0.0, abs=1e-6), f"flow not conserved at {node}"
    assert -net[graph.source] == pytest.approx(analysis.max_flow, rel=1e-9)
    assert net[graph.sink] == pytest.approx(analysis.max_flow, rel=1e-9)
    assert sum(c.capacity for c in analysis.min_cut) == pytest.approx(analysis.max_flow, rel=1e-9)
    assert sum(c.capacity for c in analysis.sink_side_min_cut) == pytest.approx(analysis.max_flow, rel=1e-9)
    by_edge = {(e.u, e.v): e for e in analysis.edges}
    assert all(by_edge[c.u, c.v].saturated for c in analysis.min_cut + analysis.sink_side_min_cut)


# --- the worked example ---------------------------------------------------------------------------


def test_example_reproduces_the_textbook_answer():
    a = analyze(load_flow_graph(EXAMPLE))
    assert a.max_flow == pytest.approx(120)
    assert a.layout == "prefill-decode"
    assert a.bottleneck == "decode"
    assert {(c.u, c.v) for c in a.min_cut} == {("D1", "T"), ("D2", "T")}
    assert a.min_cut_unique
    shares = {(s.prefill, s.decode): round(100 * s.share, 1) for s in a.kv_schedule}
    assert shares == {("P1", "D1"): 33.3, ("P1", "D2"): 16.7, ("P2", "D1"): 20.8, ("P2", "D2"): 29.2}
    spare = {(e.u, e.v): e.spare for e in a.edges if e.spare}
    assert spare == {("S", "P2"): 10, ("P1", "D2"): 5, ("P2", "D1"): 5, ("P2", "D2"): 15}
    assert a.several_optimal_splits
    text = " ".join(a.recommendations)
    assert "Adding prefill capacity will not raise throughput: all decode edges are saturated" in text
    assert "Adding KV link capacity will not raise throughput" in text
    assert "one of several optimal" in text
    assert_is_a_maximum_flow(load_flow_graph(EXAMPLE), a)


def test_example_split_is_networkx_edmonds_karp_and_independent_of_edge_order():
    g = nx.DiGraph()
    for u, v, c in EXAMPLE_EDGES:
        g.add_edge(u, v, capacity=c)
    _, direct = nx.maximum_flow(g, "S", "T", flow_func=nx.algorithms.flow.edmonds_karp)
    expected = {(u, v): direct[u][v] for u, v, _ in EXAMPLE_EDGES}
    assert flows(analyze(graph_of(EXAMPLE_EDGES))) == expected
    rng = random.Random(7)
    for _ in range(5):
        shuffled = EXAMPLE_EDGES[:]
        rng.shuffle(shuffled)
        assert flows(analyze(graph_of(shuffled))) == expected


def test_scale_options_match_an_independent_recomputation():
    a = analyze(graph_of(EXAMPLE_EDGES))
    assert {(o.u, o.v) for o in a.scale_options} == {("D1", "T"), ("D2", "T")}
    big = sum(c for _, _, c in EXAMPLE_EDGES)
    for o in a.scale_options:
        relaxed = [(u, v, big if (u, v) == (o.u, o.v) else c) for u, v, c in EXAMPLE_EDGES]
        assert o.max_flow_if_unlimited == pytest.approx(scipy_max_flow(relaxed, "S", "T"))
        assert o.gain_if_unlimited == pytest.approx(o.max_flow_if_unlimited - 120)
        assert o.gain_if_unlimited > 0


# --- the real Helix placement graph ----------------------------------------------------------------


@pytest.fixture(scope="module")
def helix():
    if not HELIX.exists():
        pytest.skip(f"../shared not present: {HELIX} is missing")
    return load_flow_graph(HELIX)


def test_helix_max_flow_value_and_validity(helix):
    a = analyze(helix)
    assert a.max_flow == pytest.approx(1289.5558, abs=1e-3)
    assert a.max_flow == pytest.approx(lp_max_flow(helix), rel=1e-7)
    assert a.layout == "generic"
    assert_is_a_maximum_flow(helix, a)


def test_every_networkx_algorithm_agrees_on_helix(helix):
    values = {name: max_flow_value(helix, name) for name in ALGORITHMS}
    assert all(v == pytest.approx(1289.5558, abs=1e-3) for v in values.values()), values


# --- independent cross-checks on random graphs -----------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_random_pd_graphs_match_scipy(seed):
    rng = random.Random(seed)
    prefill = {f"P{i}": rng.randint(0, 40) for i in range(rng.randint(1, 4))}
    decode = {f"D{i}": rng.randint(0, 40) for i in range(rng.randint(1, 4))}
    links = {(p, d): rng.randint(0, 30) * 1000 for p in prefill for d in decode if rng.random() < 0.7}
    links.setdefault((rng.choice(sorted(prefill)), rng.choice(sorted(decode))), 7000)
    graph = build_pd_graph(prefill, decode, links, kv_bytes_per_request=1000)
    a = analyze(graph)
    ints = [(e.u, e.v, int(e.capacity)) for e in graph.edges]
    assert a.max_flow == pytest.approx(scipy_max_flow(ints, "source", "sink"))
    assert_is_a_maximum_flow(graph, a)
    assert sum(s.share for s in a.kv_schedule) == pytest.approx(1.0 if a.max_flow > 0 else 0.0)


def test_unique_flow_is_not_flagged_as_one_of_several():
    a = analyze(graph_of([("S", "A", 5), ("A", "B", 3), ("B", "T", 9)]))
    assert a.max_flow == 3
    assert not a.several_optimal_splits
    assert not any(e.flow_can_vary for e in a.edges)


# --- bottleneck classification ---------------------------------------------------------------------


def test_prefill_bound_graph():
    a = analyze(build_pd_graph({"P1": 10, "P2": 15}, {"D1": 40, "D2": 40}, None, kv_bytes_per_request=1e6))
    assert a.max_flow == pytest.approx(25)
    assert a.bottleneck == "prefill"
    assert {(c.u, c.v) for c in a.min_cut} == {("source", "P1"), ("source", "P2")}
    assert any(r.startswith("Adding decode capacity will not raise throughput") for r in a.recommendations)
    assert {o.stage for o in a.scale_options} == {"prefill"}


def test_kv_bound_graph_and_link_capacity_from_bandwidth():
    kv_bytes = 2e9
    links = {("P1", "D1"): 10e9, ("P2", "D2"): 8e9}
    graph = build_pd_graph({"P1": 100, "P2": 100}, {"D1": 100, "D2": 100}, links, kv_bytes_per_request=kv_bytes)
    caps = {(e.u, e.v): e.capacity for e in graph.edges}
    assert caps["P1", "D1"] == pytest.approx(10e9 / kv_bytes)
    assert ("P1", "D2") not in caps
    a = analyze(graph)
    assert a.max_flow == pytest.approx(9)
    assert a.bottleneck == "kv_links"
    assert any(r.startswith("Adding prefill capacity will not raise throughput") for r in a.recommendations)


def test_unlimited_links_connect_every_pair():
    graph = build_pd_graph({"P1": 1, "P2": 1}, {"D1": 1, "D2": 1, "D3": 1}, None, kv_bytes_per_request=1)
    middle = [(e.u, e.v, e.capacity) for e in graph.edges if e.u.startswith("P")]
    assert len(middle) == 6 and all(c is None for _, _, c in middle)


def test_mixed_and_tied_bottlenecks():
    mixed = analyze(build_pd_graph({"P1": 5, "P2": 50}, {"D1": 50, "D2": 8},
                                   {("P1", "D1"): 50, ("P2", "D2"): 50}, kv_bytes_per_request=1))
    assert mixed.max_flow == pytest.approx(13)
    assert mixed.bottleneck == "mixed"
    assert {(c.u, c.v) for c in mixed.min_cut} == {("source", "P1"), ("D2", "sink")}
    tied = analyze(build_pd_graph({"P1": 30}, {"D1": 30}, None, kv_bytes_per_request=1))
    assert tied.bottleneck == "mixed"
    assert not tied.min_cut_unique
    assert tied.scale_options == []
    assert any("scale them together" in r for r in tied.recommendations)


def test_generic_graph_is_classified_by_position():
    chain = [("s", "a", 10), ("a", "b", 10), ("b", "c", 10), ("c", "d", 10), ("d", "e", 10), ("e", "t", 2)]
    a = analyze(graph_of(chain, "s", "t"))
    assert a.layout == "generic" and a.kv_schedule == []
    assert a.bottleneck == "decode"
    near_source = [(u, v, 2 if (u, v) == ("a", "b") else c) for u, v, c in chain[:-1]] + [("e", "t", 10)]
    assert analyze(graph_of(near_source, "s", "t")).bottleneck == "prefill"


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc, field", [
    ({"source": "S", "sink": "T", "edges": [{"u": "S", "v": "T", "capacity": -1}]}, "edges[0].capacity"),
    ({"source": "S", "sink": "S", "edges": [{"u": "S", "v": "T", "capacity": 1}]}, "sink"),
    ({"source": "X", "sink": "T", "edges": [{"u": "S", "v": "T", "capacity": 1}]}, "source"),
    ({"source": "S", "sink": "T", "nodes": ["S", "T"],
      "edges": [{"u": "S", "v": "T", "capacity": 1}, {"u": "S", "v": "Q", "capacity": 1}]}, "edges[1].v"),
    ({"source": "S", "sink": "T", "edges": [{"u": "S", "v": "A", "capacity": 1},
                                             {"u": "B", "v": "T", "capacity": 1}]}, "sink"),
    ({"source": "S", "sink": "T", "edges": [{"u": "S", "v": "T", "capacity": 1},
                                             {"u": "S", "v": "T", "capacity": 2}]}, "edges[1]"),
    ({"source": "S", "sink": "T", "edges": [{"u": "S", "v": "T"}]}, "edges[0].capacity"),
])
def test_bad_graphs_name_the_field(tmp_path, doc, field):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError) as err:
        load_flow_graph(path)
    assert err.value.field == field
    assert err.value.source == str(path)


def test_extra_keys_are_ignored_and_unlimited_path_is_an_error():
    g = FlowGraph.model_validate({"source": "S", "sink": "T", "max_flow": 3,
                                  "edges": [{"u": "S", "v": "T", "capacity": 3, "flow": 99}]})
    assert analyze(g).max_flow == 3
    with pytest.raises(GraphFieldError):
        analyze(graph_of([("S", "A", None), ("A", "T", None)]))
    with pytest.raises(GraphFieldError):
        build_pd_graph({"P1": 1}, {"D1": 1}, {("P9", "D1"): 5}, kv_bytes_per_request=1)


# --- the command ----------------------------------------------------------------------------------


def cli(*args, cwd=ROOT):
    return subprocess.run([str(CLI), "flow", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_cli_prints_the_analysis():
    out = cli("examples/pd_flow.yaml")
    assert out.returncode == 0, out.stderr
    assert "Max flow 120" in out.stdout
    assert "bottleneck: decode" in out.stdout
    assert "33.3" in out.stdout and "29.2" in out.stdout


def test_cli_prints_a_large_edge_table_as_plain_columns(tmp_path):
    """Past RICH_TABLE_MAX_ROWS rows the edge table is plain columns: every edge on its own line,
    its marks in the last column, no table borders."""
    k = 9
    graph = build_pd_graph({f"P{i}": 10.0 + i for i in range(k)}, {f"D{j}": 12.0 for j in range(k)},
                           {(f"P{i}", f"D{j}"): 3.0 for i in range(k) for j in range(k)}, kv_bytes_per_request=1)
    assert len(graph.edges) > RICH_TABLE_MAX_ROWS
    path = tmp_path / "large.json"
    path.write_text(graph.model_dump_json())
    out = cli(path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for e in analyze(graph).edges:
        row = [ln for ln in lines if ln.startswith(f"{e.u} → {e.v} ")]
        assert len(row) == 1, (e.u, e.v)
        assert ("saturated" in row[0]) == e.saturated
    assert "─" not in out.stdout.split("KV transfer schedule")[0]  # no rich borders in the edge table


def test_cli_json_and_plot(tmp_path):
    png = tmp_path / "flow.png"
    out = cli("examples/pd_flow.yaml", "--json", "--plot", png)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["max_flow"] == pytest.approx(120)
    assert doc["bottleneck"] == "decode"
    assert {(e["u"], e["v"]) for e in doc["min_cut"]} == {("D1", "T"), ("D2", "T")}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000


@pytest.mark.parametrize("text, name, field", [
    ("source: S\nsink: T\nedges:\n  - {u: S, v: T, capacity: -5}\n", "neg.yaml", "edges[0].capacity"),
    ("source: S\nsink: T\nedges: [unclosed\n", "broken.yaml", "not valid YAML"),
    ("source: S\nsink: T\nedges:\n  - {u: S, v: A, capacity: null}\n  - {u: A, v: T, capacity: .inf}\n",
     "inf.yaml", "edges"),
])
def test_cli_bad_files_exit_2_with_one_line(tmp_path, text, name, field):
    path = tmp_path / name
    path.write_text(text)
    out = cli(path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert str(path) in out.stderr and field in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# --- the compiled engine: real capacities on scipy's integer Dinic ---------------------------------


def random_graph(seed: int) -> FlowGraph:
    """A random DAG-plus-back-edges graph: float capacities over six orders of magnitude, some
    antiparallel pairs, some unlimited edges (never a whole source-sink path of them)."""
    rng = random.Random(seed)
    n = rng.randint(6, 40)
    edges = {}
    for i in range(n - 1):
        edges[i, rng.randint(i + 1, n - 1)] = None
    for _ in range(rng.randint(n, 5 * n)):
        a, b = rng.sample(range(n), 2)
        edges[a, b] = None
    out = []
    for (a, b) in edges:
        cap = rng.choice([rng.uniform(0, 10), rng.uniform(0, 1e4), 10 ** rng.uniform(-3, 3), rng.randint(0, 50)])
        if a != 0 and b != n - 1 and rng.random() < 0.15:
            cap = None
        out.append((f"n{a}", f"n{b}", cap))
    return graph_of(out, "n0", f"n{n - 1}")


@pytest.mark.parametrize("seed", range(20))
def test_random_graphs_match_networkx_and_scipy(seed):
    graph = random_graph(seed)
    a = analyze(graph)
    assert a.max_flow == pytest.approx(max_flow_value(graph, "preflow_push"), rel=1e-9, abs=1e-12)
    assert a.max_flow == pytest.approx(max_flow_value(graph, "boykov_kolmogorov"), rel=1e-9, abs=1e-12)
    assert 0 <= a.max_flow_gap <= 1e-12 * max(1.0, a.max_flow)
    assert_is_a_maximum_flow(graph, a)
    # the same graph in whole units: scipy's own answer, exactly
    ints = [(e.u, e.v, 10**6 if e.capacity is None else round(e.capacity * 100)) for e in graph.edges]
    assert analyze(graph_of(ints, "n0", graph.sink)).max_flow == scipy_max_flow(ints, "n0", graph.sink)


def test_capacities_beyond_32_bits_are_not_wrapped():
    """scipy's maximum_flow keeps capacities in int32 and silently wraps larger ones (3e9 -> 0 flow)."""
    wide = [("S", "A", 3e9), ("A", "T", 5e9), ("S", "B", 7.25e12), ("B", "T", 1e13)]
    a = analyze(graph_of(wide))
    assert a.max_flow == 3e9 + 7.25e12
    assert scipy_max_flow([(u, v, int(c)) for u, v, c in wide[:2]], "S", "T") != 3e9


def test_rounding_is_down_then_certified():
    """Capacities that no power-of-two resolution represents: the flow never exceeds a capacity and
    the reported gap bounds the distance to the LP optimum."""
    thirds = [("S", "A", 1 / 3), ("S", "B", 2 / 3), ("A", "B", 1 / 7), ("A", "T", 0.1), ("B", "T", 1e9 / 3)]
    graph = graph_of(thirds)
    a = analyze(graph)
    assert all(e.flow <= e.capacity for e in a.edges)
    exact = lp_max_flow(graph)
    assert a.max_flow <= exact + 1e-15
    assert exact - a.max_flow <= a.max_flow_gap + 1e-15
    assert a.max_flow == pytest.approx(0.1 + 1 / 7 + 2 / 3, rel=1e-12)


# --- the linear-time residual analysis against a per-edge brute force ------------------------------


def residual_digraph(analysis) -> nx.MultiDiGraph:
    """The residual graph of the reported flow, one arc per edge direction, keyed by edge."""
    r = nx.MultiDiGraph()
    for i, e in enumerate(analysis.edges):
        r.add_node(e.u)
        r.add_node(e.v)
        if not e.saturated:
            r.add_edge(e.u, e.v, key=(i, "fwd"))
        if e.flow > 0:
            r.add_edge(e.v, e.u, key=(i, "bwd"))
    return r


def brute_force_can_vary(analysis) -> list[bool]:
    """Per edge, the definition: a residual cycle through one of its arcs that is not the 2-cycle of
    its own two arcs, i.e. a path back that avoids both of them."""
    r = residual_digraph(analysis)
    out = []
    for i, e in enumerate(analysis.edges):
        without = r.copy()
        for key in ((i, "fwd"), (i, "bwd")):
            if without.has_edge(*((e.u, e.v) if key[1] == "fwd" else (e.v, e.u)), key=key):
                without.remove_edge(*((e.u, e.v) if key[1] == "fwd" else (e.v, e.u)), key=key)
        up = not e.saturated and nx.has_path(without, e.v, e.u)
        down = e.flow > 0 and nx.has_path(without, e.u, e.v)
        out.append(up or down)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_linear_time_analysis_matches_per_edge_brute_force(seed):
    graph = random_graph(seed) if seed % 2 else build_pd_graph(
        {f"P{i}": random.Random(seed).uniform(1, 40) for i in range(5)},
        {f"D{i}": random.Random(seed + 1).uniform(1, 40) for i in range(4)},
        {(f"P{i}", f"D{j}"): random.Random(seed * 31 + i * 7 + j).uniform(0, 30) for i in range(5) for j in range(4)
         if (i + j + seed) % 3},
        kv_bytes_per_request=1.0)
    a = analyze(graph)
    assert [e.flow_can_vary for e in a.edges] == brute_force_can_vary(a)
    assert a.several_optimal_splits == any(e.flow_can_vary for e in a.edges)
    r = residual_digraph(a)
    source_side = nx.descendants(r, graph.source) | {graph.source}
    sink_side = nx.ancestors(r, graph.sink) | {graph.sink}
    on_path = {(e.u, e.v) for e in a.edges if e.stage != "off_path"}
    assert {(c.u, c.v) for c in a.min_cut} == {
        uv for uv in on_path if uv[0] in source_side and uv[1] not in source_side}
    assert {(c.u, c.v) for c in a.sink_side_min_cut} == {
        uv for uv in on_path if uv[0] not in sink_side and uv[1] in sink_side}
    every_cut = {uv for uv in on_path if uv[0] in source_side and uv[1] in sink_side}
    assert a.scale_options_total == len(every_cut)
    assert {(o.u, o.v) for o in a.scale_options} <= every_cut
    for o in a.scale_options:  # small graphs: every option re-solved, against networkx
        assert not o.gain_is_bound
        if o.max_flow_if_unlimited is not None:
            relaxed = graph_of([(e.u, e.v, None if (e.u, e.v) == (o.u, o.v) else e.capacity) for e in graph.edges],
                               graph.source, graph.sink)
            assert o.max_flow_if_unlimited == pytest.approx(max_flow_value(relaxed, "preflow_push"), rel=1e-9)


def sparse_graph(seed: int) -> FlowGraph:
    """A random tree from the source plus a few extra edges (some antiparallel) and a path to the
    sink: many partly used edges, bridges among them, few residual cycles."""
    rng = random.Random(seed)
    n = rng.randint(8, 60)
    edges = {(rng.randrange(i), i): None for i in range(1, n)}
    for _ in range(rng.randint(1, n // 2)):
        a, b = rng.sample(range(n), 2)
        edges[a, b] = None
    edges.update({(i, n): None for i in rng.sample(range(1, n), max(1, n // 4))})
    return graph_of([(f"n{a}", f"n{b}", rng.choice([rng.uniform(0.5, 20), rng.randint(1, 9)]))
                     for a, b in edges], "n0", f"n{n}")


@pytest.mark.parametrize("seed", range(40))
def test_flow_can_vary_matches_the_per_edge_definition(seed):
    """flow_can_vary (two strong-components passes, bridges only among what they leave open)
    against the per-edge definition, brute_force_can_vary, on graphs the test above does not
    draw: sparse ones with bridges, more random ones with twins, and layered ones on the 64-bit
    engine's flow; and the sink side it reads off its contracted graph."""
    graph = (sparse_graph, lambda s: random_graph(s + 100), layered_real_graph)[seed % 3](seed)
    a = analyze(graph)
    assert [e.flow_can_vary for e in a.edges] == brute_force_can_vary(a)
    c = graph._compiled
    r = solve(c.layout, c.capacity, c.source, c.sink, int64_min_edges=0)
    varies, reach = flow_can_vary_and_reach(c.layout, r.forward, r.backward, c.sink)
    assert np.array_equal(varies, brute_force_can_vary_of(graph, r.flow, r.forward, r.backward))
    assert np.array_equal(varies, flow_can_vary(c.layout, r.forward, r.backward))
    # the sink side read off the contracted graph = a search of the whole residual graph into the sink
    assert np.array_equal(reach, r.sink_side)


def brute_force_can_vary_of(graph: FlowGraph, flow, forward, backward) -> list[bool]:
    """brute_force_can_vary for a solver's arrays (edges in canonical order)."""
    edges = [SimpleNamespace(u=u, v=v, saturated=not forward[i], flow=float(flow[i]) if backward[i] else 0.0)
             for i, (u, v) in enumerate(graph._compiled.ends)]
    return brute_force_can_vary(SimpleNamespace(edges=edges))


def test_large_graph_lists_are_capped_and_gains_bounded():
    """Past the probe budget the gains are residual-capacity bounds, and sentences name at most
    MAX_LISTED edges; the edge list still holds every edge."""
    k = 60
    graph = build_pd_graph({f"P{i}": 10.0 + i for i in range(k)}, {f"D{j}": 1e4 for j in range(k)},
                           {(f"P{i}", f"D{j}"): 50.0 for i in range(k) for j in range(k)}, kv_bytes_per_request=1)
    assert 0 < PROBE_EDGE_BUDGET // len(graph.edges) < k  # some options re-solved, not all
    a = analyze(graph)
    assert a.bottleneck == "prefill" and a.max_flow == pytest.approx(sum(10.0 + i for i in range(k)))
    assert a.scale_options_total == k and len(a.scale_options) == MAX_SCALE_OPTIONS
    probed = [o for o in a.scale_options if not o.gain_is_bound]
    assert len(probed) == PROBE_EDGE_BUDGET // len(graph.edges)
    for o in a.scale_options:
        # P_i alone unlimited: its 60 links of 50 carry 3000, the decode side has room for it all
        assert o.gain_if_unlimited == pytest.approx(3000.0 - (10.0 + int(o.v[1:])), rel=1e-9)
    text = " ".join(a.recommendations)
    assert f"{k - MAX_LISTED} more edges are on every minimum cut" in text
    assert "and 50 more" in text
    assert len(a.edges) == len(graph.edges)


def layered_real_graph(seed: int) -> FlowGraph:
    """source -> P_i -> D_j -> sink with real capacities and no antiparallel edges, some KV links
    and one P->P hop unlimited: the refining phase then runs on the graph near the cut alone."""
    rng = random.Random(seed)
    k = rng.randint(3, 25)
    edges = [("S", f"P{i}", rng.uniform(5, 50)) for i in range(k)]
    edges += [(f"D{j}", "T", rng.uniform(5, 50)) for j in range(k)]
    edges += [(f"P{i}", f"D{j}", None if rng.random() < 0.05 else rng.uniform(0.5, 5))
              for i in range(k) for j in range(k) if rng.random() < 0.6]
    edges.append(("P0", "P1", None if seed % 2 else rng.uniform(0, 3)))
    return graph_of(edges, "S", "T")


def assert_solver_result_is_a_maximum_flow(graph: FlowGraph, r) -> None:
    """The solver's own arrays: within capacity, conserved, and a source-side cut of its value."""
    c = graph._compiled
    tail, head = c.layout.tail, c.layout.head
    assert np.all(r.flow >= 0) and np.all(r.flow <= c.capacity)
    net = np.bincount(head, weights=r.flow, minlength=len(c.names)) - np.bincount(tail, weights=r.flow,
                                                                                minlength=len(c.names))
    inner = np.ones(len(c.names), dtype=bool)
    inner[[c.source, c.sink]] = False
    assert np.abs(net[inner]).max(initial=0.0) <= 1e-9
    assert net[c.sink] == pytest.approx(r.value, rel=1e-12)
    cut = r.source_side[tail] & ~r.source_side[head]
    assert not r.source_side[c.sink]
    assert c.capacity[cut].sum() == pytest.approx(r.value, rel=1e-9)


@pytest.mark.parametrize("seed", range(20))
def test_refining_near_the_cut_gives_the_exact_maximum(seed):
    graph = layered_real_graph(seed)
    c = graph._compiled
    r = solve(c.layout, c.capacity, c.source, c.sink, near_cut_min_edges=0)
    if r.phases > 1:  # a second phase was needed: it ran near the cut
        assert r.near_cut_phases == r.phases - 1
    assert r.value == pytest.approx(max_flow_value(graph, "preflow_push"), rel=1e-9, abs=1e-12)
    assert r.value == pytest.approx(lp_max_flow(graph), rel=1e-9)
    assert r.value == pytest.approx(c.solve().value, rel=1e-12)  # the whole-graph refinement
    assert 0 <= r.gap <= 1e-12 * max(1.0, r.value)
    assert_solver_result_is_a_maximum_flow(graph, r)


@pytest.mark.parametrize("seed", range(10))
def test_refining_near_the_cut_with_barely_unsaturated_edges(seed):
    """Edges squeezed to just above a maximum flow's value on them (residual 1e-7..1e-5, below the
    width the refinement trusts): the trees it routes through stop at them, and the answer stays
    exact and conserved."""
    g = layered_real_graph(seed)
    c = g._compiled
    first = c.solve()
    rng = random.Random(seed)
    edges = [(u, v, cap if cap is None or not 0 < first.flow[i] < cap or rng.random() >= 0.3
              else float(first.flow[i]) + rng.uniform(1e-7, 1e-5))
             for i, ((u, v), cap) in enumerate(zip(c.ends, c.capacities, strict=True))]
    graph = graph_of(edges, "S", "T")
    s = graph._compiled
    r = solve(s.layout, s.capacity, s.source, s.sink, near_cut_min_edges=0)
    assert r.value == pytest.approx(max_flow_value(graph, "preflow_push"), rel=1e-9)
    assert r.value == pytest.approx(lp_max_flow(graph), rel=1e-9)
    assert_solver_result_is_a_maximum_flow(graph, r)


def test_refining_near_the_cut_is_used_on_real_capacities():
    """Most of the 20 graphs above need a refining phase, and none falls back to the whole graph."""
    refined = [solve(g._compiled.layout, g._compiled.capacity, g._compiled.source, g._compiled.sink,
                     near_cut_min_edges=0) for g in map(layered_real_graph, range(20))]
    assert sum(r.near_cut_phases > 0 for r in refined) >= 15
    assert all(r.phases - r.near_cut_phases <= 1 for r in refined)


def test_analysis_of_a_graph_large_enough_for_the_int64_engine():
    """From INT64_MIN_EDGES edges the analysis takes one 64-bit OR-Tools phase, certified like the
    32-bit ones; scipy with the near-cut refinement (the path below it) gives the same maximum."""
    rng = random.Random(11)
    k = 240
    edges = [("S", f"P{i}", rng.uniform(5, 50)) for i in range(k)] + [(f"D{j}", "T", rng.uniform(5, 50))
                                                                        for j in range(k)]
    edges += [(f"P{i}", f"D{j}", rng.uniform(0.5, 5)) for i in range(k) for j in range(k) if rng.random() < 0.55]
    graph = graph_of(edges, "S", "T")
    assert len(edges) >= max(INT64_MIN_EDGES, NEAR_CUT_MIN_EDGES)
    a = analyze(graph)
    c = graph._compiled
    r = c.solve()
    assert (r.engine, r.phases) == ("ortools_push_relabel", 1)
    assert a.algorithm == "ortools_push_relabel"
    assert a.max_flow == pytest.approx(max_flow_value(graph, "preflow_push"), rel=1e-9)
    assert 0 <= a.max_flow_gap <= 1e-12 * a.max_flow
    assert_is_a_maximum_flow(graph, a)
    assert_solver_result_is_a_maximum_flow(graph, r)
    dinic = solve(c.layout, c.capacity, c.source, c.sink, int64_min_edges=len(edges) + 1)
    assert dinic.engine == "scipy_dinic" and dinic.near_cut_phases >= 1
    assert abs(dinic.value - r.value) <= dinic.gap + r.gap


@pytest.mark.parametrize("seed", range(20))
def test_int64_engine_gives_the_exact_maximum(seed):
    """OR-Tools' 64-bit push-relabel forced onto small graphs: the value of networkx and of the LP,
    certified in one phase, a feasible conserved flow; graphs with twin edges stay on scipy."""
    for graph in (layered_real_graph(seed), random_graph(seed)):
        c = graph._compiled
        r = solve(c.layout, c.capacity, c.source, c.sink, int64_min_edges=0)
        assert r.engine == ("scipy_dinic" if c.layout.has_twins else "ortools_push_relabel")
        assert r.value == pytest.approx(max_flow_value(graph, "preflow_push"), rel=1e-9, abs=1e-12)
        assert r.value == pytest.approx(lp_max_flow(graph), rel=1e-9, abs=1e-9)
        assert 0 <= r.gap <= 1e-12 * max(1.0, r.value)
        assert np.all(r.flow >= 0) and np.all(r.flow <= c.capacity)
    assert_solver_result_is_a_maximum_flow(graph := layered_real_graph(seed),
                                           solve(graph._compiled.layout, graph._compiled.capacity,
                                                 graph._compiled.source, graph._compiled.sink, int64_min_edges=0))


def test_a_64_bit_phase_that_leaves_a_gap_is_refined():
    """20k parallel two-edge paths with real capacities: the 64-bit phase rounds down 20k cut edges,
    which leaves more than GAP_REL of the value, and a near-cut phase closes it to the exact answer
    (the sum over paths of the smaller capacity)."""
    rng = random.Random(5)
    k = 20_000
    ins = [rng.uniform(1, 2) for _ in range(k)]
    outs = [rng.uniform(1, 2) for _ in range(k)]
    graph = graph_of([("S", f"M{i}", c) for i, c in enumerate(ins)] + [(f"M{i}", "T", c) for i, c in enumerate(outs)])
    r = graph._compiled.solve()
    assert r.engine == "ortools_push_relabel" and r.phases >= 2 and r.near_cut_phases == r.phases - 1
    exact = math.fsum(min(a, b) for a, b in zip(ins, outs, strict=True))
    assert r.value == pytest.approx(exact, rel=1e-12)
    assert 0 <= r.gap <= 1e-12 * r.value
    assert_solver_result_is_a_maximum_flow(graph, r)
