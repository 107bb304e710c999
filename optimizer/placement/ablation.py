"""The ablations HexGen-2 did not publish: how much the grouping method and the KV fabric matter.

1. Grouping method, same evaluator for all: spectral + Kernighan-Lin (+ moves) against random
   groupings (mean and best of several seeds) and a greedy "fastest GPUs first" grouping.
2. KV-link bandwidth swept from datacenter fabrics (400 Gbps) to cross-region links (12.5 Mbps):
   every inter-node link and NIC set to the value, each method re-run.

Latency comes from the capacity model (``optimizer.capacity.replica_capacity``): TTFT of the
busiest prefill group's variant (with its KV transfer) and ITL of the busiest decode group's,
at the highest rate that meets a loose SLO -- i.e. near saturation, the regime max flow plans for.
"""

from __future__ import annotations

import statistics

from pydantic import BaseModel, ConfigDict, Field

from optimizer.capacity import replica_capacity
from optimizer.fleet import Role
from optimizer.placement.cluster import Bandwidth, Cluster, ModelDescription
from optimizer.placement.grouping import (
    GroupingResult,
    greedy_grouping,
    grouping_model,
    random_grouping,
    spectral_kl_grouping,
)
from optimizer.placement.throughput import LayerTimeSource
from optimizer.workload import SLO, LengthBucket

LOOSE_SLO = SLO(model="any", ttft_s=60.0, itl_s=5.0, percentile=90.0)

# Datacenter (400/100/25/10 Gbps) down to Helix's cross-region link (12.5 Mbps), in Gbps (bits).
DEFAULT_SWEEP_GBPS = (400.0, 100.0, 25.0, 10.0, 1.0, 0.1, 0.0125)


class AblationRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    cluster: str
    model: str
    method: str
    max_flow_rps: float
    tokens_per_s: float
    relative_to_spectral_kl: float = Field(description="This method's max flow / spectral+KL's.")
    ttft_s: float | None
    itl_s: float | None
    cost_per_hour: float
    groups: int
    note: str = ""


class SweepPoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    bandwidth_gbps: float
    spectral_kl_rps: float
    random_mean_rps: float
    greedy_rps: float


def capacity_latency(result: GroupingResult, grouping, cluster: Cluster,
                     model: ModelDescription) -> tuple[float | None, float | None]:
    """(TTFT, ITL) of the busiest P and D groups from the capacity model, or the profile estimate."""
    if not result.kv_schedule:
        return result.ttft_s, result.itl_s
    busiest = max(result.kv_schedule, key=lambda s: s.requests_per_s)
    by_name = {g.name: g for g in result.groups}
    variants = {(v.accelerator, v.accelerators_per_replica, v.role): v for v in result.variants}
    spec = model.model_spec()
    s = cluster.spec.throughput_model
    bucket = LengthBucket(input_tokens=s.avg_input_tokens, output_tokens=s.avg_output_tokens, share=1.0)
    slo = LOOSE_SLO.model_copy(update={"model": model.name})
    out: list[float | None] = [result.ttft_s, result.itl_s]
    for idx, (name, role) in enumerate(((busiest.prefill, Role.PREFILL), (busiest.decode, Role.DECODE))):
        g = by_name[name]
        variant = variants.get((g.accelerator, len(g.gpus), role))
        if variant is None:
            continue
        acc = cluster.machine_type(g.machine).accelerator_entry()
        kv_s = grouping.kv_transfer_s(tuple(by_name[busiest.prefill].gpus), tuple(by_name[busiest.decode].gpus))
        try:
            est = replica_capacity(variant, spec, acc, bucket, slo, kv_transfer_s=kv_s)
        except ValueError:
            continue
        value = est.ttft_s if role == Role.PREFILL else est.itl_s
        if est.max_rate_rps > 0 and value is not None:
            out[idx] = value
    return out[0], out[1]


def grouping_ablation(cluster: Cluster, model: ModelDescription, times: dict[str, LayerTimeSource], *,
                      seeds: int = 10, time_limit_s: float = 10.0) -> tuple[list[AblationRow], GroupingResult]:
    """Rows for spectral+KL, random (mean and best of `seeds`) and greedy; plus the spectral+KL result."""
    gm = grouping_model(cluster, model, times)
    ours = spectral_kl_grouping(gm, time_limit_s=time_limit_s)
    randoms = [random_grouping(gm, seed) for seed in range(seeds)]
    greedy = greedy_grouping(gm)
    base = ours.max_flow_rps

    def row(method: str, r: GroupingResult, flow: float | None = None, note: str = "") -> AblationRow:
        ttft, itl = capacity_latency(r, gm, cluster, model)
        f = r.max_flow_rps if flow is None else flow
        tokens = f * (gm.input_tokens + gm.output_tokens)
        return AblationRow(cluster=cluster.name, model=model.name, method=method, max_flow_rps=f, tokens_per_s=tokens,
                           relative_to_spectral_kl=f / base if base > 0 else 0.0, ttft_s=ttft, itl_s=itl,
                           cost_per_hour=r.cost_per_hour, groups=len(r.groups), note=note)

    best_random = max(randoms, key=lambda r: r.max_flow_rps)
    mean_random = statistics.fmean(r.max_flow_rps for r in randoms)
    rows = [
        row("spectral+KL", ours),
        row(f"random (mean of {seeds})", best_random, mean_random, note="latency/cost of the best seed"),
        row(f"random (best of {seeds})", best_random),
        row("greedy (fastest first)", greedy),
    ]
    return rows, ours


def uniform_fabric(cluster: Cluster, gbps: float) -> Cluster:
    """The cluster with every inter-node link and every NIC at `gbps` (bits/s), latencies kept."""
    spec = cluster.spec
    net = spec.network
    bw = Bandwidth(gbps=gbps, latency_ms=net.default.latency_ms)
    network = net.model_copy(update={
        "default": bw, "cross_region": None, "links": [],
        "regions": [r.model_copy(update={"intra": None}) for r in net.regions]})
    machines = [m.model_copy(update={"nic": Bandwidth(gbps=gbps)}) for m in spec.machine_types]
    return Cluster(spec.model_copy(update={"network": network, "machine_types": machines}))


def bandwidth_sweep(cluster: Cluster, model: ModelDescription, times: dict[str, LayerTimeSource], *,
                    gbps_values=DEFAULT_SWEEP_GBPS, seeds: int = 5, time_limit_s: float = 3.0) -> list[SweepPoint]:
    """Max flow of each grouping method as the fabric slows from datacenter to cross-region."""
    points = []
    for gbps in gbps_values:
        c = uniform_fabric(cluster, gbps)
        gm = grouping_model(c, model, times)
        points.append(SweepPoint(
            bandwidth_gbps=gbps,
            spectral_kl_rps=spectral_kl_grouping(gm, time_limit_s=time_limit_s).max_flow_rps,
            random_mean_rps=statistics.fmean(random_grouping(gm, s).max_flow_rps for s in range(seeds)),
            greedy_rps=greedy_grouping(gm).max_flow_rps,
        ))
    return points


def format_rows(rows: list[AblationRow]) -> str:
    """A plain-text table (the command prints it; rich is the command's business)."""
    head = f"{'method':<24} {'req/s':>8} {'tokens/s':>10} {'vs ours':>8} {'TTFT s':>8} {'ITL s':>8} {'$/h':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ttft = f"{r.ttft_s:.3f}" if r.ttft_s is not None else "-"
        itl = f"{r.itl_s:.4f}" if r.itl_s is not None else "-"
        lines.append(f"{r.method:<24} {r.max_flow_rps:>8.3f} {r.tokens_per_s:>10.1f} {r.relative_to_spectral_kl:>8.2f} "
                     f"{ttft:>8} {itl:>8} {r.cost_per_hour:>8.2f}")
    return "\n".join(lines)


def format_sweep(points: list[SweepPoint]) -> str:
    head = f"{'link Gbps':>10} {'spectral+KL':>12} {'random mean':>12} {'greedy':>10}   (requests/s)"
    lines = [head]
    for p in points:
        lines.append(f"{p.bandwidth_gbps:>10g} {p.spectral_kl_rps:>12.3f} {p.random_mean_rps:>12.3f} {p.greedy_rps:>10.3f}")
    return "\n".join(lines)
