"""The Dockerfile and its build context, checked without a Docker engine (none runs where CI does).

What can be checked here is checked for real: the build context .dockerignore leaves is computed
with Docker's own matching rules and the package is imported and its `run` command parsed from a
copy of exactly that context; the final stage is read for what must (non-root user, entrypoint)
and must not (any RUN, so no build tools or package managers) be there; and the image agrees with
the chart (user id, writable /tmp, ports). Building and running the image is `make image` /
`make kind-e2e` on a machine with Docker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CHART = REPO / "charts" / "variant-autoscaler"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined; heredoc bodies are skipped."""
    out: list[tuple[str, str]] = []
    lines = DOCKERFILE.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        word, _, rest = line.partition(" ")
        heredoc = re.search(r"<<-?'?(\w+)'?", rest)
        if heredoc:
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                i += 1
            i += 1
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[tuple[str, list[tuple[str, str]]]]:
    """(stage name, its instructions) in order."""
    out: list[tuple[str, list[tuple[str, str]]]] = []
    for word, rest in instructions():
        if word == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(out))
            out.append((name, []))
        elif out:
            out[-1][1].append((word, rest))
    return out


def arg_default(name: str) -> str:
    for word, rest in instructions():
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}")


# ------------------------------------------------------------------------------------------------
# .dockerignore, with Docker's rules: the last matching pattern wins, `!` re-includes, a pattern that
# matches a directory matches everything below it, `*` stays within one path segment, `**` spans any.


def _pattern_regex(pattern: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def in_context(relative: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return not excluded


def build_context() -> list[str]:
    rules = dockerignore_rules()
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv")]
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), REPO).replace(os.sep, "/")
            if in_context(rel, rules):
                files.append(rel)
    return sorted(files)


def test_dockerignore_matcher_follows_docker_rules():
    rules = [(False, _pattern_regex("*")), (True, _pattern_regex("src")), (False, _pattern_regex("**/__pycache__"))]
    assert in_context("src/a/b.py", rules)
    assert not in_context("src/a/__pycache__/b.pyc", rules)
    assert not in_context("tests/test_x.py", rules)
    assert not in_context("README.md", rules)


def test_build_context_holds_the_package_and_nothing_heavy():
    files = build_context()
    tops = {f.split("/")[0] for f in files}
    assert tops == {"pyproject.toml", "README.md", "optimizer", "operator", "crds"}, tops
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    sources = [f for f in files if f.endswith(".py")]
    expected = sorted(os.path.relpath(p, REPO).replace(os.sep, "/") for top in ("optimizer", "operator")
                      for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts)
    assert sources == expected


def copies_of(stage: str) -> list[tuple[str, str]]:
    """(source, destination) of each COPY from the build context (not --from) in that stage."""
    (body,) = [b for name, b in stages() if name == stage]
    out = []
    for word, rest in body:
        if word == "COPY" and not rest.startswith("--"):
            *sources, dest = rest.split()
            out.extend((src.rstrip("/"), dest) for src in sources)
    return out


def build_stage_files() -> list[str]:
    """The build-context files the `build` stage copies into /src, the tree `pip install .` runs on."""
    sources = [src for src, _ in copies_of("build")]
    return [f for f in build_context() if any(f == s or f.startswith(s + "/") for s in sources)]


def copy_build_stage(target: Path) -> None:
    for rel in build_stage_files():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target / rel)


TESTBED = "variant_autoscaler_testbed"


def _run_cli(tree: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'operator'}",
           "PYTHONDONTWRITEBYTECODE": "1", "MPLCONFIGDIR": str(tree / "mpl")}
    code = ("import variant_autoscaler, optimizer, sys; "
            "assert variant_autoscaler.__file__.startswith(sys.argv[1]), variant_autoscaler.__file__; "
            "from variant_autoscaler.cli import main; sys.exit(main(sys.argv[2:]))")
    # -I would drop PYTHONPATH; -S keeps the dev install's site-packages (which maps the testbed) out.
    return subprocess.run([sys.executable, "-S", "-c", code, str(tree), *argv], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": env["PYTHONPATH"] + os.pathsep + _site_packages()},
                          cwd=tree, timeout=120)


def _site_packages() -> str:
    """The dependencies' folder without its .pth files processed (they map the dev tree's packages)."""
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def test_the_image_contents_run_the_operator_command(tmp_path):
    """Copy exactly what the build stage copies and start `variant-autoscaler run --help` from it alone."""
    copy_build_stage(tmp_path)
    done = _run_cli(tmp_path, "run", "--help")
    assert done.returncode == 0, done.stderr
    assert "--settings-configmap" in done.stdout


def test_the_build_stage_copies_no_testbed_and_a_testbed_command_says_so(tmp_path):
    files = build_stage_files()
    assert any(f.startswith("operator/variant_autoscaler/") for f in files)
    assert not [f for f in files if TESTBED in f], "the operator image must not hold the testbed"
    copy_build_stage(tmp_path)
    done = _run_cli(tmp_path, "emulate-server", "--model", "m", "--accelerator", "H100")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: `emulate-server`") and TESTBED in line and "Traceback" not in done.stderr
    listed = _run_cli(tmp_path, "--help")
    assert listed.returncode == 0 and "emulate-server" not in listed.stdout


def test_the_runtime_wheel_holds_no_testbed_module(tmp_path):
    """Build the wheel `pip install .` in the build stage would install, from exactly the files that
    stage copies, and read its contents: the operator and optimizer, no testbed module."""
    import zipfile

    tree = tmp_path / "src"
    copy_build_stage(tree)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(tree)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("variant_autoscaler-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"optimizer", "variant_autoscaler"}, tops
    assert "variant_autoscaler/controller.py" in names and "variant_autoscaler/cli.py" in names
    assert not [n for n in names if "testbed" in n or "emulat" in n.split("/")[-1]], "testbed code in the wheel"


def test_the_testbed_target_adds_the_testbed_on_the_runtime_environment():
    """`testbed` (for deploy/samples' model servers) = the built environment + the testbed folder on
    PYTHONPATH, the same user as the operator image; the operator image (`runtime`) stays the last stage."""
    names = [n for n, _ in stages()]
    assert names[-1] == "runtime" and "testbed" in names
    (body,) = [b for n, b in stages() if n == "testbed"]
    ((src, dest),) = copies_of("testbed")
    assert src == f"operator/{TESTBED}" and (REPO / src / "__init__.py").exists()
    assert dest.endswith(f"/{TESTBED}")
    env = " ".join(rest for w, rest in body if w == "ENV")
    assert f"PYTHONPATH={dest.rsplit('/', 1)[0]}" in env.split()
    (user,) = [rest for w, rest in body if w == "USER"]
    (runtime_user,) = [rest for w, rest in stages()[-1][1] if w == "USER"]
    assert user == runtime_user
    samples = (REPO / "deploy" / "samples" / "model-servers.yaml").read_text()
    images = set(re.findall(r"image: (\S+)", samples))
    assert images == {f"variant-autoscaler-testbed:{tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['version']}"}


def test_dockerfile_is_multi_stage_with_a_bare_runtime_stage():
    all_stages = stages()
    assert len(all_stages) >= 2
    name, runtime = all_stages[-1]
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert froms[-1].split()[0] == "${PYTHON_IMAGE}" and "slim" in arg_default("PYTHON_IMAGE")
    words = [w for w, _ in runtime]
    assert "RUN" not in words, "the runtime stage must install nothing (no package manager, no compiler)"
    copies = [rest for w, rest in runtime if w == "COPY"]
    assert copies and all(c.startswith("--from=") for c in copies), "the runtime stage only copies built artefacts"
    build_names = {n for n, _ in all_stages[:-1]}
    assert all(c.split()[0].removeprefix("--from=") in build_names for c in copies)


def test_runtime_user_entrypoint_and_python_match_the_project():
    _, runtime = stages()[-1]
    (user,) = [rest for w, rest in runtime if w == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0), "a numeric non-root user"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (entrypoint,) = [rest for w, rest in runtime if w == "ENTRYPOINT"]
    (cmd,) = [rest for w, rest in runtime if w == "CMD"]
    assert json.loads(entrypoint) == list(project["scripts"])
    from variant_autoscaler.cli import build_parser

    build_parser().parse_args(json.loads(cmd))  # `run` is a real sub-command
    version = re.search(r"python:(\d+\.\d+)", arg_default("PYTHON_IMAGE")).group(1)
    low = re.search(r">=\s*(\d+\.\d+)", project["requires-python"]).group(1)
    assert tuple(map(int, version.split("."))) >= tuple(map(int, low.split(".")))


def test_image_and_chart_agree():
    _, runtime = stages()[-1]
    (user,) = [rest for w, rest in runtime if w == "USER"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(user.split(":")[0])
    env = " ".join(rest for w, rest in runtime if w == "ENV")
    assert "MPLCONFIGDIR=/tmp" in env and "HOME=/tmp" in env, "writable paths must be under the /tmp volume"
    exposed = {int(p) for w, rest in runtime if w == "EXPOSE" for p in rest.split()}
    assert {values["metrics"]["port"], values["healthPort"]} == exposed
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == project["version"]


@pytest.mark.parametrize("copied", ["pyproject.toml", "README.md", "optimizer", "operator/variant_autoscaler", "crds",
                                    "operator/variant_autoscaler_testbed"])
def test_every_copy_source_exists(copied):
    sources = {src.rstrip("/") for w, rest in instructions() if w == "COPY" and not rest.startswith("--from")
               for src in rest.split()[:-1]}
    assert copied in sources
    assert (REPO / copied).exists()


def test_kind_e2e_script_parses_and_uses_files_that_exist():
    script = REPO / "scripts" / "kind-e2e.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    for path in re.findall(r"(?<![\w/])((?:deploy|charts)/[\w./-]+)", text):
        if path.startswith("deploy/variant-autoscaler"):  # `kubectl logs deploy/NAME`, not a path
            continue
        assert (REPO / path.rstrip(".")).exists(), path
    assert "NOT run in CI" in text
