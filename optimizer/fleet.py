"""What the cluster has and what can run on it: accelerator types, models and variants.

A *variant* is one way to serve a model: accelerator type x accelerators per replica x max
batch x role. The optimizer chooses how many replicas of each variant to run.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field, model_validator

from optimizer import input_limits as lim
from optimizer.profile import PerformanceProfile


class _Strict(BaseModel):
    model_config = lim.STRICT


class Accelerator(_Strict):
    """One accelerator type and how many of it the cluster really has."""

    name: str = Field(min_length=1, description="Accelerator type, e.g. H100, A100-80G, L4.")
    memory_gb: float = Field(gt=0, le=lim.MAX_MEMORY_GB, description="Memory of one accelerator in GB (1e9 bytes).")
    cost_per_hour: float = Field(
        ge=0, le=lim.MAX_PRICE_PER_HOUR, description="Price of one accelerator for one hour."
    )
    available: int | None = Field(
        default=None, ge=0, le=lim.MAX_ACCELERATORS, description="How many the cluster has; None means no limit."
    )
    power_w: float | None = Field(
        default=None, gt=0, le=lim.MAX_ACCELERATOR_POWER_W, description="Power draw of one accelerator at load."
    )
    memory_bandwidth_gb_s: float | None = Field(
        default=None, gt=0, le=lim.MAX_BANDWIDTH_GB_S, description="Datasheet HBM/GDDR bandwidth."
    )
    peak_tflops: float | None = Field(
        default=None, gt=0, le=lim.MAX_PEAK_TFLOPS, description="Datasheet dense fp16/bf16 TFLOP/s."
    )


class ModelSpec(_Strict):
    """The facts about a model that sizing needs."""

    name: str = Field(min_length=1)
    weight_gb: float = Field(
        gt=0, le=lim.MAX_WEIGHT_GB, description="Weights in GB (1e9 bytes) at serving precision."
    )
    kv_bytes_per_token: float = Field(
        gt=0, le=lim.MAX_BYTES_PER_TOKEN, description="KV-cache bytes one token occupies (all layers)."
    )
    num_layers: int | None = Field(default=None, gt=0, le=lim.MAX_LAYERS)
    params_b: float | None = Field(default=None, gt=0, le=lim.MAX_PARAMS_B, description="Parameters, in billions.")


class Role(StrEnum):
    """What a replica does: prefill only (P), decode only (D) or both (PD)."""

    PREFILL = "P"
    DECODE = "D"
    BOTH = "PD"

    @classmethod
    def _missing_(cls, value: object) -> Role | None:
        aliases = {"prefill": cls.PREFILL, "decode": cls.DECODE, "both": cls.BOTH, "p": cls.PREFILL,
                   "d": cls.DECODE, "pd": cls.BOTH}
        return aliases.get(str(value).strip().lower())

    @property
    def does_prefill(self) -> bool:
        return self in (Role.PREFILL, Role.BOTH)

    @property
    def does_decode(self) -> bool:
        return self in (Role.DECODE, Role.BOTH)


class Variant(_Strict):
    """One deployable configuration of a model and the replica bounds the user allows."""

    name: str = Field(min_length=1)
    model: str = Field(min_length=1, description="Name of a ModelSpec.")
    accelerator: str = Field(min_length=1, description="Name of an Accelerator.")
    accelerators_per_replica: int = Field(default=1, gt=0, le=lim.MAX_ACCELERATORS_PER_REPLICA)
    max_batch: int = Field(gt=0, le=lim.MAX_BATCH, description="Most sequences one replica decodes at once.")
    role: Role = Role.BOTH
    min_replicas: int = Field(default=0, ge=0, le=lim.MAX_REPLICAS)
    max_replicas: int | None = Field(default=None, ge=0, le=lim.MAX_REPLICAS)
    current_replicas: int = Field(default=0, ge=0, le=lim.MAX_REPLICAS)
    profile: PerformanceProfile
    cost_per_replica_per_hour: float | None = Field(
        default=None, ge=0, le=lim.MAX_PRICE_PER_HOUR,
        description="Price of one replica of this variant, $/h; None: the accelerator's price x accelerators_per_replica.")

    @model_validator(mode="after")
    def _bounds(self) -> Variant:
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self
