"""The controller interface every autoscaling policy speaks: observations in, desired replicas out.

The simulator and the operator drive policies through these models and nothing else, so a policy
tuned on a simulated trace runs unchanged against a cluster. Everything here is observable on a
real cluster: replica states from the Deployment, per-replica gauges and counters from the vLLM
metrics (`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
request and token counters), arrival times and prompt lengths from the gateway, and prompt/output
lengths of finished requests. Output lengths of requests still in flight are not observable, and
are therefore not part of an observation.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReplicaState(StrEnum):
    STARTING = "starting"
    """Requested, still loading (cold start): billed, serves nothing."""
    READY = "ready"
    DRAINING = "draining"
    """Marked for removal: receives no new requests, leaves when empty."""


class ReplicaObservation(_Frozen):
    """Gauges and cumulative counters of one replica at observation time."""

    name: str
    variant: str
    state: ReplicaState
    queue_len: int = Field(default=0, ge=0, description="Requests waiting (vllm:num_requests_waiting).")
    running: int = Field(default=0, ge=0, description="Requests in the batch (vllm:num_requests_running).")
    kv_usage: float = Field(default=0.0, ge=0, le=1, description="KV cache in use, 0..1.")
    busy_s: float = Field(default=0.0, ge=0, description="Counter: seconds spent running iterations.")
    completed: int = Field(default=0, ge=0, description="Counter: requests this replica finished or handed off.")
    tokens: int = Field(default=0, ge=0, description="Counter: prompt + generated tokens processed.")
    finished: int = Field(default=0, ge=0, description="Counter: requests whose last token this replica produced.")
    slo_misses: int = Field(default=0, ge=0,
                            description="Counter: of those, requests over their model's TTFT or ITL target (what "
                                        "the vLLM TTFT/ITL histograms' bucket at the SLO tell an operator).")


class ArrivalSample(_Frozen):
    """Requests of one model that arrived during the last interval: when, and with how long a prompt."""

    model: str
    times_s: list[float] = Field(default_factory=list)
    input_tokens: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _aligned(self) -> ArrivalSample:
        if len(self.times_s) != len(self.input_tokens):
            raise ValueError("times_s and input_tokens must have the same length")
        return self


class CompletionSample(_Frozen):
    """Prompt and output lengths of the requests of one model that finished during the last interval."""

    model: str
    input_tokens: list[int] = Field(default_factory=list)
    output_tokens: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _aligned(self) -> CompletionSample:
        if len(self.input_tokens) != len(self.output_tokens):
            raise ValueError("input_tokens and output_tokens must have the same length")
        return self


class Observation(_Frozen):
    time_s: float = Field(ge=0)
    interval_s: float = Field(gt=0, description="Time since the previous observation.")
    replicas: list[ReplicaObservation] = Field(default_factory=list)
    arrivals: list[ArrivalSample] = Field(default_factory=list)
    completions: list[CompletionSample] = Field(default_factory=list)

    def replicas_of(self, variant: str, *states: ReplicaState) -> list[ReplicaObservation]:
        wanted = states or (ReplicaState.STARTING, ReplicaState.READY)
        return [r for r in self.replicas if r.variant == variant and r.state in wanted]

    def replica_count(self, variant: str) -> int:
        """Replicas the variant has or is starting (what a Deployment's spec.replicas says)."""
        return len(self.replicas_of(variant))

    def arrivals_of(self, model: str) -> ArrivalSample:
        return next((a for a in self.arrivals if a.model == model), ArrivalSample(model=model))

    def completions_of(self, model: str) -> CompletionSample:
        return next((c for c in self.completions if c.model == model), CompletionSample(model=model))


class RouteGuidance(_Frozen):
    """Share of one model's requests with prompts in [min_input_tokens, max_input_tokens) per variant."""

    model: str
    min_input_tokens: int = Field(default=0, ge=0)
    max_input_tokens: int | None = Field(default=None, gt=0)
    stage: Literal["PD", "P", "D"] = "PD"
    weights: dict[str, float] = Field(description="Variant name -> relative weight (>= 0).")

    @model_validator(mode="after")
    def _weights(self) -> RouteGuidance:
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("weights must be >= 0")
        if self.max_input_tokens is not None and self.max_input_tokens <= self.min_input_tokens:
            raise ValueError("max_input_tokens must exceed min_input_tokens")
        return self

    def covers(self, input_tokens: int) -> bool:
        return input_tokens >= self.min_input_tokens and (
            self.max_input_tokens is None or input_tokens < self.max_input_tokens
        )


class Decision(_Frozen):
    """Desired replicas per variant (variants left out keep their count) and optional routing guidance."""

    desired_replicas: dict[str, int] = Field(default_factory=dict)
    routing: list[RouteGuidance] = Field(default_factory=list)
    note: str = Field(default="", description="Why, in a few words, for logs and reports.")

    @model_validator(mode="after")
    def _non_negative(self) -> Decision:
        bad = {v: n for v, n in self.desired_replicas.items() if n < 0}
        if bad:
            raise ValueError(f"desired replicas must be >= 0, got {bad}")
        return self


class Policy(Protocol):
    """An autoscaler: called every `interval_s` with what the cluster shows, answers what it wants."""

    name: str
    interval_s: float

    def decide(self, observation: Observation) -> Decision: ...
