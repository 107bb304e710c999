"""deploy/generate.py loaded once for the packaging tests: the one place that finds helm and renders the chart."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GENERATE = Path(__file__).resolve().parents[1] / "deploy" / "generate.py"


def generator():
    if "deploy_generate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("deploy_generate", GENERATE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["deploy_generate"] = module
        spec.loader.exec_module(module)
    return sys.modules["deploy_generate"]
