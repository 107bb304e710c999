"""Synthetic fleets for the allocation benchmark: many models, many accelerator types, binding inventory.

Real fleets mix small and large models, cheap and fast accelerators and request mixes from chat to
long documents; the allocation engine is only interesting (and only hard) when the cheapest
accelerator types run out. This module builds such fleets deterministically from a seed.

Per-replica capacities come from a roofline: decode reads the weights and the KV cache once per
iteration at ~80 % of the datasheet bandwidth, prefill runs at ~50 % of the datasheet FLOP/s, and a
replica serves a bucket at SLO only if one prefill fits in half the TTFT target and one decode
iteration at the chosen batch fits in the ITL target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from optimizer.fleet import Accelerator, ModelSpec, Role, Variant
from optimizer.problem import AllocationOptions, Problem
from optimizer.profile import ParametricProfile
from optimizer.workload import SLO, LengthBucket, Workload

# name, memory GB, bandwidth GB/s, dense TFLOP/s, $/h, W
ACCELERATOR_CATALOG = [
    ("H200", 141, 4800, 989, 4.3, 700),
    ("H100", 80, 3350, 989, 3.2, 700),
    ("MI300X", 192, 5300, 1307, 3.6, 750),
    ("A100-80G", 80, 2039, 312, 1.9, 400),
    ("A100-40G", 40, 1555, 312, 1.4, 400),
    ("L40S", 48, 864, 362, 1.1, 350),
    ("A10G", 24, 600, 125, 0.75, 300),
    ("L4", 24, 300, 121, 0.5, 72),
    ("V100", 32, 900, 125, 0.7, 300),
    ("T4", 16, 320, 65, 0.3, 70),
]

# (input tokens, output tokens): chat, code, summarisation, long documents
BUCKET_CATALOG = [
    (128, 128), (256, 512), (512, 256), (1024, 128), (1024, 1024),
    (2048, 256), (4096, 512), (8192, 256), (256, 2048), (16384, 512),
]

MODEL_SIZES_B = [1, 3, 7, 8, 13, 14, 27, 34, 70, 72]
TTFT_S = 2.0
ITL_S = 0.08


@dataclass(frozen=True)
class Instance:
    problem: Problem
    capacity: dict[tuple[str, str], float]


def _profile(params_b: float, kv_bytes: float, acc: tuple, k: int) -> ParametricProfile:
    _, _, bw, tflops, _, _ = acc
    eff_bw = 0.8 * bw * 1e9 * k
    return ParametricProfile(
        decode_base_s=params_b * 2e9 / eff_bw + 0.002,
        decode_per_seq_s=2e-5,
        decode_per_kv_token_s=kv_bytes / eff_bw,
        prefill_base_s=0.005,
        prefill_per_token_s=2 * params_b * 1e9 / (0.5 * tflops * 1e12 * k),
    )


def _max_batch(params_b: float, kv_bytes: float, acc: tuple, k: int, context: float) -> int:
    free = 0.9 * acc[1] * 1e9 * k - params_b * 2e9
    return max(0, int(free / (kv_bytes * context)))


def _bucket_capacities(prof, params_b, kv_bytes, acc, k, role, buckets) -> dict[str, float]:
    caps = {}
    for b in buckets:
        batch_limit = min(_max_batch(params_b, kv_bytes, acc, k, b.input_tokens + b.output_tokens), 256)
        cap = roofline_capacity(prof, batch_limit, role, b.input_tokens, b.output_tokens)
        if cap > 0:
            caps[b.label] = cap
    return caps


def roofline_capacity(prof: ParametricProfile, batch_limit: int, role: Role, inp: float, out: float) -> float:
    """Requests/s one replica sustains for one bucket at SLO, 0 when the SLO cannot be met."""
    prefill = float(prof.prefill_s(inp))
    if role.does_prefill and prefill > TTFT_S / 2:
        return 0.0
    context = inp + out / 2
    batch = batch_limit
    while batch > 0 and float(prof.decode_step_s(batch, context)) > ITL_S:
        batch = batch * 3 // 4
    if role.does_decode and batch == 0:
        return 0.0
    step = float(prof.decode_step_s(max(batch, 1), context))
    if role is Role.PREFILL:
        return 1.0 / prefill
    if role is Role.DECODE:
        return batch / (step * out)
    return 1.0 / (prefill + out * step / batch)


def make_instance(
    n_models: int,
    n_accelerators: int = 10,
    n_buckets: int = 10,
    *,
    seed: int = 0,
    disaggregated_share: float = 0.3,
    scarcity: float = 0.6,
    change_penalty: float = 0.0,
    sizes_per_accelerator: int = 1,
) -> Instance:
    """A fleet whose cheapest-per-request accelerator types hold only `scarcity` of what demand wants.

    Inventory is set from the unconstrained LP usage: the three most used types get `scarcity` of
    it (rounded down), the rest get twice their usage plus 30 % of the total, so the inventory
    constraints bind while all demand can still be served on dearer types.
    """
    rng = np.random.default_rng(seed)
    accs = ACCELERATOR_CATALOG[:n_accelerators]
    bucket_specs = BUCKET_CATALOG[:n_buckets]
    models, variants, workloads, slos = [], [], [], []
    capacity: dict[tuple[str, str], float] = {}
    for i in range(n_models):
        params_b = float(rng.choice(MODEL_SIZES_B))
        kv_bytes = 2 * 2 * (32 + params_b / 2) * 128 * 8 * (1 + params_b / 35)
        name = f"m{i:03d}-{params_b:g}b"
        models.append(ModelSpec(name=name, weight_gb=params_b * 2, kv_bytes_per_token=kv_bytes, params_b=params_b))
        shares = rng.dirichlet(np.full(n_buckets, 0.7))
        shares = np.maximum(shares, 1e-3)
        shares = shares / shares.sum()
        buckets = [
            LengthBucket(input_tokens=inp, output_tokens=out, share=float(s))
            for (inp, out), s in zip(bucket_specs, shares, strict=True)
        ]
        rate = float(math.exp(rng.uniform(math.log(0.3), math.log(40.0))))
        workloads.append(Workload(model=name, arrival_rate_rps=rate, buckets=buckets,
                                  priority=float(rng.choice([1.0, 1.0, 2.0]))))
        slos.append(SLO(model=name, ttft_s=TTFT_S, itl_s=ITL_S))
        disagg = params_b >= 13 and rng.random() < disaggregated_share
        roles = [Role.BOTH, Role.PREFILL, Role.DECODE] if disagg else [Role.BOTH]
        for acc in accs:
            sizes = []
            for k in (1, 2, 4, 8):
                mb = _max_batch(params_b, kv_bytes, acc, k, 2048)
                if params_b * 2 >= 0.75 * acc[1] * k or mb < 1:
                    continue
                prof = _profile(params_b, kv_bytes, acc, k)
                caps = {role: _bucket_capacities(prof, params_b, kv_bytes, acc, k, role, buckets) for role in roles}
                sizes.append((-len(caps[Role.BOTH]), k, prof, mb, caps))
            for _, k, prof, mb, caps in sorted(sizes, key=lambda t: t[:2])[:sizes_per_accelerator]:
                for role in roles:
                    if not caps[role]:
                        continue
                    vname = f"{name}-{acc[0]}x{k}-{role.value}"
                    variants.append(Variant(
                        name=vname, model=name, accelerator=acc[0], accelerators_per_replica=k,
                        max_batch=max(1, min(mb, 256)), role=role, profile=prof,
                    ))
                    for label, cap in caps[role].items():
                        capacity[(vname, label)] = cap
    accelerators = [
        Accelerator(name=a[0], memory_gb=a[1], memory_bandwidth_gb_s=a[2], peak_tflops=a[3],
                    cost_per_hour=a[4], power_w=a[5])
        for a in accs
    ]
    options = AllocationOptions(change_penalty_per_replica=change_penalty)
    problem = Problem(accelerators=accelerators, models=models, variants=variants,
                      workloads=workloads, slos=slos, options=options)
    wanted, _ = _greedy_usage(problem, capacity, excluded=set())
    scarce = set(sorted(wanted, key=lambda a: -wanted[a])[:3])
    _, without_scarce = _greedy_usage(problem, capacity, excluded=scarce)
    limited = [
        acc.model_copy(update={"available": max(int(scarcity * wanted[acc.name]), without_scarce[acc.name])
                               if acc.name in scarce else without_scarce[acc.name]})
        for acc in accelerators
    ]
    return Instance(problem.model_copy(update={"accelerators": limited}), capacity)


def _greedy_usage(problem: Problem, capacity, excluded: set[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Accelerators per type when each bucket goes to its cheapest option per request.

    Options on `excluded` types are used only where nothing else can serve a bucket. Returns the
    fractional usage (what an LP would want) and the integer usage after rounding each variant's
    replicas up, which is a feasible allocation on its own.
    """
    by_model: dict[str, list[Variant]] = {}
    for v in problem.variants:
        by_model.setdefault(v.model, []).append(v)
    replicas: dict[str, float] = {}
    for w in problem.workloads:
        for label, rate in w.bucket_rates_rps().items():
            best = None
            for avoid in (True, False):
                options = [v for v in by_model.get(w.model, [])
                           if capacity.get((v.name, label), 0.0) > 0 and not (avoid and v.accelerator in excluded)]
                def price(v, label=label):
                    return problem.variant_cost_per_hour(v) / capacity[(v.name, label)]
                pd = [v for v in options if v.role is Role.BOTH]
                pre = [v for v in options if v.role is Role.PREFILL]
                dec = [v for v in options if v.role is Role.DECODE]
                if pd:
                    v = min(pd, key=price)
                    best = (price(v), [v])
                if pre and dec:
                    vp, vd = min(pre, key=price), min(dec, key=price)
                    if best is None or price(vp) + price(vd) < best[0]:
                        best = (price(vp) + price(vd), [vp, vd])
                if best is not None:
                    break
            for v in best[1] if best else []:
                replicas[v.name] = replicas.get(v.name, 0.0) + rate / capacity[(v.name, label)]
    fractional = {a.name: 0.0 for a in problem.accelerators}
    integer = {a.name: 0 for a in problem.accelerators}
    variants = {v.name: v for v in problem.variants}
    for name, n in replicas.items():
        v = variants[name]
        fractional[v.accelerator] += n * v.accelerators_per_replica
        integer[v.accelerator] += math.ceil(n - 1e-9) * v.accelerators_per_replica
    return fractional, integer
