"""Fit the roofline efficiencies of ``optimizer.datasheet`` to measured profiles, and score them.

Measurements (Helix per-layer tables, Splitwise whole-model runs) become ``Observation`` rows;
``calibrate`` finds the efficiencies that minimise the relative error of ``datasheet_profile``
on them, and ``calibration_errors`` reports how far the profile is from each measurement. Both
go through ``datasheet_profile`` itself, so what is scored is exactly what the planner uses.

Per-accelerator mode fits eta_mem, eta_decode and eta_prefill per type and the two TP terms per
interconnect kind (NVLink, PCIe), because only some types were measured with more than one GPU.
Global mode fits one set for everything, the fallback for types never measured. Helix's decode
tables do not state the context length of the profiled sequences, so it is fitted too (one
number for all Helix tables). The loss is soft-L1 on relative error: a few broken runs
(Splitwise) and integer-rounded small values (Helix) must not dominate.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optimizer.datasheet import (
    DATASHEETS,
    MODEL_FACTS,
    AcceleratorDatasheet,
    Efficiency,
    ModelFacts,
    datasheet_profile,
)
from optimizer.profile_data import (
    LayerTimes,
    SplitwiseRow,
    consistent_runs,
    discover_helix_profiles,
    load_helix_layer_times,
    load_splitwise,
)

MS = 1e-3
HELIX_CONTEXT_START = 512.0


class Observation(BaseModel):
    """One measured iteration time and the conditions it was measured under."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="Which data set, e.g. 'helix' or 'splitwise'.")
    model: ModelFacts = Field(description="The model (or the layers of it) that was timed.")
    accelerator: str = Field(description="Name in optimizer.datasheet.DATASHEETS.")
    accelerators: int = Field(gt=0, description="Accelerators per replica (tensor parallel).")
    phase: Literal["decode", "prefill"]
    batch: float = Field(gt=0, description="Sequences decoded together, or prompts prefilled together.")
    prompt_tokens: float = Field(default=0.0, ge=0, description="Tokens of each prompt (prefill).")
    context_tokens: float | None = Field(default=None, ge=0, description="Mean context (decode); None: unknown.")
    measured_s: float = Field(gt=0)


def helix_observations(model: ModelFacts, accelerator: str, accelerators: int, times: LayerTimes) -> list[Observation]:
    """Observations of one Helix table; `model` is the whole model (times are per layer)."""
    layer = model.layers_only(1)
    common = dict(source="helix", model=layer, accelerator=accelerator, accelerators=accelerators)
    out = [
        Observation(**common, phase="decode", batch=b, measured_s=y * MS)
        for b, y in times.decode_points if b > 0 and y > 0
    ]
    out += [
        Observation(**common, phase="prefill", batch=1, prompt_tokens=t, measured_s=y * MS)
        for t, y in times.prompt_points if t > 0 and y > 0
    ]
    return out


def splitwise_observations(model: ModelFacts, accelerator: str, rows: list[SplitwiseRow]) -> list[Observation]:
    """Observations of Splitwise rows (already selected for one model and hardware)."""
    out = []
    for r in rows:
        common = dict(source="splitwise", model=model, accelerator=accelerator, accelerators=r.tensor_parallel)
        out.append(Observation(**common, phase="decode", batch=r.batch_size,
                               context_tokens=r.prompt_size + r.token_size / 2, measured_s=r.token_time_ms * MS))
        out.append(Observation(**common, phase="prefill", batch=r.batch_size, prompt_tokens=r.prompt_size,
                               measured_s=r.prompt_time_ms * MS))
    return out


HELIX_MODELS = {"llama2_70b": "Llama-2-70B", "llama1_30b": "LLaMA-30B"}
HELIX_GPUS = {"a100": "A100-40G", "v100": "V100", "l4": "L4", "t4": "T4"}
SPLITWISE_MODELS = {"llama2-70b": "Llama-2-70B", "bloom-176b": "BLOOM-176B"}
# h100-80gb-pcap (power-capped H100) is left out: no datasheet describes that configuration.
SPLITWISE_HARDWARE = {"a100-80gb": "A100-80G", "h100-80gb": "H100"}


def observations_from_profiles(profiles_root: str | Path) -> list[Observation]:
    """Every Helix and Splitwise measurement under `profiles_root` (helix/, splitwise/perf_model.csv).

    Helix machine folders are named <gpu> or <gpu>x<n> (n GPUs in tensor parallel). Splitwise
    configurations whose prefill gets faster with a bigger batch are dropped as broken runs.
    """
    root = Path(profiles_root)
    out: list[Observation] = []
    for (model, machine), directory in discover_helix_profiles(root / "helix").items():
        gpu, _, count = machine.partition("x")
        if model not in HELIX_MODELS or gpu not in HELIX_GPUS:
            continue
        out += helix_observations(MODEL_FACTS[HELIX_MODELS[model]], HELIX_GPUS[gpu], int(count or 1),
                                  load_helix_layer_times(directory))
    rows = load_splitwise(root / "splitwise" / "perf_model.csv")
    configs = sorted({(r.model, r.hardware, r.tensor_parallel) for r in rows})
    for model, hardware, tp in configs:
        if model not in SPLITWISE_MODELS or hardware not in SPLITWISE_HARDWARE:
            continue
        chosen = consistent_runs([r for r in rows if (r.model, r.hardware, r.tensor_parallel) == (model, hardware, tp)])
        out += splitwise_observations(MODEL_FACTS[SPLITWISE_MODELS[model]], SPLITWISE_HARDWARE[hardware], chosen)
    return out


class _Group:
    """Observations sharing one profile (model x accelerator x n), as arrays for fast scoring."""

    def __init__(self, obs: list[Observation]):
        first = obs[0]
        self.model, self.n = first.model, first.accelerators
        self.sheet: AcceleratorDatasheet = DATASHEETS[first.accelerator]
        self.accelerator, self.source = first.accelerator, first.source
        self.obs = obs
        self.decode = np.array([o.phase == "decode" for o in obs])
        self.batch = np.array([o.batch for o in obs])
        self.prompt = np.array([o.prompt_tokens for o in obs])
        self.context = np.array([o.context_tokens if o.context_tokens is not None else np.nan for o in obs])
        self.measured = np.array([o.measured_s for o in obs])

    def predict(self, eff: Efficiency, unknown_context: float) -> np.ndarray:
        p = datasheet_profile(self.model, self.sheet, self.n, eff)
        ctx = np.where(np.isnan(self.context), unknown_context, self.context)
        dec = p.decode_base_s + p.decode_per_seq_s * self.batch + p.decode_per_kv_token_s * self.batch * ctx
        pre = (p.prefill_base_s + p.prefill_per_token_s * self.batch * self.prompt
               + p.prefill_per_token_sq_s * self.batch * self.prompt**2)
        return np.where(self.decode, dec, pre)


def _groups(observations: list[Observation]) -> list[_Group]:
    by_key = defaultdict(list)
    for o in observations:
        if o.accelerator not in DATASHEETS:
            raise ValueError(f"observation on {o.accelerator!r}: no datasheet (known: {sorted(DATASHEETS)})")
        by_key[(o.source, o.model.name, o.model.num_layers, o.accelerator, o.accelerators)].append(o)
    return [_Group(v) for _, v in sorted(by_key.items())]


class CalibrationError(BaseModel):
    """How far the datasheet profile is from the measurements of one accelerator, source and phase."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accelerator: str
    source: str
    phase: Literal["decode", "prefill"]
    count: int
    mape: float = Field(description="Mean absolute relative error.")
    max_error: float = Field(description="Largest absolute relative error.")
    bias: float = Field(description="Mean signed relative error (>0: profile slower than measured).")


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    efficiencies: dict[str, Efficiency]
    global_efficiency: Efficiency | None = None
    helix_context_tokens: float
    errors: list[CalibrationError]


def calibration_errors(
    observations: list[Observation],
    efficiencies: dict[str, Efficiency],
    helix_context_tokens: float,
    fallback: Efficiency | None = None,
) -> list[CalibrationError]:
    """Relative errors of the profiles these efficiencies give, per accelerator, source and phase."""
    rel = defaultdict(list)
    for g in _groups(observations):
        eff = efficiencies.get(g.accelerator, fallback)
        if eff is None:
            raise ValueError(f"no efficiency for {g.accelerator!r}")
        err = g.predict(eff, helix_context_tokens) / g.measured - 1
        for is_decode, e in zip(g.decode, err, strict=True):
            rel[(g.accelerator, g.source, "decode" if is_decode else "prefill")].append(e)
    out = []
    for (acc, source, phase), errs in sorted(rel.items()):
        a = np.asarray(errs)
        out.append(CalibrationError(accelerator=acc, source=source, phase=phase, count=len(a),
                                    mape=float(np.abs(a).mean()), max_error=float(np.abs(a).max()),
                                    bias=float(a.mean())))
    return out


_ETA_BOUNDS = (0.02, 1.0)
_TAU_SCALE = 1e-4
_TAU_START, _LINK_START = 1.0, 0.4


def calibrate(observations: list[Observation], *, per_accelerator: bool = True) -> Calibration:
    """Fit efficiencies to the observations (see the module docstring for what is shared)."""
    from scipy.optimize import least_squares

    groups = _groups(observations)
    accs = sorted({g.accelerator for g in groups}) if per_accelerator else ["*"]
    tp_accs = sorted({g.accelerator for g in groups if g.n > 1}) if per_accelerator else ["*"]
    acc_i = {a: 1 + 3 * i for i, a in enumerate(accs)}
    tp_i = {a: 1 + 3 * len(accs) + 2 * i for i, a in enumerate(tp_accs)}
    kind = {g.accelerator: g.sheet.interconnect for g in groups}
    x0 = [HELIX_CONTEXT_START] + [0.8, 0.4, 0.6] * len(accs) + [_TAU_START, _LINK_START] * len(tp_accs)
    lo = [0.0] + [_ETA_BOUNDS[0]] * 3 * len(accs) + [0.0, _ETA_BOUNDS[0]] * len(tp_accs)
    hi = [1e5] + [_ETA_BOUNDS[1]] * 3 * len(accs) + [100.0, _ETA_BOUNDS[1]] * len(tp_accs)

    def tp_terms(x, acc: str) -> tuple[float, float]:
        """Own TP terms when measured with n > 1, else the mean of measured types on the same link."""
        if acc in tp_i:
            return x[tp_i[acc]], x[tp_i[acc] + 1]
        donors = [tp_i[a] for a in tp_accs if kind.get(a) == kind.get(acc)] or list(tp_i.values())
        if not donors:
            return _TAU_START, _LINK_START
        return float(np.mean([x[i] for i in donors])), float(np.mean([x[i + 1] for i in donors]))

    def efficiency(x, acc: str) -> Efficiency:
        a = acc_i[acc if per_accelerator else "*"]
        tau, link = tp_terms(x, acc if per_accelerator else "*")
        return Efficiency(memory=x[a], decode_compute=x[a + 1], prefill_compute=x[a + 2],
                          tp_latency_per_layer_s=tau * _TAU_SCALE, link=link)

    def residuals(x):
        return np.concatenate([
            g.predict(efficiency(x, g.accelerator), x[0]) / g.measured - 1 for g in groups
        ])

    fit = least_squares(residuals, np.array(x0, dtype=float), bounds=(lo, hi), loss="soft_l1", f_scale=0.05,
                        x_scale="jac", max_nfev=400)
    x = fit.x
    effs = {g.accelerator: efficiency(x, g.accelerator) for g in groups}
    glob = None if per_accelerator else next(iter(effs.values()))
    has_helix = any(g.source == "helix" for g in groups)
    context = float(x[0]) if has_helix else HELIX_CONTEXT_START
    return Calibration(
        efficiencies=dict(sorted(effs.items())), global_efficiency=glob, helix_context_tokens=context,
        errors=calibration_errors(observations, effs, context),
    )
