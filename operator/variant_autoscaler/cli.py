"""`variant-autoscaler` command line: one sub-command per module in `variant_autoscaler.commands`.

Each command module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`. Bad input
files surface as one line naming file, field and reason, with exit code 2 and no traceback.

`main` imports only the command it runs (the others are listed from their NAME and HELP read from
source), so a command's wall time does not include loading kopf, aiohttp or matplotlib for others.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import pkgutil
import sys
from pathlib import Path

from optimizer.problem import InputError
from variant_autoscaler import commands

EXIT_BAD_INPUT = 2


@functools.cache
def _command_infos() -> tuple[tuple[str, str, str, str | None], ...]:
    """(module, NAME, HELP, docstring) of every command, read from source without importing it (once:
    parsing the sources takes ~50 ms, and tests call `main` in-process thousands of times)."""
    out = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        tree = ast.parse(Path(commands.__path__[0], f"{info.name}.py").read_text())
        consts = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                  and isinstance(node.value, ast.Constant) for t in node.targets if isinstance(t, ast.Name)}
        out.append((info.name, consts["NAME"], consts["HELP"], ast.get_docstring(tree, clean=False)))
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
            module = importlib.import_module(f"{commands.__name__}.{module_name}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    known = {name for _, name, _, _ in _command_infos()}
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
