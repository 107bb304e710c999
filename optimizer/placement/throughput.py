"""How many tokens per second a node serves when it holds k layers: Helix's model, reproduced.

Helix (ASPLOS'25) prices a node with k layers at its throughput under a *typical* batch: the batch
the node would run if the cluster were busy and its KV cache filled to a high-water mark. Reusing
the exact model matters: placements are only comparable with Helix's published max flows when
every node is priced the same way. The steps, per machine type and layer count k:

1. A fixed-point estimate of each type's speed (layers x tokens/s at its typical layer count),
   iterated a fixed number of times from a starting guess, as Helix does (the iteration can
   oscillate, so the count and the start are part of the model, not a convergence detail).
2. The node's share of a request's round trip: its k layers' time over the time of all L layers,
   the other L - k priced at the cluster's mean layer time.
3. The typical batch: KV tokens per layer at the high-water mark, divided by the mean sequence
   length, times that share, gives the decode batch; the prompt tokens scale with it (at most
   one prompt per round).
4. Throughput = (prompt + decode tokens) / (k x (prefill time + decode time per layer)), capped
   by what the NIC can carry in activations (NIC bytes/s / activation bytes per token).

KV capacity per layer comes from memory: (usable memory - k x layer memory) / (k x KV bytes per
token-layer), in whole blocks. It reproduces the vLLM block counts Helix measured within 0.6 %.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from optimizer.placement.cluster import Cluster, MachineType, ModelDescription
from optimizer.problem import InputError
from optimizer.profile_data import load_helix_layer_times

DEFAULT_USABLE_MEMORY_FRACTION = 0.85
DEFAULT_TYPICAL_SHARE = 2 / 3
MS = 1000.0


class LayerTimeSource(Protocol):
    """Per-layer times in milliseconds; optimizer.profile_data.LayerTimes is one."""

    def prompt_ms_per_layer(self, tokens): ...

    def decode_ms_per_layer(self, batch): ...


class ProfileLayerTimes:
    """A decision-engine profile that describes ONE layer (seconds), seen as per-layer milliseconds."""

    def __init__(self, profile):
        self.profile = profile

    def prompt_ms_per_layer(self, tokens):
        return float(self.profile.prefill_s(tokens)) * MS

    def decode_ms_per_layer(self, batch):
        return float(self.profile.decode_step_s(batch)) * MS


def layer_time_sources(cluster: Cluster, model: ModelDescription,
                       profiles_root: str | Path | None = None) -> dict[str, LayerTimeSource]:
    """Per-layer times of the model on every machine type that has nodes.

    Measured tables (Helix's format, under ``profiles_root/<model.profile_dir>/<profile_dir>``)
    win over the inline ``layer_profile`` when a root is given, because they are what the
    published figures were computed from.
    """
    used = {n.machine.name for n in cluster.nodes}
    sources: dict[str, LayerTimeSource] = {}
    for i, mt in enumerate(cluster.spec.machine_types):
        if mt.name not in used:
            continue
        calib = mt.calibration(model.name)
        where = f"machine_types[{i}].models.{model.name}"
        if profiles_root is not None and calib.profile_dir and model.profile_dir:
            sources[mt.name] = load_helix_layer_times(Path(profiles_root) / model.profile_dir / calib.profile_dir)
        elif calib.layer_profile is not None:
            sources[mt.name] = ProfileLayerTimes(calib.layer_profile)
        elif profiles_root is not None:
            raise InputError(cluster.name, where, "no profile_dir to find measured per-layer times under --profiles")
        else:
            raise InputError(cluster.name, where, "no per-layer times: give layer_profile, or profile_dir and --profiles")
    return sources


class MachineModel(BaseModel):
    """One machine type's resolved calibration for one model."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    count: int
    max_layers: int
    typical_layers: int
    relative_speed: float
    usable_memory_gb: float
    layer_memory_gb: float
    nic_tokens_per_s: float
    times: object


def resolve_machines(cluster: Cluster, model: ModelDescription,
                     times: dict[str, LayerTimeSource]) -> dict[str, MachineModel]:
    """Each used machine type with every default rule applied (see MachineCalibration)."""
    counts = cluster.counts_by_type()
    out: dict[str, MachineModel] = {}
    for name, count in counts.items():
        mt: MachineType = cluster.machine_type(name)
        calib = mt.calibration(model.name)
        max_layers = calib.max_layers or int(0.5 * mt.memory_gb / model.layer_weight_gb)
        max_layers = min(max_layers, model.num_layers)
        typical = calib.typical_layers or max(1, round(DEFAULT_TYPICAL_SHARE * max(max_layers, 1)))
        speed = calib.relative_speed
        if speed is None:
            speed = 1.0 / max(times[name].decode_ms_per_layer(16), 1e-9)
        out[name] = MachineModel(
            name=name, count=count, max_layers=max_layers, typical_layers=min(typical, max(max_layers, 1)),
            relative_speed=speed,
            usable_memory_gb=calib.usable_memory_gb or DEFAULT_USABLE_MEMORY_FRACTION * mt.memory_gb,
            layer_memory_gb=calib.layer_memory_gb or model.layer_weight_gb,
            nic_tokens_per_s=mt.nic.bytes_per_s / model.activation_bytes_per_token,
            times=times[name],
        )
    settings = cluster.spec.throughput_model
    capacity = sum(m.count * m.typical_layers for m in out.values())
    if capacity < settings.dense_factor * model.num_layers:
        out = {k: m.model_copy(update={"typical_layers": max(m.max_layers, 1)}) for k, m in out.items()}
    return out


class NodeThroughputModel:
    """Tokens/s of a node of each machine type with k layers (k = 1 .. max_layers)."""

    def __init__(self, cluster: Cluster, model: ModelDescription, times: dict[str, LayerTimeSource]):
        self.cluster, self.model = cluster, model
        self.settings = cluster.spec.throughput_model
        self.machines = resolve_machines(cluster, model, times)
        speed = {name: m.relative_speed for name, m in self.machines.items()}
        for _ in range(self.settings.iterations):
            speed = {name: m.typical_layers * self._compute_tps(m, m.typical_layers, speed)
                     for name, m in self.machines.items()}
        self.speed = speed
        self.table: dict[str, list[float]] = {
            name: [0.0] + [min(self._compute_tps(m, k, speed), m.nic_tokens_per_s) for k in range(1, m.max_layers + 1)]
            for name, m in self.machines.items()
        }

    def throughput(self, machine: str, layers: int) -> float:
        """Tokens/s of one node of `machine` holding `layers` layers; 0 when it cannot hold them."""
        row = self.table[machine]
        return row[layers] if 0 < layers < len(row) else 0.0

    def max_layers(self, machine: str) -> int:
        return self.machines[machine].max_layers

    def kv_tokens_per_layer(self, m: MachineModel, layers: int) -> int:
        s = self.settings
        free = (m.usable_memory_gb - layers * m.layer_memory_gb) * 1e9
        if free <= 0:
            return 0
        blocks = int(free / (layers * self.model.kv_bytes_per_token_layer * s.kv_block_tokens))
        return blocks * s.kv_block_tokens

    def _compute_tps(self, m: MachineModel, k: int, speed: dict[str, float]) -> float:
        s = self.settings
        big_l = self.model.num_layers
        # Machine types that serve nothing (no room for KV, or no time measured) hold no share of a token.
        layer_time = {name: 1.0 / v for name, v in speed.items() if v > 0 and math.isfinite(1.0 / v)}
        serving = [x for x in self.machines.values() if x.name in layer_time]
        if m.name not in layer_time:
            return 0.0
        held = sum(x.count * x.typical_layers for x in serving)
        mean_layer_time = sum(x.count * x.typical_layers * layer_time[x.name] for x in serving) / held
        own = k * layer_time[m.name]
        share = own / (max(big_l - k, 0) * mean_layer_time + own)
        per_layer = int(s.kv_high_water * self.kv_tokens_per_layer(m, k))
        if per_layer <= 0:
            return 0.0
        seq = s.avg_input_tokens + s.avg_output_tokens
        prompts = per_layer / seq * share / s.avg_output_tokens
        prompt_tokens = round(prompts * s.avg_input_tokens)
        decode_tokens = round(per_layer / seq * share)
        if not prompts > 0:
            return 0.0
        if prompts > 1:
            prompts, prompt_tokens, decode_tokens = 1.0, s.avg_input_tokens, s.avg_output_tokens
        if prompts >= 1:
            tokens = prompt_tokens + decode_tokens
            per_layer_ms = m.times.prompt_ms_per_layer(prompt_tokens) + m.times.decode_ms_per_layer(decode_tokens)
        else:
            scale = 1.0 / prompts
            tokens = scale * (prompt_tokens + decode_tokens)
            per_layer_ms = (m.times.prompt_ms_per_layer(int(prompt_tokens * scale))
                            + m.times.decode_ms_per_layer(decode_tokens) * scale)
        seconds = k * per_layer_ms / MS
        return tokens / seconds if seconds > 0 and math.isfinite(seconds) else 0.0
