"""The README documents every command, every CRD field (two levels deep) and every exported metric."""

import re
from pathlib import Path

import yaml
from variant_autoscaler.cli import build_parser
from variant_autoscaler.exporter import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quick_start_has_exactly_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^make \w+", quick, flags=re.M)
    assert commands == ["make demo", "make test"]


def test_every_cli_command_is_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"variant-autoscaler {name}" in README, name


def test_every_exported_metric_is_documented():
    for name in METRIC_NAMES:
        assert f"`{name}`" in README, name


def test_every_crd_field_is_documented():
    crd = yaml.safe_load((ROOT / "crds" / "variantautoscalings.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    missing = []
    for top in ("spec", "status"):
        for key, sub in schema[top]["properties"].items():
            paths = [f"{top}.{key}"]
            paths += [f"{top}.{key}.{k}" for k in (sub.get("properties") or {})]
            paths += [f"{top}.{key}[].{k}" for k in (sub.get("items", {}).get("properties") or {})]
            missing += [p for p in paths if f"`{p}`" not in README]
    assert not missing, missing


def test_every_make_target_in_the_readme_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, flags=re.M))
    for name in set(re.findall(r"`make ([a-z][\w-]*)", README)):
        assert name in targets, name


def test_failure_behaviour_table_is_the_fault_matrix():
    """README's table comes from tests/test_fault_matrix.py's run: one row per matrix row, same words, a measured time."""
    from test_fault_matrix import HEADER, ROWS

    begin, end = "<!-- FAULT-MATRIX:BEGIN (scripts/fault_matrix_readme.py) -->", "<!-- FAULT-MATRIX:END -->"
    table = README.split(begin, 1)[1].split(end, 1)[0].strip().splitlines()
    assert table[0] == HEADER
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [tuple(r[:3]) for r in rows] == list(ROWS.values())
    assert all(re.fullmatch(r"\d+\.\d s \(\d+ cycles of \d+ s\)", r[3]) for r in rows), rows
