"""Bad input files: every command that reads one answers with one line naming the file, exit code 2.

The CLI runs in-process (`variant_autoscaler.cli.main(argv)`), the same code path as the console
script, so these tests are fast; `test_plan_command.py` and friends cover the real subprocess.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from variant_autoscaler.cli import EXIT_BAD_INPUT, main
from variant_autoscaler.resources import InvalidResource, parse_variant
from variant_autoscaler.settings import load_settings_file

from optimizer.problem import InputError, read_text
from optimizer.profile_data import ProfileDataError, load_helix_layer_times, load_splitwise

# Valid UTF-8 (bytes 0-11, "é" as two bytes), then at byte 12 a Latin-1 "é" (0xe9) that is not a UTF-8 sequence.
NOT_UTF8 = b"name: caf\xc3\xa9\n\xe9t\xe9: 1\n"
FIRST_BAD_BYTE = 12
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Exit code, stderr lines and stdout of one in-process CLI run."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


@pytest.mark.parametrize("command", ["plan", "flow", "place", "simulate"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_every_command_reports_a_file_that_is_not_utf8(command, suffix, tmp_path, capsys):
    path = tmp_path / f"input{suffix}"
    path.write_bytes(NOT_UTF8)
    code, err, _ = run_cli([command, str(path)], capsys)
    assert code == EXIT_BAD_INPUT
    assert err == [f"error: {path}: not UTF-8 text (byte {FIRST_BAD_BYTE})"]


@pytest.mark.parametrize("command", ["plan", "flow", "place", "simulate"])
def test_every_command_reports_a_binary_file(command, tmp_path, capsys):
    path = tmp_path / "picture.yaml"
    path.write_bytes(BINARY)
    code, err, _ = run_cli([command, str(path)], capsys)
    assert code == EXIT_BAD_INPUT
    assert err == [f"error: {path}: not UTF-8 text (byte 0)"]


def test_operator_settings_file_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "settings.yaml"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(InputError) as info:
        load_settings_file(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte {FIRST_BAD_BYTE})"
    code, err, _ = run_cli(["run", "--settings", str(path)], capsys)
    assert code == EXIT_BAD_INPUT
    assert err == [f"error: {path}: not UTF-8 text (byte {FIRST_BAD_BYTE})"]


def test_measured_profile_tables_that_are_not_utf8(tmp_path):
    helix = tmp_path / "helix"
    helix.mkdir()
    (helix / "prompt_bs2time.csv").write_bytes(b"1,2\n2,3\n\xff\n")
    (helix / "decode_bs2time.csv").write_text("1,2\n2,3\n")
    with pytest.raises(ProfileDataError, match=r"prompt_bs2time.csv: not UTF-8 text \(byte 8\)$"):
        load_helix_layer_times(helix)
    splitwise = tmp_path / "perf_model.csv"
    splitwise.write_bytes(BINARY)
    with pytest.raises(ProfileDataError, match=r"perf_model.csv: not UTF-8 text \(byte 0\)$"):
        load_splitwise(splitwise)


def test_the_shared_reader_keeps_utf8_text_and_names_unreadable_files(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_bytes("model: Llama-3.1-8B  # ünïcödé\n".encode())
    assert read_text(path) == "model: Llama-3.1-8B  # ünïcödé\n"
    with pytest.raises(InputError, match="cannot read file"):
        read_text(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="cannot read file"):
        read_text(Path(tmp_path))


# --- numbers out of bounds: one line naming file and field, exit 2 (tracebacks before the bounds) ---

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FLEET = EXAMPLES / "fleet.yaml"
SMALL_CLUSTER = EXAMPLES / "clusters" / "helix_small10.yaml"
PD_FLOW = EXAMPLES / "pd_flow.yaml"
FAST_PLACE = ["--time-limit", "2", "--group-time-limit", "1"]


def mutated(source: Path, path: str, value, tmp_path: Path) -> Path:
    """`source` with the value at `path` (dots and [i]) replaced, written as YAML (so .inf stays .inf)."""
    doc = yaml.safe_load(source.read_text())
    keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
    node = doc
    for k in keys[:-1]:
        node = node[k] if isinstance(node, list) else node.setdefault(k, {})
    node[keys[-1]] = value
    out = tmp_path / f"mutated{source.suffix}"
    out.write_text(yaml.safe_dump(doc))
    return out


@pytest.mark.parametrize(("path", "value", "words"), [
    ("accelerators[0].cost_per_hour", 1e304, "less than or equal to 1000000"),  # was RuntimeError from the LP
    ("accelerators[0].cost_per_hour", math.inf, "finite number"),
    ("workloads[0].arrival_rate_rps", math.inf, "finite number"),  # was OverflowError
    ("workloads[0].arrival_rate_rps", math.nan, "finite number"),
    ("workloads[0].buckets[0].input_tokens", 1e304, "less than or equal to 10000000"),
    ("workloads[0].priority", 1e-300, "greater than or equal to 0.001"),  # was RuntimeError from the LP
    ("variants[0].max_batch", 10**9, "less than or equal to 100000"),  # was 60 s+ of work, MemoryError at 1e18
    ("variants[0].accelerators_per_replica", 10**18, "less than or equal to 10000"),  # was SolveStatus.ABNORMAL
    ("variants[0].max_replicas", 10**6, "less than or equal to 10000"),
    ("variants[0].profile.decode_base_s", 1e304, "less than or equal to 3600"),
    ("options.time_limit_s", 1e9, "less than or equal to 3600"),
])
def test_plan_rejects_numbers_out_of_bounds(path, value, words, tmp_path, capsys):
    doc = mutated(FLEET, path, value, tmp_path)
    code, err, _ = run_cli(["plan", str(doc)], capsys)
    assert code == EXIT_BAD_INPUT
    assert len(err) == 1 and err[0].startswith(f"error: {doc}: {path}: ") and words in err[0], err


def test_plan_with_a_vanishing_profile_still_plans(tmp_path, capsys):
    """A decode step of 1e-300 s is within bounds; its absurd capacity must not reach the LP (was RuntimeError)."""
    doc = mutated(FLEET, "variants[0].profile.decode_base_s", 1e-300, tmp_path)
    code, err, out = run_cli(["plan", str(doc)], capsys)
    assert code == 0, err
    assert "Replicas per variant" in out


@pytest.mark.parametrize(("path", "value", "field", "words"), [
    ("models[0].weight_gb", math.inf, "models[0].weight_gb", "finite number"),  # was OverflowError
    ("models[0].kv_bytes_per_token_layer", 1e304, "models[0].kv_bytes_per_token_layer", "less than or equal"),
    ("models[0].kv_bytes_per_token_layer", 1e8, "models[0]", "KV bytes per token of all layers (6e+09) exceed 1e+09"),
    ("nodes[0].count", 10**9, "nodes[0].count", "less than or equal to 1000"),  # was still running after 20 s
    ("nodes[0].count", 999, "nodes", "1005 nodes in all"),
    ("machine_types[0].models.llama-30b.usable_memory_gb", math.inf,
     "machine_types[0].models.llama-30b.usable_memory_gb", "finite number"),  # was OverflowError
    ("machine_types[0].models.llama-30b.layer_profile.decode_base_s", 100.0, "machine_types[0].models.llama-30b",
     "60 layers of 100 s take more than 3600 s"),
    ("network.default.gb_s", 1e304, "network.default.gb_s", "less than or equal to 100000"),
])
def test_place_rejects_numbers_out_of_bounds(path, value, field, words, tmp_path, capsys):
    doc = mutated(SMALL_CLUSTER, path, value, tmp_path)
    code, err, _ = run_cli(["place", str(doc), *FAST_PLACE], capsys)
    assert code == EXIT_BAD_INPUT
    assert len(err) == 1 and err[0].startswith(f"error: {doc}: {field}") and words in err[0], err


@pytest.mark.parametrize(("path", "value"), [
    ("models[0].kv_bytes_per_token_layer", 1e7),  # no KV room on any node: was ZeroDivisionError
    ("machine_types[0].models.llama-30b.layer_profile.decode_base_s", 50.0),  # L4 serves ~nothing: was ZeroDivisionError
    ("machine_types[0].models.llama-30b.layer_memory_gb", 1000.0),  # a layer fills an L4: was ZeroDivisionError
])
def test_place_on_a_cluster_that_cannot_serve_says_so(path, value, tmp_path, capsys):
    doc = mutated(SMALL_CLUSTER, path, value, tmp_path)
    code, err, _ = run_cli(["place", str(doc), "--mode", "layers", *FAST_PLACE], capsys)
    assert code == EXIT_BAD_INPUT
    assert err == [f"error: {doc}: nodes: no placement of llama-30b covers all 60 layers on helix-small-10"]


def test_place_with_tiny_kv_bytes_still_places(tmp_path, capsys):
    """1e-300 bytes per token is within bounds; the KV links it implies are unlimited, not a crash."""
    doc = mutated(SMALL_CLUSTER, "models[0].kv_bytes_per_token_layer", 1e-300, tmp_path)
    code, err, out = run_cli(["place", str(doc), "--mode", "groups", *FAST_PLACE], capsys)
    assert code == 0, err
    assert "P/D groups" in out


@pytest.mark.parametrize(("value", "code", "words"), [
    (1e304, EXIT_BAD_INPUT, "must be at most 1e+15"),
    (math.nan, EXIT_BAD_INPUT, "capacity"),
    (math.inf, 0, ""),  # .inf is documented as unlimited
])
def test_flow_capacity_bounds(value, code, words, tmp_path, capsys):
    doc = mutated(PD_FLOW, "edges[0].capacity", value, tmp_path)
    got, err, _ = run_cli(["flow", str(doc)], capsys)
    assert got == code, err
    if code:
        assert len(err) == 1 and err[0].startswith(f"error: {doc}: edges[0].capacity") and words in err[0], err


@pytest.mark.parametrize(("text", "field"), [
    ("accelerators: [{name: H100, cost_per_hour: 1e304}]", "accelerators[0].cost_per_hour"),
    ("accelerators: [{name: H100, cost_per_hour: 1.0, available: 100000000000}]", "accelerators[0].available"),
    ("interval_s: .nan", "interval_s"),
    ("optimizer_time_limit_s: .inf", "optimizer_time_limit_s"),
    ("scale_down_window_s: 1.0e+300", "scale_down_window_s"),
    ("prometheus: {url: 'http://p:9090', timeout_s: .inf}", "prometheus.timeout_s"),
    ("models: [{name: m, weight_gb: 1.0e+300, kv_bytes_per_token: 1}]", "models[0].weight_gb"),
])
def test_operator_settings_reject_numbers_out_of_bounds(text, field, tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text(text + "\n")
    with pytest.raises(InputError) as info:
        load_settings_file(path)
    assert info.value.field == field and "\n" not in str(info.value)


def variant_autoscaling(**spec) -> dict:
    return {"metadata": {"name": "v", "namespace": "ns"},
            "spec": {"scaleTargetRef": {"name": "d"}, "modelID": "meta-llama/Llama-3.1-8B-Instruct", **spec}}


@pytest.mark.parametrize(("spec", "field"), [
    ({"variantCost": "9" * 400}, "spec.variantCost"),  # the CRD's pattern allows it; float() makes it inf
    ({"minReplicas": 10**6}, "spec.minReplicas"),
    ({"maxReplicas": 10**30}, "spec.maxReplicas"),
    ({"acceleratorCount": 10**9}, "spec.acceleratorCount"),
    ({"maxBatch": 10**12}, "spec.maxBatch"),
    ({"priority": 1e-300}, "spec.priority"),
    ({"priority": math.inf}, "spec.priority"),
    ({"slo": {"ttftSeconds": math.inf, "itlSeconds": 0.05}}, "spec.slo.ttft_s"),
    ({"profile": {"parametric": {"decodeBaseSeconds": 1e304, "prefillPerTokenSeconds": 1e-5}}},
     "spec.profile.decode_base_s"),
])
def test_variant_autoscaling_rejects_numbers_out_of_bounds(spec, field):
    with pytest.raises(InvalidResource) as info:
        parse_variant(variant_autoscaling(**spec))
    assert info.value.field == field and info.value.condition_reason == "InvalidSpec"


# --- place on a cluster too big to search within the limit: best answer, with a status ---

def test_place_on_a_thousand_nodes_returns_its_best_answer_at_the_time_limit(tmp_path, capsys):
    """1,000 nodes: the stage-chain search alone ran for minutes before; now each search stops at its limit."""
    doc = yaml.safe_load(SMALL_CLUSTER.read_text())
    doc["nodes"] = [{"type": "L4", "count": 400}, {"type": "T4", "count": 600}]
    path = tmp_path / "thousand.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = tmp_path / "place.json"
    code, err, text = run_cli(["place", str(path), "--time-limit", "1", "--group-time-limit", "1", "--no-milp",
                               "--output", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    layers, grouping = report["layer_placement"], report["grouping"]
    assert layers["status"] == "time_limit" and grouping["status"] == "time_limit"
    assert text.count("stopped by the time limit: best found so far") == 2
    covered = sorted(layer for r in layers["placement"]["ranges"] for layer in range(r["start"], r["start"] + r["layers"]))
    assert covered == list(range(60))
    assert 0 < layers["max_flow"] <= layers["bound"]["upper_bound"]
    assert grouping["max_flow_rps"] > 0 and grouping["variants"]


def test_place_on_a_small_cluster_completes(tmp_path, capsys):
    out = tmp_path / "place.json"
    code, err, _ = run_cli(["place", str(SMALL_CLUSTER), "--time-limit", "10", "--group-time-limit", "2",
                            "--output", str(out)], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["layer_placement"]["status"] == "complete"
