"""The shipped examples load, and the example fleet is the one its generator writes.

A file under examples/ is taken to be a Problem when it is a YAML/JSON mapping with both
`accelerators` and `variants` at the top level; other example files (manifests, traces) are
someone else's business.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optimizer.problem import InputError, load_problem, read_document

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def problem_files() -> list[Path]:
    found = []
    for path in sorted(EXAMPLES.rglob("*")):
        if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
            continue
        try:
            doc = read_document(path)
        except InputError:  # multi-document manifests and the like are not Problem files
            continue
        if {"accelerators", "variants"} <= set(doc):
            found.append(path)
    return found


def test_the_example_fleet_is_among_the_problem_files():
    assert EXAMPLES / "fleet.yaml" in problem_files()


@pytest.mark.parametrize("path", problem_files(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_problem_example_loads(path):
    problem = load_problem(path)
    assert problem.variants and problem.accelerators


def test_fleet_yaml_is_what_make_fleet_writes():
    run = subprocess.run([sys.executable, str(EXAMPLES / "make_fleet.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_example_fleet_covers_what_the_demo_needs():
    fleet = load_problem(EXAMPLES / "fleet.yaml")
    assert len(fleet.models) >= 3
    assert len(fleet.accelerators) >= 4
    assert {v.role.value for v in fleet.variants} == {"P", "D", "PD"}
    assert {1, 2, 4, 8} <= {v.accelerators_per_replica for v in fleet.variants}
    available = {a.name: a.available for a in fleet.accelerators}
    assert all(n is not None for n in available.values())
    assert min(available.values()) < max(available.values()) / 2, "one type should be scarce"
    for model in fleet.models:
        workload = fleet.workload(model.name)
        assert workload is not None and 3 <= len(workload.buckets) <= 4, model.name
        assert fleet.slo(model.name).itl_s > 0
    price = {a.name: a.cost_per_hour for a in fleet.accelerators}
    assert price["H100"] > price["A100-80G"] > price["L4"] > price["T4"]  # public price-list order


def test_fleet_yaml_has_its_price_source_in_a_comment():
    text = (EXAMPLES / "fleet.yaml").read_text()
    assert "AWS EC2 On-Demand" in text and "us-east-1" in text
    assert yaml.safe_load(text)["accelerators"]
