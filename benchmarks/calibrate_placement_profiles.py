"""Fit the per-layer parametric profiles of the example clusters and show what the fit costs.

Usage: .venv/bin/python benchmarks/calibrate_placement_profiles.py [--profiles ../shared/data/profiles/helix]

The example cluster files must work without ../shared, so each (machine, model) carries a
``layer_profile``: a robust linear fit (optimizer.profile.fit_profile) of Helix's measured
per-layer tables. This prints, per cluster file and model, the fitted profiles (YAML to paste
under ``machine_types[].models.<model>.layer_profile``) and the relative difference between node
throughputs priced with the fit and with the measured tables -- the price of running without
--profiles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from optimizer.placement.cluster import load_cluster  # noqa: E402
from optimizer.placement.throughput import NodeThroughputModel, ProfileLayerTimes, layer_time_sources  # noqa: E402
from optimizer.profile import DecodeSample, PrefillSample, fit_profile  # noqa: E402

DEFAULT_PROFILES = REPO.parent / "shared" / "data" / "profiles" / "helix"
MAX_DECODE_BATCH = 64
MAX_PROMPT_TOKENS = 4000


def fit_layer(times):
    """Per-layer ParametricProfile (seconds) fitted to measured per-layer milliseconds."""
    decode = [DecodeSample(batch=x, step_s=y / 1000) for x, y in times.decode_points if 0 < x <= MAX_DECODE_BATCH]
    prefill = [PrefillSample(tokens=x, time_s=y / 1000) for x, y in times.prompt_points
               if 0 < x <= MAX_PROMPT_TOKENS and y > 0]
    return fit_profile(decode, prefill)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default=str(DEFAULT_PROFILES))
    args = parser.parse_args()
    if not Path(args.profiles).is_dir():
        print(f"profiles not found at {args.profiles}; pass --profiles")
        return 2
    for path in sorted((REPO / "examples" / "clusters").glob("*.yaml")):
        cluster = load_cluster(path)
        for model in cluster.spec.models:
            measured = layer_time_sources(cluster, model, args.profiles)
            fitted = {name: ProfileLayerTimes(fit_layer(t)) for name, t in measured.items()}
            exact = NodeThroughputModel(cluster, model, measured)
            approx = NodeThroughputModel(cluster, model, fitted)
            print(f"== {path.name} / {model.name}")
            for name, t in fitted.items():
                p = t.profile
                print(f"  {name}: layer_profile: {{kind: parametric, decode_base_s: {p.decode_base_s:.4e}, "
                      f"decode_per_seq_s: {p.decode_per_seq_s:.4e}, prefill_base_s: {p.prefill_base_s:.4e}, "
                      f"prefill_per_token_s: {p.prefill_per_token_s:.4e}}}")
                dev = [f"{(a / e - 1) * 100:+.0f}%" for e, a in zip(exact.table[name][1:], approx.table[name][1:],
                                                                  strict=True) if e > 0]
                print(f"     throughput with fit vs measured, k = 1..: {' '.join(dev)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
