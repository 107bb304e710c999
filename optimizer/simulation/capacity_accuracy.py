"""How close the analytical capacity model is to the replica simulator: predicted vs simulated max rate.

The reference for one (replica, request mix, SLO percentile) cell is the Poisson arrival rate at
which the simulated replica (``optimizer.simulation.replica``) starts to miss the SLO: the
percentile of TTFT (roles that prefill) or of per-request mean ITL (roles that decode) over the
requests after a warm-up share, bisected over rates in [span] x the model's own prediction. The
same exponential gaps and lengths are replayed at every rate (common random numbers), so the
miss/no-miss answer is monotone in the rate for all practical purposes.

The standard grid (``accuracy_cells``) is the example fleet's PD variants x four length mixes
(short chat, Azure-conversation-like lognormal spread, long prompts of 8-12k tokens, KV-bound long
decodes) x p90 and p99; ``tests/test_capacity.py`` asserts the +/-5 % bar on it and
``benchmarks/bench_capacity.py`` prints the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from optimizer.capacity import replica_capacity
from optimizer.fleet import Accelerator, ModelSpec, Variant
from optimizer.kv_memory import kv_capacity_tokens
from optimizer.problem import Problem
from optimizer.simulation.replica import simulate_replica
from optimizer.workload import SLO, LengthBucket

ACCURACY_VARIANTS = ("llama8b-h100", "llama8b-a100", "llama8b-l4", "qwen32b-h100x2", "llama70b-h100x4",
                     "llama70b-a100x4")
MIXES = ("chat", "azure-conv", "long-prompt", "kv-bound")
PERCENTILES = (90.0, 99.0)
LONG_PROMPT_TTFT_FACTOR = 2.0  # document-style traffic gets twice the model's chat TTFT target


def _lognormal(rng, mean: float, cv: float, n: int) -> np.ndarray:
    sigma = math.sqrt(math.log1p(cv * cv))
    return mean * np.exp(sigma * rng.standard_normal(n) - sigma * sigma / 2)


def mix_lengths(mix: str, n: int, seed: int = 20240601) -> tuple[np.ndarray, np.ndarray]:
    """(input, output) tokens of n requests of a named mix."""
    rng = np.random.default_rng(seed)
    if mix == "chat":  # short chat turns
        ins, outs = _lognormal(rng, 300, 0.6, n), _lognormal(rng, 150, 0.8, n)
    elif mix == "azure-conv":  # Azure LLM inference trace 2023, conversation: mean 1155 / 211, cv 0.96 / 0.77
        ins, outs = _lognormal(rng, 1155, 0.96, n), _lognormal(rng, 211, 0.77, n)
    elif mix == "long-prompt":  # documents: 8-12k token prompts, short answers
        ins, outs = rng.uniform(8000, 12000, n), _lognormal(rng, 200, 0.5, n)
    elif mix == "kv-bound":  # long answers: the KV cache, not max_batch, bounds the batch
        ins, outs = _lognormal(rng, 1500, 0.3, n), _lognormal(rng, 1500, 0.3, n)
    else:
        raise ValueError(f"unknown mix {mix!r}; known: {', '.join(MIXES)}")
    return np.maximum(1, np.round(ins)).astype(np.int64), np.maximum(2, np.round(outs)).astype(np.int64)


def bucket_of(ins: np.ndarray, outs: np.ndarray) -> LengthBucket:
    """The length bucket the operator would observe for these requests: means and coefficients of variation."""
    return LengthBucket(input_tokens=float(ins.mean()), output_tokens=float(outs.mean()), share=1.0,
                        input_tokens_cv=float(ins.std() / ins.mean()), output_tokens_cv=float(outs.std() / outs.mean()))


def misses_slo(variant: Variant, kv_tokens: float, slo: SLO, gaps: np.ndarray, ins, outs, rate: float,
               *, warm_share: float = 0.1, kv_transfer_s: float = 0.0) -> bool:
    """Whether the simulated replica fed Poisson arrivals at ``rate`` misses the SLO percentile."""
    rec = simulate_replica(variant.profile, np.cumsum(gaps / rate), ins, outs, max_batch=variant.max_batch,
                           kv_capacity_tokens=kv_tokens, role=variant.role, kv_transfer_s=kv_transfer_s)
    warm = slice(int(len(ins) * warm_share), None)
    if variant.role.does_prefill and np.percentile(rec.ttft_s[warm], slo.percentile) > slo.ttft_s:
        return True
    return bool(variant.role.does_decode and np.nanpercentile(rec.itl_s[warm], slo.percentile) > slo.itl_s)


def simulated_max_rate(variant: Variant, model: ModelSpec, accelerator: Accelerator, slo: SLO, ins, outs,
                       guess: float, *, span: tuple[float, float] = (0.5, 1.5), steps: int = 8, seed: int = 20240601,
                       kv_transfer_s: float = 0.0) -> float:
    """Bisect the Poisson rate in span x guess where the simulated replica first misses the SLO."""
    if guess <= 0:
        raise ValueError(f"guess must be > 0, got {guess}")
    gaps = np.random.default_rng(seed).exponential(1.0, len(ins))
    kv = kv_capacity_tokens(model, accelerator, variant.accelerators_per_replica)
    lo, hi = span[0] * guess, span[1] * guess
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if misses_slo(variant, kv, slo, gaps, ins, outs, mid, kv_transfer_s=kv_transfer_s):
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class AccuracyCell:
    variant: str
    mix: str
    percentile: float
    predicted_rps: float
    simulated_rps: float
    limiting: str

    @property
    def error(self) -> float:
        """Predicted / simulated - 1 (positive: the model is optimistic)."""
        return self.predicted_rps / self.simulated_rps - 1.0 if self.simulated_rps > 0 else math.inf


def cell_slo(problem: Problem, variant: Variant, mix: str, percentile: float) -> SLO:
    slo = problem.slo(variant.model)
    update: dict = {"percentile": percentile}
    if mix == "long-prompt":
        update["ttft_s"] = slo.ttft_s * LONG_PROMPT_TTFT_FACTOR
    return slo.model_copy(update=update)


def accuracy_cell(problem: Problem, variant_name: str, mix: str, percentile: float, *, requests: int = 3000,
                  steps: int = 8) -> AccuracyCell | None:
    """One cell of the grid; None when the model says the replica cannot serve the mix at all."""
    variant = next(v for v in problem.variants if v.name == variant_name)
    model, acc = problem.model(variant.model), problem.accelerator(variant.accelerator)
    slo = cell_slo(problem, variant, mix, percentile)
    ins, outs = mix_lengths(mix, requests)
    est = replica_capacity(variant, model, acc, bucket_of(ins, outs), slo)
    if est.max_rate_rps <= 0:
        return None
    simulated = simulated_max_rate(variant, model, acc, slo, ins, outs, est.max_rate_rps, steps=steps)
    return AccuracyCell(variant_name, mix, percentile, est.max_rate_rps, simulated, est.limiting)


def _cell_job(args) -> AccuracyCell | None:
    problem, v, m, p, requests, steps = args
    return accuracy_cell(problem, v, m, p, requests=requests, steps=steps)


def accuracy_cells(problem: Problem, *, variants=ACCURACY_VARIANTS, mixes=MIXES, percentiles=PERCENTILES,
                   requests: int = 3000, steps: int = 8,
                   workers: int = 1) -> dict[tuple[str, str, float], AccuracyCell | None]:
    """Every (variant, mix, percentile) of the grid; ``workers`` > 1 runs cells in that many processes."""
    keys = [(v, m, p) for v in variants for m in mixes for p in percentiles]
    jobs = [(problem, v, m, p, requests, steps) for v, m, p in keys]
    if workers <= 1:
        return dict(zip(keys, map(_cell_job, jobs), strict=True))
    from concurrent.futures import ProcessPoolExecutor

    # The slowest cells (KV-bound on small GPUs) first, so the pool is not left waiting on one.
    order = sorted(range(len(jobs)), key=lambda i: (keys[i][1] != "kv-bound", keys[i][1] != "long-prompt"))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_cell_job, [jobs[i] for i in order]))
    out = {keys[i]: r for i, r in zip(order, results, strict=True)}
    return {k: out[k] for k in keys}


def format_table(cells: dict[tuple[str, str, float], AccuracyCell | None], bar: float = 0.05) -> str:
    """Predicted vs simulated max rate per cell, one line each."""
    lines = [f"{'variant':<16} {'mix':<12} {'pct':>4} {'predicted':>10} {'simulated':>10} {'error':>8}  limiting",
             "-" * 76]
    for (v, m, p), c in cells.items():
        if c is None:
            lines.append(f"{v:<16} {m:<12} {p:>4.0f} {'0 (cannot serve)':>21}")
            continue
        flag = "" if abs(c.error) <= bar else "  OUTSIDE"
        lines.append(f"{v:<16} {m:<12} {p:>4.0f} {c.predicted_rps:>10.3f} {c.simulated_rps:>10.3f} "
                     f"{100 * c.error:>+7.1f}%  {c.limiting}{flag}")
    inside = sum(1 for c in cells.values() if c is not None and abs(c.error) <= bar)
    servable = sum(1 for c in cells.values() if c is not None)
    lines.append(f"{inside} of {servable} servable cells within +/-{100 * bar:.0f} %")
    return "\n".join(lines)
