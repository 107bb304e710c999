"""The load signal in the form the llm-d router's flow control reads: one saturation number per pool and stage.

The router's flow control (llm-d/llm-d-router) asks a saturation detector for one number per
InferencePool: below 1.0 the share of capacity in use, 1.0 or more "stop dispatching", above 1.0 the
overload magnitude; stale endpoints count as 1.0. Its default detector reads queue depth and KV use
(mean over endpoints of max(queue/5, KV/0.8)), which says a pod is full, not whether the pool meets
its latency SLO. This publishes the same contract from the capacity model: demand routed to a pool's
replicas divided by what its ready replicas serve at SLO, so 1.0 means "at SLO capacity".

Per pool (the VariantAutoscaling's `autoscaling.variant-autoscaler.io/inference-pool` annotation,
else one pool per model and namespace) and stage:

* `prefill`: the variants that prefill (roles prefill and both); `decode`: those that decode
  (decode and both); `effective`: the larger of the two, the stage that saturates first.
* Fail closed, as the router does: a pool with a model that has no fresh metrics reads 1.0 (its demand is
  unknown, so new work is held rather than piled on); a stage with demand but no ready replica reads
  at least 1.0.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

STAGES = ("prefill", "decode", "effective")
STALE_SATURATION = 1.0


class StageLoad(BaseModel):
    """One variant's share of a pool: replicas' worth of routed demand and ready replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str
    pool: str
    model: str
    role: str = Field(description="prefill | decode | both")
    used_replicas: float = Field(ge=0, description="Routed demand / capacity of one replica at SLO.")
    ready_replicas: int = Field(ge=0)
    fresh: bool = Field(description="Live metrics for the model were collected this cycle.")


class PoolSaturation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: str
    pool: str
    stage: str
    saturation: float = Field(ge=0)


def _stage(loads: list[StageLoad]) -> float | None:
    if not loads:
        return None
    used = sum(x.used_replicas for x in loads)
    ready = sum(x.ready_replicas for x in loads)
    if ready == 0:
        return max(1.0, used) if used > 0 else 0.0
    return used / ready


def pool_saturation(loads: Iterable[StageLoad]) -> list[PoolSaturation]:
    """Saturation per (namespace, pool, stage), sorted; see the module doc for the rules."""
    pools: dict[tuple[str, str], list[StageLoad]] = {}
    for x in loads:
        pools.setdefault((x.namespace, x.pool), []).append(x)
    out = []
    for (ns, pool), members in sorted(pools.items()):
        stale = not all(x.fresh for x in members)
        values = {"prefill": _stage([x for x in members if x.role in ("prefill", "both")]),
                  "decode": _stage([x for x in members if x.role in ("decode", "both")])}
        present = [v for v in values.values() if v is not None]
        values["effective"] = max(present) if present else None
        for stage in STAGES:
            value = values[stage]
            if value is None:
                continue
            out.append(PoolSaturation(namespace=ns, pool=pool, stage=stage,
                                      saturation=STALE_SATURATION if stale else value))
    return out
