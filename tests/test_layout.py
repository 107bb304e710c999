"""The repository layout must not break the standard library or the fixed top-level folders."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_operator_folder_does_not_shadow_stdlib():
    out = subprocess.run(
        [sys.executable, "-c", "import operator, collections; print(operator.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert not out.startswith(str(ROOT)), f"'operator' resolved inside the repo: {out}"
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_fixed_top_level_layout_exists():
    for name in ["pyproject.toml", "operator", "optimizer", "deploy", "crds", "charts", "tests",
                 "Dockerfile", "Makefile"]:
        assert (ROOT / name).exists(), name


def test_optimizer_has_no_kubernetes_or_http_imports():
    banned = ("kubernetes", "kopf", "aiohttp", "requests", "prometheus_api_client", "urllib", "http")
    for path in (ROOT / "optimizer").rglob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ", "from ")):
                mod = s.split()[1].split(".")[0]
                assert mod not in banned, f"{path.relative_to(ROOT)} imports {mod}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def _imported_modules(path: Path) -> set[str]:
    """Every module an `import` / `from ... import` statement in the file names, at any depth."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_operator_package_never_imports_the_testbed():
    """The operator package is the product alone: no import statement in it, top level or inside a
    function, names the testbed. The CLI may look the testbed's commands up by name (importlib) where
    the testbed is installed; only cli.py mentions the package's name at all."""
    package = ROOT / "operator" / "variant_autoscaler"
    assert (ROOT / "operator" / "variant_autoscaler_testbed" / "__init__.py").exists()
    assert not (package / "emulation").exists(), "the testbed lives beside the operator package, not in it"
    for path in package.rglob("*.py"):
        bad = {m for m in _imported_modules(path) if m.split(".")[0] == "variant_autoscaler_testbed"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        if path.name != "cli.py":
            assert "variant_autoscaler_testbed" not in path.read_text(), path.relative_to(ROOT)


def test_nothing_imports_the_old_emulation_package():
    for top in ("operator", "optimizer", "tests", "benchmarks", "scripts", "deploy"):
        for path in (ROOT / top).rglob("*.py"):
            assert not {m for m in _imported_modules(path) if m.startswith("variant_autoscaler.emulation")}, path


def test_controller_parts_touch_only_what_their_docstrings_allow():
    """decision.py, holds.py and status.py decide; only controller.py talks to the cluster, Prometheus
    or the exporter. None of the three imports Kubernetes, HTTP or the operator's I/O modules."""
    package = ROOT / "operator" / "variant_autoscaler"
    io = {"kubernetes", "kopf", "aiohttp", "requests", "prometheus_api_client", "urllib", "http",
          "variant_autoscaler.actuator", "variant_autoscaler.exporter", "variant_autoscaler.operator",
          "variant_autoscaler.controller", "variant_autoscaler.settings"}
    for name in ("decision.py", "holds.py", "status.py"):
        path = package / name
        imported = _imported_modules(path)
        bad = {m for m in imported if m in io or m.split(".")[0] in io}
        # holds.py names the controller's Live/Memory types for annotations only (TYPE_CHECKING)
        if name == "holds.py":
            bad.discard("variant_autoscaler.controller")
            assert "if TYPE_CHECKING:\n    from variant_autoscaler.controller import" in path.read_text()
        assert not bad, f"{name} imports {sorted(bad)}"
    assert not {m for m in _imported_modules(package / "status.py") if m.startswith("variant_autoscaler")}
    assert not {m for m in _imported_modules(package / "decision.py") if m.startswith("variant_autoscaler")}
