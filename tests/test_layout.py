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
