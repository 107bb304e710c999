"""Calibrate the datasheet roofline efficiencies against measured profiles and print the error.

Usage: .venv/bin/python benchmarks/calibrate_profiles.py [--profiles ../shared/data/profiles]

Reads Helix per-layer tables and Splitwise perf_model.csv, fits per-accelerator and global
efficiencies (optimizer.calibration), and prints: the fitted factors, the relative error of the
resulting profiles per accelerator and phase, the same for the constants committed in
optimizer/datasheet.py, and, as the floor any ParametricProfile can reach on Splitwise, the
error of a free per-configuration fit. The last block is Python to paste into
optimizer/datasheet.py when the data or the model change.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from optimizer.calibration import (  # noqa: E402
    SPLITWISE_HARDWARE,
    Calibration,
    CalibrationError,
    calibrate,
    calibration_errors,
    observations_from_profiles,
)
from optimizer.datasheet import CALIBRATED, GLOBAL_EFFICIENCY, HELIX_CONTEXT_TOKENS, Efficiency  # noqa: E402
from optimizer.profile import fit_profile  # noqa: E402
from optimizer.profile_data import load_splitwise, splitwise_samples  # noqa: E402

DEFAULT_PROFILES = REPO.parent / "shared" / "data" / "profiles"


def _error_table(title: str, errors: list[CalibrationError]) -> None:
    print(f"\n{title}")
    print(f"  {'accelerator':<11} {'source':<10} {'phase':<8} {'n':>5} {'MAPE':>7} {'max':>7} {'bias':>7}")
    for e in errors:
        print(f"  {e.accelerator:<11} {e.source:<10} {e.phase:<8} {e.count:>5} {100 * e.mape:>6.1f}% "
              f"{100 * e.max_error:>6.1f}% {100 * e.bias:>+6.1f}%")
    counts = np.array([e.count for e in errors])
    mapes = np.array([e.mape for e in errors])
    print(f"  {'all':<11} {'':<10} {'':<8} {counts.sum():>5} {100 * (mapes * counts).sum() / counts.sum():>6.1f}% "
          f"{100 * max(e.max_error for e in errors):>6.1f}%")


def _efficiency_table(title: str, effs: dict[str, Efficiency]) -> None:
    print(f"\n{title}")
    print(f"  {'accelerator':<11} {'eta_mem':>8} {'eta_dec':>8} {'eta_pre':>8} {'tp_us/layer':>12} {'eta_link':>9}")
    for name, e in effs.items():
        print(f"  {name:<11} {e.memory:>8.3f} {e.decode_compute:>8.3f} {e.prefill_compute:>8.3f} "
              f"{1e6 * e.tp_latency_per_layer_s:>12.1f} {e.link:>9.3f}")


def _free_fit_floor(profiles: Path) -> list[CalibrationError]:
    """Error of a ParametricProfile fitted freely to each Splitwise (model, hardware, TP)."""
    rows = load_splitwise(profiles / "splitwise" / "perf_model.csv")
    rel = defaultdict(list)
    for model, hardware, tp in sorted({(r.model, r.hardware, r.tensor_parallel) for r in rows}):
        if hardware not in SPLITWISE_HARDWARE:
            continue
        dec, pre = splitwise_samples(rows, model, hardware, tp)
        p = fit_profile(dec, pre)
        name = SPLITWISE_HARDWARE[hardware]
        rel[(name, "decode")] += [p.decode_step_s(s.batch, s.context_tokens) / s.step_s - 1 for s in dec]
        rel[(name, "prefill")] += [p.prefill_s(s.tokens) / s.time_s - 1 for s in pre]
    out = []
    for (name, phase), errs in sorted(rel.items()):
        a = np.asarray(errs)
        out.append(CalibrationError(accelerator=name, source="splitwise", phase=phase, count=len(a),
                                    mape=float(np.abs(a).mean()), max_error=float(np.abs(a).max()),
                                    bias=float(a.mean())))
    return out


def _constants(per_type: Calibration, global_fit: Calibration) -> str:
    def eff(e: Efficiency) -> str:
        return (f"Efficiency(memory={e.memory:.3g}, decode_compute={e.decode_compute:.3g}, "
                f"prefill_compute={e.prefill_compute:.3g}, tp_latency_per_layer_s={e.tp_latency_per_layer_s:.3g}, "
                f"link={e.link:.3g})")

    lines = ["CALIBRATED: dict[str, Efficiency] = {"]
    lines += [f'    "{name}": {eff(e)},' for name, e in per_type.efficiencies.items()]
    lines += ["}", f"GLOBAL_EFFICIENCY = {eff(global_fit.global_efficiency)}",
              f"HELIX_CONTEXT_TOKENS = {per_type.helix_context_tokens:.0f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=Path, default=DEFAULT_PROFILES,
                        help="folder with helix/ and splitwise/perf_model.csv (default: ../shared/data/profiles)")
    args = parser.parse_args(argv)
    if not (args.profiles / "splitwise" / "perf_model.csv").is_file():
        print(f"no profiles under {args.profiles} (expected helix/ and splitwise/perf_model.csv)", file=sys.stderr)
        return 2

    observations = observations_from_profiles(args.profiles)
    print(f"{len(observations)} observations from {args.profiles}")
    per_type = calibrate(observations, per_accelerator=True)
    global_fit = calibrate(observations, per_accelerator=False)

    _efficiency_table("Per-accelerator fit (TP terms per type where measured with n > 1, else per link kind)",
                      per_type.efficiencies)
    print(f"  Helix decode context (fitted): {per_type.helix_context_tokens:.0f} tokens")
    _error_table("Error of per-accelerator fit (relative, datasheet profile vs measured)", per_type.errors)
    _efficiency_table("Global fit (one set for all types)", {"all": global_fit.global_efficiency})
    _error_table("Error of global fit", global_fit.errors)
    committed = calibration_errors(observations, CALIBRATED, HELIX_CONTEXT_TOKENS, fallback=GLOBAL_EFFICIENCY)
    _error_table("Error of the constants committed in optimizer/datasheet.py", committed)
    _error_table("Floor: free ParametricProfile fit per Splitwise configuration", _free_fit_floor(args.profiles))
    print("\n# paste into optimizer/datasheet.py\n" + _constants(per_type, global_fit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
