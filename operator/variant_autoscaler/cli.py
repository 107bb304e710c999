"""`variant-autoscaler` command line: one sub-command per module in `variant_autoscaler.commands`.

Each command module defines NAME, HELP, `add_arguments(parser)` and `run(args) -> int`. Bad input
files surface as one line naming file, field and reason, with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from optimizer.problem import InputError
from variant_autoscaler import commands

EXIT_BAD_INPUT = 2


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="variant-autoscaler",
        description="Size LLM inference variants to meet latency SLOs at least cost within GPU inventory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
