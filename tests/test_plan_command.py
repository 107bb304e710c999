"""`variant-autoscaler plan`: readable table, JSON output consistent with the fleet, clean errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FLEET = ROOT / "examples" / "fleet.yaml"


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "variant_autoscaler", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_plan_prints_table_and_writes_consistent_json(tmp_path):
    out = tmp_path / "plan.json"
    res = run_cli("plan", str(FLEET), "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert "Replicas per variant" in res.stdout and "Cost" in res.stdout
    doc = json.loads(out.read_text())
    fleet = yaml.safe_load(FLEET.read_text())
    prices = {a["name"]: a["cost_per_hour"] for a in fleet["accelerators"]}
    available = {a["name"]: a.get("available") for a in fleet["accelerators"]}
    variants = {v["name"]: v for v in fleet["variants"]}
    used: dict[str, int] = {}
    cost = 0.0
    for name, n in doc["allocation"]["replicas"].items():
        v = variants[name]
        per = v.get("accelerators_per_replica", 1)
        used[v["accelerator"]] = used.get(v["accelerator"], 0) + n * per
        cost += n * per * prices[v["accelerator"]]
        assert n >= v.get("min_replicas", 0)
    for acc, n in used.items():
        assert available[acc] is None or n <= available[acc], f"{acc}: {n} > {available[acc]}"
    assert abs(cost - doc["allocation"]["cost_per_hour"]) < 1e-6 * max(1.0, cost)
    assert sum(doc["allocation"]["replicas"].values()) > 0
    for variant, buckets in doc["capacity_per_replica"].items():
        assert variant in variants
        for est in buckets.values():
            assert est["max_rate_rps"] >= 0
    served = {w["model"] for w in fleet["workloads"]}
    for r in doc["allocation"]["routing"]:
        assert r["model"] in served and variants[r["variant"]]["model"] == r["model"]


def test_plan_reports_shortfall_instead_of_failing(tmp_path):
    fleet = yaml.safe_load(FLEET.read_text())
    for acc in fleet["accelerators"]:
        acc["available"] = 4
    for w in fleet["workloads"]:
        w["arrival_rate_rps"] *= 20
    path = tmp_path / "scarce.yaml"
    path.write_text(yaml.safe_dump(fleet))
    out = tmp_path / "plan.json"
    res = run_cli("plan", str(path), "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "Unmet demand" in res.stdout
    doc = json.loads(out.read_text())
    assert sum(doc["allocation"]["unmet_demand_rps"].values()) > 0
    assert any("exhausted" in line for line in doc["allocation"]["binding_constraints"])


def test_plan_bad_input_is_one_line_exit_2(tmp_path):
    fleet = yaml.safe_load(FLEET.read_text())
    fleet["variants"][1]["max_batch"] = -3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(fleet))
    res = run_cli("plan", str(path))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0
    assert str(path) in res.stderr and "variants[1].max_batch" in res.stderr

    res = run_cli("plan", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "cannot read file" in res.stderr and "Traceback" not in res.stderr


def test_plan_reports_the_commands_wall_time_and_the_solve_within_it():
    res = run_cli("plan", str(FLEET))
    assert res.returncode == 0, res.stderr
    found = re.search(r"wall time ([\d.]+) s \(solve ([\d.]+) s: capacity table \+ allocation, time limit ([\d.]+) s\)",
                      res.stdout)
    assert found, res.stdout[-500:]
    wall, solve, _ = map(float, found.groups())
    assert 0 < solve <= wall
