"""How many tokens of KV cache one replica can hold.

The capacity model and the simulators must agree on this number, or the simulated replica and the
analytical one would hit the KV limit at different batch sizes; so it is computed in one place.
"""

from __future__ import annotations

from optimizer.fleet import Accelerator, ModelSpec

USABLE_MEMORY_FRACTION = 0.9
"""Share of accelerator memory a vLLM-style server gives to weights + KV (its gpu_memory_utilization)."""


def kv_capacity_tokens(
    model: ModelSpec,
    accelerator: Accelerator,
    accelerators_per_replica: int = 1,
    *,
    usable_fraction: float = USABLE_MEMORY_FRACTION,
) -> float:
    """Tokens of KV cache left once the weights are loaded; 0 when the weights do not fit."""
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable_fraction must be in (0, 1], got {usable_fraction}")
    free_bytes = accelerators_per_replica * accelerator.memory_gb * 1e9 * usable_fraction - model.weight_gb * 1e9
    return max(0.0, free_bytes / model.kv_bytes_per_token)
