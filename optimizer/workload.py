"""What users ask of each model: arrival rate, request-length mix, and latency SLOs."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from optimizer import input_limits as lim

SHARE_TOLERANCE = 0.01


class _Strict(BaseModel):
    model_config = lim.STRICT


class LengthBucket(_Strict):
    """One cell of the request-length mix: requests of about these lengths, and their share."""

    input_tokens: float = Field(gt=0, le=lim.MAX_TOKENS, description="Mean prompt tokens of requests in this bucket.")
    output_tokens: float = Field(
        gt=0, le=lim.MAX_TOKENS, description="Mean generated tokens of requests in this bucket."
    )
    share: float = Field(gt=0, le=1, description="Fraction of the model's requests in this bucket.")
    name: str | None = Field(default=None, description="Label; defaults to '<in>x<out>'.")
    input_tokens_cv: float = Field(
        default=0.0, ge=0, le=lim.MAX_LENGTH_CV,
        description="Spread of prompt lengths within the bucket (sd / mean); 0 = all alike.")
    output_tokens_cv: float = Field(
        default=0.0, ge=0, le=lim.MAX_LENGTH_CV,
        description="Spread of output lengths within the bucket (sd / mean); 0 = all alike.")

    @property
    def label(self) -> str:
        return self.name or f"{self.input_tokens:g}x{self.output_tokens:g}"


class Workload(_Strict):
    """Demand for one model, as observed (collector) or forecast (simulator)."""

    model: str = Field(min_length=1)
    arrival_rate_rps: float = Field(ge=0, le=lim.MAX_RATE_RPS, description="Requests per second.")
    buckets: list[LengthBucket] = Field(min_length=1)
    priority: float = Field(
        default=1.0, ge=lim.MIN_PRIORITY, le=lim.MAX_PRIORITY,
        description="Weight of this model's unmet demand when inventory runs short."
    )

    @model_validator(mode="after")
    def _shares(self) -> Workload:
        total = sum(b.share for b in self.buckets)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"bucket shares must sum to 1, they sum to {total:.4f}")
        labels = [b.label for b in self.buckets]
        if len(set(labels)) != len(labels):
            raise ValueError(f"bucket labels must be unique, got {labels}")
        return self

    def bucket_rates_rps(self) -> dict[str, float]:
        """Arrival rate per bucket label, shares renormalised to sum exactly to 1."""
        total = sum(b.share for b in self.buckets)
        return {b.label: self.arrival_rate_rps * b.share / total for b in self.buckets}


class SLO(_Strict):
    """Latency targets for one model, met at a percentile of requests."""

    model: str = Field(min_length=1)
    ttft_s: float = Field(gt=0, le=lim.MAX_DURATION_S, description="Time to first token.")
    itl_s: float = Field(gt=0, le=lim.MAX_DURATION_S, description="Inter-token latency (time per output token).")
    e2e_s: float | None = Field(
        default=None, gt=0, le=lim.MAX_DURATION_S, description="End-to-end request latency, optional."
    )
    percentile: float = Field(default=90.0, gt=0, lt=100, description="Share of requests that must meet it, in %.")
