"""`variant-autoscaler` command line: one sub-command per module in `variant_autoscaler.commands`.

Each command module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`. Bad input
files surface as one line naming file, field and reason, with exit code 2 and no traceback.

`main` imports only the command it runs (the others are listed from their NAME and HELP read from
source), so a command's wall time does not include loading kopf, aiohttp or matplotlib for others.

Commands that only test or demonstrate the operator (`emulate-server`) live in the testbed package,
`variant_autoscaler_testbed.commands`, which a dev install has and the operator image does not. The
CLI lists them when that package is importable, and names the missing package in one line when one
is asked for without it. It finds them by name with importlib; the operator package itself never
imports the testbed (tests/test_package_boundaries.py).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

from optimizer.problem import InputError
from variant_autoscaler import commands

EXIT_BAD_INPUT = 2

TESTBED_COMMANDS_PACKAGE = "variant_autoscaler_testbed.commands"
# Commands the testbed provides, named here so that asking for one without the testbed installed is
# one clear line instead of argparse's "invalid choice" (tests/test_packaging_image.py keeps it true).
TESTBED_COMMAND_NAMES = frozenset({"emulate-server"})


def _testbed_commands_path() -> str | None:
    """The testbed's commands folder, or None where the testbed is not installed (the operator image)."""
    try:
        spec = importlib.util.find_spec(TESTBED_COMMANDS_PACKAGE)
    except ModuleNotFoundError:
        return None
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


@functools.cache
def _command_infos() -> tuple[tuple[str, str, str, str | None], ...]:
    """(module, NAME, HELP, docstring) of every command, read from source without importing it (once:
    parsing the sources takes ~50 ms, and tests call `main` in-process thousands of times). The module
    is the full dotted name: the operator's own commands, then the testbed's where it is installed."""
    folders = [(commands.__name__, commands.__path__[0])]
    testbed = _testbed_commands_path()
    if testbed is not None:
        folders.append((TESTBED_COMMANDS_PACKAGE, testbed))
    out = []
    for package, folder in folders:
        for info in sorted(pkgutil.iter_modules([folder]), key=lambda i: i.name):
            if info.name.startswith("_"):
                continue
            tree = ast.parse(Path(folder, f"{info.name}.py").read_text())
            consts = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                      and isinstance(node.value, ast.Constant) for t in node.targets if isinstance(t, ast.Name)}
            out.append((f"{package}.{info.name}", consts["NAME"], consts["HELP"],
                        ast.get_docstring(tree, clean=False)))
    return tuple(out)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that command's module is imported and given arguments."""
    parser = argparse.ArgumentParser(
        prog="variant-autoscaler",
        description="Size LLM inference variants to meet latency SLOs at least cost within GPU inventory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name, name, help_text, doc in _command_infos():
        p = sub.add_parser(name, help=help_text, description=doc)
        if only is None or name == only:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    known = {name for _, name, _, _ in _command_infos()}
    if chosen in TESTBED_COMMAND_NAMES and chosen not in known:
        print(f"error: `{chosen}` is a testbed command and the testbed package (variant_autoscaler_testbed) "
              "is not installed here; the operator image leaves it out: use the `testbed` image target or "
              "a dev install (`make venv`)", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = build_parser(chosen if chosen in known else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
