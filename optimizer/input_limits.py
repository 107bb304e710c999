"""The finite limits every number of an input file must respect, and why each is where it is.

Input models (plan files, cluster files, operator settings, VariantAutoscaling specs) refuse
infinities and NaN (`STRICT`) and cap each quantity at a value no real fleet comes near, so that a
typo like `1e304` or `.inf` is one line naming the file and the field instead of a solver that
overflows, divides by zero or allocates an array of that size. Each cap is one to three orders of
magnitude above the largest real value of 2026, so no honest input meets it. Whole-model figures that placement derives
from per-layer ones (weights, KV bytes per token, a replica's profile) are checked against the
same limits, so what one command writes another can read.

| quantity | limit | real-world largest |
| --- | --- | --- |
| replicas of one variant (min, max, current) | 10,000 | a few hundred |
| accelerators of one type in the inventory | 1,000,000 | ~100,000 in one datacenter |
| accelerators per replica | 10,000 | 72 (NVL72) |
| GPUs per machine | 1,024 | 72 (NVL72) |
| sequences in one batch | 100,000 | 1,024 (vLLM max_num_seqs) |
| price, $/h (one accelerator, machine or change penalty) | 1,000,000 | ~$100/h (8-GPU node) |
| tokens of a request (prompt or output) | 10,000,000 | 1M-10M context windows |
| request rate, requests/s | 1,000,000 | ~10,000 for one model |
| memory of one accelerator, GB | 10,000 | 288 (B300) |
| model weights, GB | 100,000 | ~2,000 (1T parameters, bf16) |
| KV or activation bytes per token | 1e9 | ~1e6 |
| layers of a model | 10,000 | ~130 |
| parameters, billions | 100,000 | ~2,000 |
| bandwidth, GB/s (link, NIC, HBM, KV transfer) | 100,000 | ~8,000 (HBM3e) |
| power, W (one accelerator / a whole fleet) | 100,000 / 1e9 | 1,400 / ~1e8 |
| peak TFLOP/s of one accelerator | 1,000,000 | ~5,000 (FP8 sparse) |
| one profile coefficient or measured time, s | 3,600 | ~10 (long prefill) |
| a latency target or a duration, s | 86,400 | minutes |
| a solver time limit, s | 3,600 | seconds |
| a link latency, ms | 60,000 | ~300 (across the globe) |
| spread of lengths within a bucket (sd / mean) | 100 | ~3 |
| priority weight | 0.001 .. 1,000,000 | 0.1 .. 10 |
| graph edge capacity (any unit per s) | 1e15 | ~1e10 (bytes/s of a link) |
| nodes / GPUs of a cluster file (all groups together) | 1,000 / 10,000 | 42 / 42 (Helix's largest) |
| a node's layers x tokens/s speed guess | 1e9 | ~1e4 |
"""

from __future__ import annotations

from pydantic import ConfigDict

STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
"""Model config of input models: unknown keys, infinities and NaN are errors."""

MAX_REPLICAS = 10_000
MAX_ACCELERATORS = 1_000_000
MAX_ACCELERATORS_PER_REPLICA = 10_000
MAX_GPUS_PER_MACHINE = 1_024
MAX_BATCH = 100_000
MAX_PRICE_PER_HOUR = 1e6
MAX_TOKENS = 10_000_000
MAX_RATE_RPS = 1e6
MAX_MEMORY_GB = 1e4
MAX_WEIGHT_GB = 1e5
MAX_BYTES_PER_TOKEN = 1e9
MAX_LAYERS = 10_000
MAX_PARAMS_B = 1e5
MAX_BANDWIDTH_GB_S = 1e5
MAX_BANDWIDTH_GBPS = 8 * MAX_BANDWIDTH_GB_S
MAX_ACCELERATOR_POWER_W = 1e5
MAX_FLEET_POWER_W = 1e9
MAX_PEAK_TFLOPS = 1e6
MAX_PROFILE_TIME_S = 3_600.0
MAX_DURATION_S = 86_400.0
MAX_TIME_LIMIT_S = 3_600.0
MAX_LATENCY_MS = 60_000.0
MAX_LENGTH_CV = 100.0
MAX_PRIORITY = 1e6
MIN_PRIORITY = 1e-3  # unmet demand is weighted by 1 / priority: 1e-300 would overflow the LP
MAX_EDGE_CAPACITY = 1e15
MAX_CLUSTER_NODES = 1_000
MAX_CLUSTER_GPUS = MAX_ACCELERATORS_PER_REPLICA  # a P/D group of every GPU is still a valid variant
MAX_RELATIVE_SPEED = 1e9
