"""Collector results made up from a demand per model, in the collector's own pydantic models.

Why: the control cycle's speed and behaviour must be measurable without Prometheus latency (the
benchmark's 1,000-variant cycle) and testable for exact demands (controller tests), while staying
the very objects `Collector.collect` returns, so nothing downstream can tell the difference.
"""

from __future__ import annotations

from variant_autoscaler.collector import (
    CollectionResult,
    LatencyObservation,
    ModelObservation,
    VariantObservation,
    VariantSelector,
)

from optimizer.workload import LengthBucket


def _latency() -> LatencyObservation:
    return LatencyObservation(mean_s=None, quantiles_s={"p50": None, "p90": None, "p99": None},
                              observations_per_s=0.0)


def _traffic(rate: float | None, input_tokens: float, output_tokens: float,
             mix: list[LengthBucket] | None = None) -> dict:
    mix = mix or [LengthBucket(input_tokens=input_tokens, output_tokens=output_tokens, share=1.0)]
    return {"arrival_rate_rps": rate, "completion_rate_rps": rate, "mean_input_tokens": input_tokens,
            "mean_output_tokens": output_tokens, "waiting": 0.0, "running": 0.0, "kv_cache_usage_mean": None,
            "kv_cache_usage_max": None, "ttft": _latency(), "itl": _latency(), "input_tokens": [],
            "output_tokens": [], "length_mix": mix if rate is not None else []}


def observations(demand: dict[str, float], selectors: list[VariantSelector], *, input_tokens: float = 100,
                 output_tokens: float = 40, missing: tuple[str, ...] = (),
                 mix: list[LengthBucket] | None = None) -> CollectionResult:
    """What the collector returns when each model in `demand` receives that many requests/s."""
    variants = {}
    for sel in selectors:
        ok = sel.model in demand and sel.model not in missing
        variants[sel.name] = VariantObservation(
            name=sel.name, namespace=sel.namespace, model=sel.model, status="ok" if ok else "missing",
            reason="metrics fresh" if ok else f"no vLLM series for {sel.describe()}", pods=[], stale_pods=[],
            newest_sample_age_s=1.0 if ok else None, kv_capacity_tokens=None,
            **_traffic(demand.get(sel.model, 0.0) if ok else None, input_tokens, output_tokens, mix))
    models = {}
    for model in sorted({s.model for s in selectors}):
        mine = [s.name for s in selectors if s.model == model]
        ok = model in demand and model not in missing
        models[model] = ModelObservation(
            model=model, variants=mine if ok else [], excluded_variants={} if ok else dict.fromkeys(mine, "missing"),
            **_traffic(demand.get(model) if ok else None, input_tokens, output_tokens, mix))
    return CollectionResult(available=True, reason="collected", evaluated_at=None, window_s=10.0, queries=19,
                            duration_s=0.01, variants=variants, models=models)


class Demand:
    """A settable demand per model; `collect` is what the controller calls each cycle."""

    def __init__(self, demand: dict[str, float] | None = None, *, mix: list[LengthBucket] | None = None):
        self.demand = dict(demand or {})
        self.mix = mix
        self.calls = 0

    def set(self, model: str, rate: float) -> None:
        self.demand[model] = rate

    def collect(self, selectors: list[VariantSelector]) -> CollectionResult:
        self.calls += 1
        return observations(self.demand, selectors, mix=self.mix)
