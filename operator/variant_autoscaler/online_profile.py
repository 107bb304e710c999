"""Fit a performance profile from live metrics, for variants that have no offline profile.

Two sources, tried in order, each with one range query per metric for all variants:

1. `iteration_metrics` -- the emulator's optional `vllm_emulator:*` counters (iteration time,
   batch and KV tokens per power-of-two batch group; prefill time and tokens per token group).
   Ratios of their increases are exact means of the linear model, so the fit recovers the profile.
   Real vLLM has no such series; this path exists so the demo and tests can check the fitting
   machinery against a known answer.
2. `request_metrics` -- what real vLLM exports. Per pod and time step:
   * prefill samples (prompt tokens, time) = (mean prompt tokens, mean TTFT - w) over windows
     where the queue was nearly empty (mean `num_requests_waiting` < `low_queue`), so TTFT is
     prefill plus w, the wait for the decode step in progress: half a step when a batch is
     running (an arrival lands on average half-way through a fixed-length step).
   * decode samples (batch, step) = (mean `num_requests_running`, mean ITL x (1 - f)), where
     f = completion rate x predicted prefill time is the share of time spent in prefill: prefill
     iterations stall decoding, stretching ITL by 1/(1-f).
   w needs the decode fit and f the prefill fit, so the two are alternated three times (it settles
   in two: both corrections are small next to what they correct).
   Context is not separable from batch size in these aggregates (both grow with load), so this
   path fits decode as base + per_seq * batch, with the KV-token cost folded into per_seq at the
   observed context. Batch sizes must span at least `min_spread` x, else there is nothing to fit a
   slope to and the fit is refused with a reason rather than guessed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from optimizer.profile import DecodeSample, ParametricProfile, PrefillSample, fit_profile
from variant_autoscaler.collector import Collector, QueryFailure, VariantSelector


class ProfileFit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str
    available: bool
    reason: str
    source: Literal["iteration_metrics", "request_metrics"] | None = None
    profile: ParametricProfile | None = None
    decode_samples: int = 0
    prefill_samples: int = 0
    batch_range: tuple[float, float] | None = Field(default=None, description="Decode batch sizes seen (min, max).")
    prompt_tokens_range: tuple[float, float] | None = None


class ProfileFitResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    available: bool
    reason: str
    queries: int
    fits: dict[str, ProfileFit] = Field(default_factory=dict)


def _points(series: list, key_of) -> dict[tuple, dict[float, float]]:
    """{key: {timestamp: value}} from a range-query result; negative changes (counter resets) and NaN dropped."""
    out: dict[tuple, dict[float, float]] = defaultdict(dict)
    for labels, values in series:
        k = key_of(labels)
        for t, v in values:
            if v >= 0:
                out[k][round(t, 3)] = out[k].get(round(t, 3), 0.0) + v
    return out


class OnlineProfileFitter:
    """`OnlineProfileFitter(collector).fit(selectors)`; one range query per metric for all variants."""

    def __init__(self, collector: Collector, *, window_s: float | None = None, low_queue: float = 0.5,
                 min_spread: float = 1.5, max_prefill_share: float = 0.5):
        self.collector = collector
        self.window_s = window_s or collector.settings.rate_window_s
        self.low_queue = low_queue
        self.min_spread = min_spread
        self.max_prefill_share = max_prefill_share

    def _delta(self, selector: str) -> str:
        """`x - x offset w`: the exact change between two scraped samples. Used instead of increase()
        because the quantities here are ratios of counters (seconds / iterations, tokens / requests),
        and increase() extrapolates each series by its own factor near a series' start, which biases
        ratios by several percent. A counter reset shows up as a negative change and is skipped."""
        return f"({selector} - {selector} offset {self.window_s:g}s)"

    def _iteration_queries(self) -> dict[str, str]:
        c = self.collector
        g, sel = c.group_labels(), c.series_selector()
        q = {}
        for name, metric, group in (
            ("dec_n", "decode_iterations_total", "batch_group"),
            ("dec_s", "decode_iteration_seconds_total", "batch_group"),
            ("dec_b", "decode_iteration_sequences_total", "batch_group"),
            ("dec_kv", "decode_iteration_kv_tokens_total", "batch_group"),
            ("pre_n", "prefill_iterations_total", "tokens_group"),
            ("pre_s", "prefill_iteration_seconds_total", "tokens_group"),
            ("pre_t", "prefill_iteration_tokens_total", "tokens_group"),
        ):
            q[name] = f"sum by ({g}, {group}) {self._delta(f'vllm_emulator:{metric}{sel}')}"
        return q

    def _request_queries(self) -> dict[str, str]:
        c = self.collector
        m, g, sel, w = c.settings.metrics, c.group_labels(), c.series_selector(), f"{self.window_s:g}s"
        d = self._delta
        return {
            "itl_sum": f"sum by ({g}) ({c.first_of(m.itl, lambda n: d(f'{n}_sum{sel}'))})",
            "itl_count": f"sum by ({g}) ({c.first_of(m.itl, lambda n: d(f'{n}_count{sel}'))})",
            "running": f"sum by ({g}) (avg_over_time({m.running}{sel}[{w}]))",
            "waiting": f"sum by ({g}) (avg_over_time({m.waiting}{sel}[{w}]))",
            "ttft_sum": f"sum by ({g}) {d(f'{m.ttft}_sum{sel}')}",
            "ttft_count": f"sum by ({g}) {d(f'{m.ttft}_count{sel}')}",
            "prompt_sum": f"sum by ({g}) {d(f'{m.prompt_tokens}_sum{sel}')}",
            "prompt_count": f"sum by ({g}) {d(f'{m.prompt_tokens}_count{sel}')}",
            "completed": f"sum by ({g}) {d(f'{m.request_success}{sel}')} / {self.window_s:g}",
        }

    def fit(self, selectors: list[VariantSelector], *, lookback_s: float = 600.0, step_s: float | None = None,
            end: float | None = None, use_iteration_metrics: bool = True) -> ProfileFitResult:
        """Fit every selector from the last `lookback_s` seconds, sampled every `step_s` (default: half the window)."""
        end = end if end is not None else time.time()
        step = step_s or max(1.0, self.window_s / 2)
        span = (end - lookback_s, end, step)
        queries = self.collector.queries
        sent_before = queries.sent
        fits: dict[str, ProfileFit] = {}
        try:
            if use_iteration_metrics:
                raw = queries.run(self._iteration_queries(), span=span)
                for sel in selectors:
                    fit = self._from_iterations(sel, raw)
                    if fit.available:
                        fits[sel.name] = fit
            rest = [sel for sel in selectors if sel.name not in fits]
            if rest:
                raw = queries.run(self._request_queries(), span=span)
                for sel in rest:
                    fits[sel.name] = self._from_requests(sel, raw)
        except QueryFailure as exc:
            return ProfileFitResult(available=False, reason=str(exc), queries=queries.sent - sent_before)
        return ProfileFitResult(available=True, reason="fitted where possible", queries=queries.sent - sent_before,
                                fits=fits)

    def _mine(self, sel: VariantSelector, labels: dict[str, str]) -> bool:
        return self.collector.matches(sel, self.collector.series_key(labels))

    def _from_iterations(self, sel: VariantSelector, raw: dict[str, list]) -> ProfileFit:
        def key(labels):
            return (labels.get(self.collector.settings.pod_label, ""), labels.get("batch_group") or
                    labels.get("tokens_group", ""))

        def series(name):
            return _points([(lab, v) for lab, v in raw[name] if self._mine(sel, lab)], key)

        n, sec, seqs, kv = series("dec_n"), series("dec_s"), series("dec_b"), series("dec_kv")
        decode = []
        for k, by_t in n.items():
            for t, count in by_t.items():
                s, b, c = sec.get(k, {}).get(t), seqs.get(k, {}).get(t), kv.get(k, {}).get(t)
                if count > 0 and s and b and c is not None and s > 0:
                    decode.append(DecodeSample(batch=b / count, context_tokens=c / b, step_s=s / count))
        pn, ps, pt = series("pre_n"), series("pre_s"), series("pre_t")
        prefill = []
        for k, by_t in pn.items():
            for t, count in by_t.items():
                s, tok = ps.get(k, {}).get(t), pt.get(k, {}).get(t)
                if count > 0 and s and tok and s > 0:
                    prefill.append(PrefillSample(tokens=tok / count, time_s=s / count))
        return self._fit(sel, "iteration_metrics", decode, prefill, use_context=True)

    def _from_requests(self, sel: VariantSelector, raw: dict[str, list]) -> ProfileFit:
        pod_label = self.collector.settings.pod_label

        def series(name):
            return _points([(lab, v) for lab, v in raw[name] if self._mine(sel, lab)],
                           lambda lab: (lab.get(pod_label, ""),))

        s = {name: series(name) for name in raw}
        rows = []
        for k, by_t in s["itl_count"].items():
            for t, itl_count in by_t.items():
                get = {name: s[name].get(k, {}).get(t) for name in s}
                if None in get.values() or itl_count <= 0 or get["prompt_count"] <= 0 or get["ttft_count"] <= 0:
                    continue
                rows.append({
                    "batch": get["running"], "itl": get["itl_sum"] / itl_count, "waiting": get["waiting"],
                    "prompt": get["prompt_sum"] / get["prompt_count"], "rate": get["completed"],
                    "ttft": get["ttft_sum"] / get["ttft_count"],
                })
        quiet = [r for r in rows if r["waiting"] < self.low_queue and r["prompt"] > 0 and r["ttft"] > 0]
        if not quiet:
            return ProfileFit(variant=sel.name, available=False, source="request_metrics",
                              reason="no windows with a near-empty queue and completed requests to fit prefill from")
        busy = [r for r in rows if r["batch"] >= 0.5 and r["itl"] > 0]
        decode_step = None
        for _round in range(3):
            prefill = []
            for r in quiet:
                wait = 0.0
                if decode_step is not None and r["batch"] > 0:
                    wait = min(1.0, r["batch"]) * decode_step(r["batch"]) / 2
                prefill.append(PrefillSample(tokens=r["prompt"], time_s=max(r["ttft"] - wait, 0.05 * r["ttft"])))
            prefill_profile = self._prefill_only(prefill)
            decode = []
            for r in busy:
                share = min(self.max_prefill_share, r["rate"] * float(prefill_profile.prefill_s(r["prompt"])))
                decode.append(DecodeSample(batch=r["batch"], step_s=r["itl"] * (1.0 - share)))
            if len(decode) < 2:
                break
            decode_profile = fit_profile(decode, prefill + prefill if len(prefill) < 2 else prefill)
            decode_step = decode_profile.decode_step_s
        return self._fit(sel, "request_metrics", decode, prefill, use_context=False)

    def _prefill_only(self, prefill: list[PrefillSample]) -> ParametricProfile:
        tokens = [p.tokens for p in prefill]
        if len(prefill) >= 2 and max(tokens) >= self.min_spread * min(tokens):
            fake_decode = [DecodeSample(batch=1, step_s=1.0), DecodeSample(batch=2, step_s=1.0)]
            return fit_profile(fake_decode, prefill)
        per_token = sum(p.time_s for p in prefill) / sum(tokens)
        return ParametricProfile(decode_base_s=1.0, prefill_per_token_s=per_token)

    def _fit(self, sel: VariantSelector, source: str, decode: list[DecodeSample], prefill: list[PrefillSample],
             *, use_context: bool) -> ProfileFit:
        batches = [d.batch for d in decode]
        tokens = [p.tokens for p in prefill]
        common = {"variant": sel.name, "source": source, "decode_samples": len(decode),
                  "prefill_samples": len(prefill),
                  "batch_range": (min(batches), max(batches)) if batches else None,
                  "prompt_tokens_range": (min(tokens), max(tokens)) if tokens else None}
        if len(decode) < 2 or max(batches) < self.min_spread * min(batches):
            seen = f"batch sizes {min(batches):.1f}..{max(batches):.1f}" if batches else "no decode activity"
            return ProfileFit(available=False, reason=f"decode: need batch sizes spanning {self.min_spread:g}x, "
                                                      f"saw {seen}", **common)
        if not prefill:
            return ProfileFit(available=False, reason="prefill: no prefill samples", **common)
        if not use_context:
            decode = [DecodeSample(batch=d.batch, step_s=d.step_s) for d in decode]
        note = ""
        if len(prefill) < 2 or max(tokens) < self.min_spread * min(tokens):
            profile = fit_profile(decode, [prefill[0], prefill[0]])
            per_token = sum(p.time_s for p in prefill) / sum(tokens)
            profile = profile.model_copy(update={"prefill_base_s": 0.0, "prefill_per_token_s": per_token,
                                                 "prefill_per_token_sq_s": 0.0})
            note = f"; prefill from one prompt length (~{sum(tokens) / len(tokens):.0f} tokens), linear through 0"
        else:
            profile = fit_profile(decode, prefill)
        return ProfileFit(available=True, reason=f"fitted from {source}{note}", profile=profile, **common)
