"""Performance profiles from datasheet facts, for variants nobody has profiled yet.

Decode is memory-bound: every iteration reads all weights once, plus each sequence's KV cache.
Prefill is compute-bound: about 2 FLOPs per parameter per prompt token, plus causal attention.
Real servers reach only part of the datasheet roofline, so each bound is divided by an
efficiency calibrated against measured profiles (``optimizer.calibration``; figures below).
Tensor parallelism (n accelerators per replica) divides the bytes and FLOPs by n but adds two
all-reduces per layer: a latency per layer that grows with log2(n) (ring/tree steps) and a
per-token transfer over the interconnect. Both terms are needed: without them the profiles of
Helix's 2- and 4-GPU PCIe boxes and Splitwise's TP 2/4/8 NVLink runs come out 10-50 % too fast.

The resulting ``ParametricProfile``:

* decode_base_s         = weight bytes / (n * BW * eta_mem) + layers * tp_latency * log2(n)
* decode_per_seq_s      = 2 * params / (n * FLOPS * eta_decode) + all-reduce bytes per token / link
* decode_per_kv_token_s = KV bytes per token / (n * BW * eta_mem)
* prefill_base_s        = decode_base_s   (a prefill reads the weights too)
* prefill_per_token_s   = 2 * params / (n * FLOPS * eta_prefill) + all-reduce bytes per token / link
* prefill_per_token_sq_s = layers * 2 * hidden / (n * FLOPS * eta_prefill)   (causal attention)
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from optimizer.fleet import Accelerator, ModelSpec
from optimizer.profile import ParametricProfile

GB = 1e9
TFLOPS = 1e12


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AcceleratorDatasheet(_Strict):
    """Public datasheet numbers of one accelerator type."""

    name: str = Field(min_length=1)
    memory_gb: float = Field(gt=0)
    memory_bandwidth_gb_s: float = Field(gt=0, description="HBM/GDDR bandwidth.")
    peak_tflops: float = Field(gt=0, description="Dense fp16/bf16 tensor-core TFLOP/s (no sparsity).")
    interconnect: Literal["nvlink", "pcie"] = Field(description="What tensor-parallel all-reduces cross.")
    interconnect_gb_s: float = Field(gt=0, description="GPU-to-GPU bandwidth per direction.")
    power_w: float | None = Field(default=None, gt=0, description="Board power (TDP).")

    def accelerator(self, cost_per_hour: float, available: int | None = None, name: str | None = None) -> Accelerator:
        """The fleet entry for this type, at a price and an inventory."""
        return Accelerator(
            name=name or self.name, memory_gb=self.memory_gb, cost_per_hour=cost_per_hour, available=available,
            power_w=self.power_w, memory_bandwidth_gb_s=self.memory_bandwidth_gb_s, peak_tflops=self.peak_tflops,
        )


DATASHEETS: dict[str, AcceleratorDatasheet] = {
    d.name: d
    for d in [
        # NVIDIA A100 datasheet (SXM4): 1555 GB/s (40 GB), 2039 GB/s (80 GB), 312 TF fp16 dense,
        # NVLink 3 600 GB/s bidirectional = 300 GB/s per direction, 400 W.
        AcceleratorDatasheet(name="A100-40G", memory_gb=40, memory_bandwidth_gb_s=1555, peak_tflops=312,
                             interconnect="nvlink", interconnect_gb_s=300, power_w=400),
        AcceleratorDatasheet(name="A100-80G", memory_gb=80, memory_bandwidth_gb_s=2039, peak_tflops=312,
                             interconnect="nvlink", interconnect_gb_s=300, power_w=400),
        # H100 SXM5: 3350 GB/s, 989 TF bf16 dense, NVLink 4 900 GB/s bidirectional, 700 W.
        AcceleratorDatasheet(name="H100", memory_gb=80, memory_bandwidth_gb_s=3350, peak_tflops=989,
                             interconnect="nvlink", interconnect_gb_s=450, power_w=700),
        # L4: 300 GB/s GDDR6, 121 TF fp16 dense (242 with sparsity), PCIe Gen4 x16, 72 W.
        AcceleratorDatasheet(name="L4", memory_gb=24, memory_bandwidth_gb_s=300, peak_tflops=121,
                             interconnect="pcie", interconnect_gb_s=32, power_w=72),
        # T4: 320 GB/s GDDR6, 65 TF fp16 mixed precision, PCIe Gen3 x16, 70 W.
        AcceleratorDatasheet(name="T4", memory_gb=16, memory_bandwidth_gb_s=320, peak_tflops=65,
                             interconnect="pcie", interconnect_gb_s=16, power_w=70),
        # V100 SXM2 32 GB: 900 GB/s, 125 TF tensor, NVLink 2 300 GB/s bidirectional, 300 W.
        AcceleratorDatasheet(name="V100", memory_gb=32, memory_bandwidth_gb_s=900, peak_tflops=125,
                             interconnect="nvlink", interconnect_gb_s=150, power_w=300),
    ]
}


class ModelFacts(_Strict):
    """What the roofline needs of a model: bytes read per step, FLOPs per token, KV bytes, shape."""

    name: str = Field(min_length=1)
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    layer_params: float = Field(gt=0, description="Parameters of one transformer layer.")
    embedding_params: float = Field(ge=0, description="Input embedding (looked up, not multiplied).")
    lm_head_params: float = Field(ge=0, description="Output projection (read and multiplied every step).")
    kv_bytes_per_token: float = Field(gt=0, description="KV cache bytes one token occupies, all layers.")
    bytes_per_param: float = Field(default=2.0, gt=0, description="2 for fp16/bf16, 1 for fp8.")

    @classmethod
    def from_architecture(
        cls,
        name: str,
        *,
        num_layers: int,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        vocab_size: int,
        head_dim: int | None = None,
        gated_mlp: bool = True,
        tied_embeddings: bool = False,
        bytes_per_param: float = 2.0,
        kv_bytes_per_value: float = 2.0,
    ) -> ModelFacts:
        """Facts of a dense decoder from its config.json numbers (biases and norms neglected)."""
        hd = head_dim or hidden_size // num_heads
        attention = 2 * hidden_size * num_heads * hd + 2 * hidden_size * num_kv_heads * hd
        mlp = (3 if gated_mlp else 2) * hidden_size * intermediate_size
        embed = vocab_size * hidden_size
        return cls(
            name=name, num_layers=num_layers, hidden_size=hidden_size, layer_params=attention + mlp,
            embedding_params=0 if tied_embeddings else embed, lm_head_params=embed,
            kv_bytes_per_token=num_layers * num_kv_heads * hd * 2 * kv_bytes_per_value,
            bytes_per_param=bytes_per_param,
        )

    def layers_only(self, num_layers: int) -> ModelFacts:
        """`num_layers` of this model's layers without embeddings: what a pipeline stage holds."""
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        return self.model_copy(update={
            "num_layers": num_layers, "embedding_params": 0.0, "lm_head_params": 0.0,
            "kv_bytes_per_token": self.kv_bytes_per_token * num_layers / self.num_layers,
        })

    @property
    def params(self) -> float:
        return self.num_layers * self.layer_params + self.embedding_params + self.lm_head_params

    @property
    def matmul_params(self) -> float:
        """Parameters multiplied per token (all but the input-embedding lookup)."""
        return self.num_layers * self.layer_params + self.lm_head_params

    @property
    def weight_gb(self) -> float:
        return self.params * self.bytes_per_param / GB

    @property
    def read_bytes_per_step(self) -> float:
        return self.matmul_params * self.bytes_per_param

    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            name=self.name, weight_gb=round(self.weight_gb, 2), kv_bytes_per_token=self.kv_bytes_per_token,
            num_layers=self.num_layers, params_b=round(self.params / 1e9, 2),
        )


_arch = ModelFacts.from_architecture

# Shapes from each model's config.json on Hugging Face (fp16/bf16 weights).
MODEL_FACTS: dict[str, ModelFacts] = {
    m.name: m
    for m in [
        _arch("Llama-2-70B", num_layers=80, hidden_size=8192, intermediate_size=28672,
                    num_heads=64, num_kv_heads=8, vocab_size=32000),
        _arch("LLaMA-30B", num_layers=60, hidden_size=6656, intermediate_size=17920,
                    num_heads=52, num_kv_heads=52, vocab_size=32000),
        _arch("BLOOM-176B", num_layers=70, hidden_size=14336, intermediate_size=4 * 14336,
                    num_heads=112, num_kv_heads=112, vocab_size=250880, gated_mlp=False,
                    tied_embeddings=True),
        _arch("Llama-3.1-8B", num_layers=32, hidden_size=4096, intermediate_size=14336,
                    num_heads=32, num_kv_heads=8, vocab_size=128256),
        _arch("Llama-3.1-70B", num_layers=80, hidden_size=8192, intermediate_size=28672,
                    num_heads=64, num_kv_heads=8, vocab_size=128256),
        _arch("Qwen2.5-32B", num_layers=64, hidden_size=5120, intermediate_size=27648,
                    num_heads=40, num_kv_heads=8, vocab_size=152064),
    ]
}


class Efficiency(_Strict):
    """Fractions of the datasheet roofline a serving stack reaches, and its TP overheads."""

    memory: float = Field(gt=0, le=1, description="Share of memory bandwidth reached by weight/KV reads.")
    decode_compute: float = Field(gt=0, le=1, description="Share of peak FLOPs for the per-sequence decode work.")
    prefill_compute: float = Field(gt=0, le=1, description="Share of peak FLOPs reached by prefill.")
    tp_latency_per_layer_s: float = Field(ge=0, description="All-reduce latency per layer per log2(n).")
    link: float = Field(gt=0, le=1, description="Share of interconnect bandwidth reached by all-reduces.")


# Calibrated by optimizer.calibration on Helix per-layer profiles (A100-40G, V100, L4, T4; 1, 2
# and 4 GPUs; LLaMA-2-70B and LLaMA-30B) and Splitwise perf_model.csv (A100-80G, H100; TP 2/4/8;
# Llama-2-70B and BLOOM-176B): 2,881 measurements. Regenerate: `python benchmarks/calibrate_profiles.py`.
# Relative error of the profiles these give (MAPE / max over all points of each type and phase):
#   decode : A100-40G 4.4/29 %, A100-80G 7.1/22 %, H100 4.3/23 %, L4 4.1/18 %, T4 5.0/22 %, V100 9.4/39 %
#   prefill: A100-40G 4.4/77 %, A100-80G 13.5/58 %, H100 16.2/48 %, L4 3.5/23 %, T4 5.2/29 %, V100 4.6/37 %
#   all 2,881 points: MAPE 8.0 %. The largest errors are Helix values printed as whole milliseconds
#   (a "1" can be 0.5-1.5 ms) and Splitwise prefill runs that a free per-configuration fit misses too
#   (its prefill MAPE is 9.7-9.9 %, max 52-63 %). TP terms of A100-40G and V100 (never measured with
#   n > 1) are the mean of the NVLink types that were. H100 "decode_compute" is low because
#   Splitwise's per-sequence step cost includes the serving stack's per-request work, not only FLOPs.
CALIBRATED: dict[str, Efficiency] = {
    "A100-40G": Efficiency(memory=0.878, decode_compute=0.628, prefill_compute=0.876,
                           tp_latency_per_layer_s=0.000114, link=0.38),
    "A100-80G": Efficiency(memory=0.804, decode_compute=0.341, prefill_compute=0.801,
                           tp_latency_per_layer_s=0.000135, link=0.367),
    "H100": Efficiency(memory=0.748, decode_compute=0.142, prefill_compute=0.706,
                       tp_latency_per_layer_s=9.34e-05, link=0.392),
    "L4": Efficiency(memory=0.809, decode_compute=0.618, prefill_compute=0.463,
                     tp_latency_per_layer_s=7.28e-05, link=0.124),
    "T4": Efficiency(memory=0.803, decode_compute=0.458, prefill_compute=0.454,
                     tp_latency_per_layer_s=0.000208, link=0.248),
    "V100": Efficiency(memory=0.795, decode_compute=0.725, prefill_compute=0.772,
                       tp_latency_per_layer_s=0.000114, link=0.38),
}

# One set fitted to all 2,881 points at once (MAPE 13.2 %; L4/T4 prefill -38/-27 % biased, their
# power-limited clocks): the fallback for accelerator types not calibrated above.
GLOBAL_EFFICIENCY = Efficiency(memory=0.741, decode_compute=0.652, prefill_compute=0.818,
                               tp_latency_per_layer_s=9.71e-05, link=0.207)

# Context length (tokens) of the sequences in Helix's decode tables, which the tables do not state;
# fitted with the efficiencies above.
HELIX_CONTEXT_TOKENS = 765


def efficiency_for(accelerator: str) -> Efficiency:
    """The calibrated efficiency of a type, or the global one when it was never measured."""
    return CALIBRATED.get(accelerator, GLOBAL_EFFICIENCY)


def datasheet_profile(
    model: ModelFacts,
    accelerator: AcceleratorDatasheet,
    accelerators_per_replica: int = 1,
    efficiency: Efficiency | None = None,
    *,
    attention: bool = True,
) -> ParametricProfile:
    """Roofline profile of one replica of `model` on `accelerators_per_replica` x `accelerator`."""
    n = accelerators_per_replica
    if n < 1:
        raise ValueError(f"accelerators_per_replica must be >= 1, got {n}")
    eff = efficiency or efficiency_for(accelerator.name)
    bandwidth = n * accelerator.memory_bandwidth_gb_s * GB * eff.memory
    flops = n * accelerator.peak_tflops * TFLOPS
    if n > 1:
        allreduce_bytes_per_token = model.num_layers * 2 * model.hidden_size * 2 * 2 * (n - 1) / n
        link_s_per_token = allreduce_bytes_per_token / (accelerator.interconnect_gb_s * GB * eff.link)
    else:
        link_s_per_token = 0.0
    base = model.read_bytes_per_step / bandwidth + model.num_layers * eff.tp_latency_per_layer_s * math.log2(n)
    return ParametricProfile(
        decode_base_s=base,
        decode_per_seq_s=2 * model.matmul_params / (flops * eff.decode_compute) + link_s_per_token,
        decode_per_kv_token_s=model.kv_bytes_per_token / bandwidth,
        prefill_base_s=base,
        prefill_per_token_s=2 * model.matmul_params / (flops * eff.prefill_compute) + link_s_per_token,
        prefill_per_token_sq_s=(model.num_layers * 2 * model.hidden_size / (flops * eff.prefill_compute)
                                if attention else 0.0),
    )
