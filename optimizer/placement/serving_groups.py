"""What one serving group of GPUs can do in a prefill or a decode role, and what a KV link carries.

A group is one replica: g GPUs of one type running the model as a g-stage pipeline (L/g layers
each, GPUs ordered by node so that stages on one machine talk over its internal bus). Rates are in
requests per second for the workload's mean request (I prompt tokens, O output tokens):

* prefill: a stage needs (L/g) x t_prompt(I) per request, so the group prefills
  g / (L x t_prompt(I)) requests/s; each stage boundary must also carry I activations per request.
* decode: the KV cache left after the weights holds B = KV tokens / (I + O) sequences; with g
  micro-batches of B/g in flight the group emits B / (L x t_decode(B/g)) tokens/s, i.e. that / O
  requests/s; each boundary carries one activation per token.
* KV link P -> D: every prefill stage sends the KV of its layers to the decode stages holding the
  same layers; the slowest transfer (or a NIC carrying several) sets the requests/s.

Per-layer times come from the same sources as the layer placement (``throughput``), so both
planners price a GPU the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from optimizer.placement.cluster import Cluster, ModelDescription, Node
from optimizer.placement.throughput import DEFAULT_USABLE_MEMORY_FRACTION, MS, LayerTimeSource
from optimizer.profile import ParametricProfile, ProfilePoint, TabulatedProfile

MAX_DECODE_BATCH = 512


@dataclass(frozen=True)
class Gpu:
    """One GPU: the node it sits in and its position there."""

    node: Node
    slot: int

    @property
    def id(self) -> str:
        return f"{self.node.name}/gpu{self.slot}"

    @property
    def accelerator(self) -> str:
        return self.node.machine.accelerator


@dataclass(frozen=True)
class GroupRates:
    prefill_rps: float
    decode_rps: float
    decode_batch: int
    memory_gb: float
    prefill_latency_s: float
    decode_step_s: float


def cluster_gpus(cluster: Cluster) -> list[Gpu]:
    return [Gpu(node, i) for node in cluster.nodes for i in range(node.machine.gpus)]


class GroupModel:
    """Rates of groups and KV links on one cluster for one model (memoised: the search asks often)."""

    def __init__(self, cluster: Cluster, model: ModelDescription, times: dict[str, LayerTimeSource]):
        self.cluster, self.model, self.times = cluster, model, times
        s = cluster.spec.throughput_model
        self.input_tokens, self.output_tokens = s.avg_input_tokens, s.avg_output_tokens
        self._rates: dict[tuple[str, ...], GroupRates] = {}
        self._kv: dict[tuple[tuple[str, ...], tuple[str, ...]], float] = {}
        self.gpus = {g.id: g for g in cluster_gpus(cluster)}

    @cached_property
    def kv_bytes_per_request(self) -> float:
        return self.input_tokens * self.model.kv_bytes_per_token

    def usable_gb(self, gpu: Gpu) -> float:
        calib = gpu.node.machine.calibration(self.model.name)
        total = calib.usable_memory_gb or DEFAULT_USABLE_MEMORY_FRACTION * gpu.node.machine.memory_gb
        return total / gpu.node.machine.gpus

    def min_group_size(self, gpus: list[Gpu]) -> int | None:
        """Fewest GPUs of this list's kind that hold the weights plus one full sequence of KV."""
        if not gpus:
            return None
        need = self.model.total_weight_gb + (self.input_tokens + self.output_tokens) * self.model.kv_bytes_per_token / 1e9
        per = min(self.usable_gb(g) for g in gpus)
        g = max(1, math.ceil(need / per - 1e-12))
        return g if g <= len(gpus) else None

    def ordered(self, ids) -> tuple[str, ...]:
        return tuple(sorted(ids, key=lambda i: (self.gpus[i].node.index, self.gpus[i].slot)))

    def _link_bytes(self, a: Gpu, b: Gpu) -> float:
        if a.node.index == b.node.index:
            return a.node.machine.intra_node.bytes_per_s
        return min(self.cluster.link(a.node, b.node).bytes_per_s, a.node.machine.nic.bytes_per_s,
                   b.node.machine.nic.bytes_per_s)

    def rates(self, ids) -> GroupRates:
        key = self.ordered(ids)
        if key not in self._rates:
            self._rates[key] = self._compute_rates(key)
        return self._rates[key]

    def _compute_rates(self, key: tuple[str, ...]) -> GroupRates:
        gpus = [self.gpus[i] for i in key]
        g, big_l = len(gpus), self.model.num_layers
        times = self.times[gpus[0].node.machine.name]
        memory = sum(self.usable_gb(x) for x in gpus)
        kv_tokens = (memory - self.model.total_weight_gb) * 1e9 / self.model.kv_bytes_per_token
        batch = int(min(MAX_DECODE_BATCH, kv_tokens / (self.input_tokens + self.output_tokens)))
        if batch < 1:
            return GroupRates(0.0, 0.0, 0, memory, math.inf, math.inf)
        act = self.model.activation_bytes_per_token
        boundary = min((self._link_bytes(a, b) for a, b in zip(gpus, gpus[1:], strict=False)), default=math.inf)
        prompt_s = times.prompt_ms_per_layer(self.input_tokens) / MS
        prefill = g / (big_l * prompt_s)
        prefill = min(prefill, boundary / (self.input_tokens * act))
        step_s = big_l * times.decode_ms_per_layer(max(batch / g, 1.0)) / MS
        decode_tokens = min(batch / step_s, boundary / act)
        return GroupRates(prefill_rps=prefill, decode_rps=decode_tokens / self.output_tokens, decode_batch=batch,
                          memory_gb=memory, prefill_latency_s=big_l * prompt_s + (g - 1) * self._hop_s(gpus),
                          decode_step_s=step_s)

    def _hop_s(self, gpus: list[Gpu]) -> float:
        lat = [self.cluster.link(a.node, b.node).latency_s if a.node.index != b.node.index else 0.0
               for a, b in zip(gpus, gpus[1:], strict=False)]
        return max(lat, default=0.0)

    def kv_rps(self, prefill_ids, decode_ids) -> float:
        """Requests/s whose prompt KV the link set from P to D can move."""
        key = (self.ordered(prefill_ids), self.ordered(decode_ids))
        if key not in self._kv:
            self._kv[key] = self._compute_kv(*key)
        return self._kv[key]

    def _compute_kv(self, p: tuple[str, ...], d: tuple[str, ...]) -> float:
        big_l, total = self.model.num_layers, self.kv_bytes_per_request
        pg, dg = [self.gpus[i] for i in p], [self.gpus[i] for i in d]
        worst = 0.0
        out_bytes: dict[int, float] = {}
        in_bytes: dict[int, float] = {}
        for i, a in enumerate(pg):
            lo_a, hi_a = i * big_l / len(pg), (i + 1) * big_l / len(pg)
            for j, b in enumerate(dg):
                lo_b, hi_b = j * big_l / len(dg), (j + 1) * big_l / len(dg)
                share = max(0.0, min(hi_a, hi_b) - max(lo_a, lo_b)) / big_l
                if share <= 0:
                    continue
                bytes_ = share * total
                worst = max(worst, bytes_ / self._link_bytes(a, b))
                if a.node.index != b.node.index:
                    out_bytes[a.node.index] = out_bytes.get(a.node.index, 0.0) + bytes_
                    in_bytes[b.node.index] = in_bytes.get(b.node.index, 0.0) + bytes_
        nics = {n.index: n.machine.nic.bytes_per_s for n in self.cluster.nodes}
        for node, b in list(out_bytes.items()) + list(in_bytes.items()):
            worst = max(worst, b / nics[node])
        return math.inf if worst == 0 else 1.0 / worst

    def kv_transfer_s(self, prefill_ids, decode_ids) -> float:
        rps = self.kv_rps(prefill_ids, decode_ids)
        return 0.0 if math.isinf(rps) else 1.0 / rps


def replica_profile(times: LayerTimeSource, layers: float):
    """A whole-replica profile that takes `layers` layers' time (ideal split of L layers over g GPUs)."""
    profile = getattr(times, "profile", None)
    if isinstance(profile, ParametricProfile):
        scaled = {k: getattr(profile, k) * layers for k in (
            "decode_base_s", "decode_per_seq_s", "decode_per_kv_token_s", "prefill_base_s",
            "prefill_per_token_s", "prefill_per_token_sq_s")}
        return ParametricProfile(**scaled)
    if isinstance(profile, TabulatedProfile):
        return TabulatedProfile(
            decode_points=[ProfilePoint(x=p.x, time_s=p.time_s * layers) for p in profile.decode_points],
            prefill_points=[ProfilePoint(x=p.x, time_s=p.time_s * layers) for p in profile.prefill_points],
        )
    decode = [(x, y) for x, y in times.decode_points if x > 0]
    return TabulatedProfile(
        decode_points=[ProfilePoint(x=x, time_s=y * layers / MS) for x, y in decode],
        prefill_points=[ProfilePoint(x=x, time_s=y * layers / MS) for x, y in times.prompt_points],
    )
