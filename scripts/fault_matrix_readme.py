"""Copy the fault matrix measured by tests/test_fault_matrix.py (reports/fault-matrix.md) into README.md.

Usage: python scripts/fault_matrix_readme.py   (after `pytest tests/test_fault_matrix.py`)
The table sits between the two FAULT-MATRIX markers of README's "Failure behaviour" section;
tests/test_readme.py checks that its rows are the test module's rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- FAULT-MATRIX:BEGIN (scripts/fault_matrix_readme.py) -->", "<!-- FAULT-MATRIX:END -->"


def main() -> int:
    report = ROOT / "reports" / "fault-matrix.md"
    if not report.exists():
        print(f"error: {report}: missing; run pytest tests/test_fault_matrix.py first", file=sys.stderr)
        return 2
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"error: {readme}: no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{report.read_text().strip()}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
