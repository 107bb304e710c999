"""Property-based: malformed documents never crash a reader, never hang, always name file and field.

Each parser gets >= 500 generated documents, every one of them invalid by construction: a small
valid document with 1-3 mutations that no field accepts (a non-finite or absurd number, a string or
a list where a number goes, an unknown key, a mapping or list replaced by a scalar), or a file that
is not UTF-8, not YAML or not a mapping. The CLI runs in-process (`cli.main(argv)`), so a document
costs milliseconds. Asserted for the commands `plan`, `flow`, `place`, `simulate`: exit code 2, one
line on stderr `error: FILE: FIELD: reason` naming the mutated field, no exception. For the
operator: a VariantAutoscaling gives InvalidResource with the field and a Condition reason; a
settings ConfigMap gives one line naming the field, and the last good settings stay in force.
Work stays bounded because the base documents carry small time limits and are rejected before
any solve.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from variant_autoscaler.cli import EXIT_BAD_INPUT, main
from variant_autoscaler.resources import InvalidResource, parse_variant
from variant_autoscaler.settings import SettingsStore, parse_settings, settings_from_configmap

from optimizer.problem import InputError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_PER_PARSER = 500
FUZZ = settings(max_examples=EXAMPLES_PER_PARSER, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Values no numeric field accepts: every field is finite and bounded on both sides (input_limits).
BAD_NUMBERS = [math.inf, -math.inf, math.nan, 1e304, -1e304, 10**30, -(10**30), "abc", [1], {"x": 1}]
UNKNOWN_KEY = "zz_unknown_key"

PLAN_BASE = {
    "accelerators": [{"name": "L4", "memory_gb": 24, "cost_per_hour": 1.15, "available": 8, "power_w": 72}],
    "models": [{"name": "m8b", "weight_gb": 16, "kv_bytes_per_token": 131072, "num_layers": 32, "params_b": 8}],
    "variants": [{"name": "m8b-l4", "model": "m8b", "accelerator": "L4", "accelerators_per_replica": 1,
                  "max_batch": 64, "min_replicas": 0, "max_replicas": 8, "current_replicas": 1,
                  "profile": {"kind": "parametric", "decode_base_s": 0.02, "decode_per_seq_s": 2e-4,
                              "decode_per_kv_token_s": 1e-8, "prefill_base_s": 1e-3, "prefill_per_token_s": 1e-4}}],
    "workloads": [{"model": "m8b", "arrival_rate_rps": 2.0, "priority": 1.0,
                   "buckets": [{"input_tokens": 500, "output_tokens": 200, "share": 1.0, "input_tokens_cv": 0.5}]}],
    "slos": [{"model": "m8b", "ttft_s": 2.0, "itl_s": 0.1, "percentile": 90}],
    "options": {"time_limit_s": 0.5, "relative_gap": 0.01, "service_level": 0.9, "kv_transfer_gb_s": 25,
                "change_penalty_per_replica": 0.1},
}

SCENARIO_BASE = {
    "name": "fuzz",
    "fleet": "fleet.yaml",
    "model": "m8b",
    "trace": {"source": "generated", "duration_s": 60, "seed": 1, "arrivals": {"kind": "poisson", "rate_rps": 1.0}},
    "cluster": {"warmup_s": 0},
    "policies": [{"kind": "static-peak"}],
    "pareto": None,
}

VARIANT_BASE = {
    "apiVersion": "autoscaling.variant-autoscaler.io/v1alpha1", "kind": "VariantAutoscaling",
    "metadata": {"name": "v", "namespace": "ns", "generation": 1},
    "spec": {"scaleTargetRef": {"name": "d"}, "modelID": "meta-llama/Llama-3.1-8B-Instruct", "accelerator": "L4",
             "acceleratorCount": 1, "maxBatch": 64, "minReplicas": 1, "maxReplicas": 4, "priority": 2,
             "slo": {"ttftSeconds": 1.0, "itlSeconds": 0.05, "percentile": 90},
             "profile": {"parametric": {"decodeBaseSeconds": 0.01, "decodePerSeqSeconds": 1e-4,
                                        "prefillPerTokenSeconds": 1e-4}}},
}

SETTINGS_BASE = {
    "interval_s": 30, "rate_window_s": 60, "staleness_threshold_s": 60, "scale_up_window_s": 0,
    "scale_down_window_s": 300, "max_change_per_cycle": 4, "default_max_batch": 256, "change_penalty": 0.1,
    "kv_transfer_gb_s": 25, "service_level": 0.9, "optimizer_time_limit_s": 1, "api_retries": 3,
    "api_backoff_s": 0.2,
    "prometheus": {"url": "http://127.0.0.1:9090", "timeout_s": 5, "retries": 1},
    "accelerators": [{"name": "L4", "cost_per_hour": 1.15, "available": 8, "memory_gb": 24}],
    "models": [{"name": "meta-llama/Llama-3.1-8B-Instruct", "weight_gb": 16, "kv_bytes_per_token": 131072,
                "priority": 1, "slo": {"ttft_s": 1, "itl_s": 0.05, "percentile": 90},
                "length_mix": [{"input_tokens": 512, "output_tokens": 256, "share": 1.0}]}],
    "default_slo": {"ttft_s": 2, "itl_s": 0.1},
}


# --- documents and their paths -------------------------------------------------------------------

def nodes(doc, path=()):
    """(path, value) of every node below the root."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield (*path, key), value
        yield from nodes(value, (*path, key))


def render(path: tuple) -> str:
    """A path as error messages write it: keys joined by dots, list indices as [i]."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def set_at(doc, path: tuple, value) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@st.composite
def mutated(draw, base: dict, *, within: tuple = (), numbers=BAD_NUMBERS, unknown_keys=True, scalars=True):
    """(document, mutated paths): `base` with 1-3 mutations under `within`, each one invalid on its own."""
    doc = copy.deepcopy(base)
    paths = []
    for _ in range(draw(st.integers(1, 3))):
        # never a node an earlier mutation wrote (or one below it): mutating it again can make it valid
        # again (rate_rps set to [1], then that list replaced by the scalar 7)
        below = [(p, v) for p, v in nodes(doc) if p[:len(within)] == within and len(p) > len(within)
                 and not any(p[:len(q)] == q for q in paths)]
        kinds = ["number"] * any(is_number(v) for _, v in below)
        kinds += ["unknown key"] * unknown_keys + ["scalar"] * (scalars and any(isinstance(v, dict | list)
                                                                                 for _, v in below))
        if not kinds:  # everything below is already a scalar (an earlier mutation replaced it)
            break
        kind = draw(st.sampled_from(kinds))
        if kind == "number":
            path = draw(st.sampled_from([p for p, v in below if is_number(v)]))
            set_at(doc, path, copy.deepcopy(draw(st.sampled_from(numbers))))
        elif kind == "unknown key":
            holders = [p for p, v in below if isinstance(v, dict)] + ([within] if within else [()])
            parent = draw(st.sampled_from(holders))
            target = doc
            for key in parent:
                target = target[key]
            target[UNKNOWN_KEY] = 1
            path = (*parent, UNKNOWN_KEY)
        else:
            path = draw(st.sampled_from([p for p, v in below if isinstance(v, dict | list)]))
            set_at(doc, path, draw(st.sampled_from(["abc", 7])))
        paths = [p for p in paths if p[:len(path)] != path] + [path]
    return doc, paths


@st.composite
def broken_text(draw, base: dict):
    """(bytes, expected message): the valid document as text, made not UTF-8, not YAML or not a mapping."""
    text = yaml.safe_dump(base).encode()
    kind = draw(st.sampled_from(["not utf-8", "not yaml", "not a mapping"]))
    if kind == "not utf-8":
        at = draw(st.integers(0, len(text)))
        return text[:at] + draw(st.sampled_from([b"\xff", b"\xc3(", b"\xe9t\xe9", b"\x80\x80"])) + text[at:], \
            f"not UTF-8 text (byte {at})"
    if kind == "not yaml":
        return text + draw(st.sampled_from([b"zz: [unclosed\n", b"zz: {a: 1\n", b"\t- tab\n", b": :\n  - ]\n"])), \
            "not valid YAML"
    return draw(st.sampled_from([b"- a\n- b\n", b"42\n", b"just words\n", b"null\n"])), "expected a mapping"


# --- the CLI commands ----------------------------------------------------------------------------

def one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.splitlines()
    assert code == EXIT_BAD_INPUT, (argv, err)
    assert len(err) == 1, err
    return err[0]


def names_a_mutated_field(line: str, prefix: str, paths: list[tuple], *, exact: bool = True) -> bool:
    """The error names one of the mutated fields (exact path, or its last key where union tags intervene)."""
    if not line.startswith(prefix):
        return False
    rest = line[len(prefix):]
    for p in paths:
        name = render(p) if exact else str(next(k for k in reversed(p) if isinstance(k, str)))
        if (rest.startswith(name + ":") or rest.startswith(name + "[") or rest.startswith(name + ".")) if exact \
                else name in rest.split(": ")[0]:
            return True
    return False


COMMANDS = {
    "plan": (PLAN_BASE, ".yaml", []),
    "flow": (yaml.safe_load((ROOT / "examples" / "pd_flow.yaml").read_text()), ".yaml", []),
    "place": (yaml.safe_load((ROOT / "examples" / "clusters" / "helix_small10.yaml").read_text()), ".yaml",
              ["--time-limit", "0.5", "--group-time-limit", "0.2", "--no-milp"]),
}
# A flow edge's capacity may be .inf (unlimited), and unknown keys are ignored (solver outputs re-read as they are).
FLOW_NUMBERS = [v for v in BAD_NUMBERS if v != math.inf]


def mutations_for(command: str):
    base = COMMANDS[command][0]
    if command == "flow":
        return mutated(base, numbers=FLOW_NUMBERS, unknown_keys=False)
    return mutated(base)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_base_documents_are_valid(command, tmp_path, capsys):
    base, suffix, extra = COMMANDS[command]
    path = tmp_path / f"base{suffix}"
    path.write_text(yaml.safe_dump(base))
    assert main([command, str(path), *extra, *(["--mode", "groups"] if command == "place" else [])]) == 0, \
        capsys.readouterr().err


def malformed_file(fields, base: dict):
    """A document with malformed fields (-> ("fields", doc, paths)) or a broken file (-> ("text", bytes, words))."""
    return st.one_of(fields.map(lambda case: ("fields", *case)),
                     broken_text(base).map(lambda case: ("text", *case)))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_malformed_documents_are_one_line_naming_file_and_field(command, tmp_path, capsys):
    base, suffix, extra = COMMANDS[command]
    path = tmp_path / f"doc{suffix}"
    seen = []

    @FUZZ
    @given(case=malformed_file(mutations_for(command), base))
    def check(case):
        kind, doc, detail = case
        if kind == "fields":
            path.write_text(yaml.safe_dump(doc))
        else:
            path.write_bytes(doc)
        line = one_line_error([command, str(path), *extra], capsys)
        if kind == "fields":
            assert names_a_mutated_field(line, f"error: {path}: ", detail), (line, [render(p) for p in detail])
        else:
            assert line.startswith(f"error: {path}: ") and detail in line, line
        seen.append(kind)

    check()
    assert len(seen) >= EXAMPLES_PER_PARSER and set(seen) == {"fields", "text"}


# --- simulate: a small valid scenario, its fleet file and the scenario itself mutated -------------

@pytest.fixture
def scenario_dir(tmp_path):
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(PLAN_BASE))
    return tmp_path


def test_the_base_scenario_is_valid(scenario_dir, capsys):
    scenario = scenario_dir / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(SCENARIO_BASE))
    code = main(["simulate", str(scenario), "-o", str(scenario_dir / "report"), "-j", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err


def test_malformed_scenarios_and_fleets_are_one_line_naming_file_and_field(scenario_dir, capsys):
    """The fleet file mutated like a plan file; the scenario with type errors, unknown keys or broken text
    (its number bounds are the scenario module's, see the report of issue 10)."""
    scenario, fleet = scenario_dir / "scenario.yaml", scenario_dir / "fleet.yaml"
    argv = ["simulate", str(scenario), "-o", str(scenario_dir / "report"), "--no-progress"]
    seen = []

    @FUZZ
    @given(case=st.one_of(mutated(PLAN_BASE).map(lambda case: ("fleet", *case)),
                          malformed_file(mutated(SCENARIO_BASE, numbers=["abc", [1], {"x": 1}]), SCENARIO_BASE)))
    def check(case):
        kind, doc, detail = case
        fleet.write_text(yaml.safe_dump(doc if kind == "fleet" else PLAN_BASE))
        if kind == "text":
            scenario.write_bytes(doc)
        else:
            scenario.write_text(yaml.safe_dump(SCENARIO_BASE if kind == "fleet" else doc))
        line = one_line_error(argv, capsys)
        if kind == "fleet":
            assert names_a_mutated_field(line, f"error: {fleet}: ", detail), (line, [render(p) for p in detail])
        elif kind == "fields":
            assert names_a_mutated_field(line, f"error: {scenario}: ", detail, exact=False), \
                (line, [render(p) for p in detail])
        else:
            assert line.startswith(f"error: {scenario}: ") and detail in line, line
        seen.append(kind)

    check()
    assert len(seen) >= EXAMPLES_PER_PARSER and set(seen) == {"fleet", "fields", "text"}


# --- the operator's parsers ----------------------------------------------------------------------

def test_the_base_variant_autoscaling_and_settings_are_valid():
    assert parse_variant(VARIANT_BASE).max_replicas == 4
    assert parse_settings(SETTINGS_BASE, "base").accelerators[0].available == 8


def test_malformed_variant_autoscalings_become_invalid_resource_with_field_and_reason():
    seen = []

    @FUZZ
    @given(case=mutated(VARIANT_BASE, within=("spec",), unknown_keys=False, scalars=False))
    def check(case):
        doc, paths = case
        with pytest.raises(InvalidResource) as info:
            parse_variant(doc)
        err = info.value
        assert err.condition_reason and "\n" not in str(err), str(err)
        assert any(err.field.startswith(render(p[:2])) for p in paths), (err.field, [render(p) for p in paths])
        seen.append(err.field)

    check()
    assert len(seen) >= EXAMPLES_PER_PARSER


def test_malformed_settings_configmaps_name_the_field_and_keep_the_last_good_settings():
    good = parse_settings(SETTINGS_BASE, "base")
    store = SettingsStore(good)
    seen = []

    def configmap(text: str) -> dict:
        return {"metadata": {"namespace": "ops", "name": "va-settings"}, "data": {"settings.yaml": text}}

    @FUZZ
    @given(case=mutated(SETTINGS_BASE))
    def check(case):
        doc, paths = case
        cm = configmap(yaml.safe_dump(doc))
        with pytest.raises(InputError) as info:
            settings_from_configmap(cm)
        err = info.value
        assert err.source == "configmap ops/va-settings key settings.yaml" and "\n" not in str(err), str(err)
        assert any(err.field == render(p) or err.field.startswith(render(p) + ".")
                   or err.field.startswith(render(p) + "[") for p in paths), (err.field, [render(p) for p in paths])
        assert store.update_from_configmap(cm) == str(err)
        assert store.current is good
        seen.append(err.field)

    check()
    assert len(seen) >= EXAMPLES_PER_PARSER
