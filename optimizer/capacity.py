"""How many requests per second ONE replica of a variant sustains for one length bucket at the SLO.

Why analytical: the operator sizes ~1000 variants x 10 buckets every cycle, far too many to
simulate; so each (variant, bucket) gets a queueing model, vectorised over all cases at once,
and the discrete-event simulator (``optimizer.simulation.replica``) is the reference it is
tested against (tests/test_capacity.py).

The replica is vLLM-like (continuous batching, prefill prioritised over decode, KV reserved for
a request's whole life; see the simulator's docstring). Notation: I, O = input/output tokens,
W = O - 1 decode steps per request, d(n) = decode step at batch n, p(m) = prefill of m prompts
batched together = p(0) + m (p(I) - p(0)): the forward pass's fixed cost is shared, each prompt's
own tokens and attention are not (``ParametricProfile.prefill_batch_s``); with prompt lengths
spread (cv_in), p(I) is the mean over that spread, above the prefill of the mean prompt.

* Slots. At most K = min(max_batch, KV tokens // (I + O)) sequences run at once. With the batch
  full, a replica completes at most X_max = K / (W d(K) + K p(1)) requests/s: each admission
  costs a prefill that stalls the whole batch.
* Decode batch and ITL. The search runs over the mean batch n in [0, K], which gives the rate
  explicitly, lambda = n / (W d(n) + n p_eff), p_eff the per-request share of a batched prefill
  (requests arriving during one decode step are prefilled together). The step including prefill
  stalls averages tau = d(n) / (1 - rho), rho = lambda p_eff. Around that mean the batch and the
  stalls feed back on each other (more arrivals -> longer steps and more stalls -> sequences
  stay longer -> bigger batch); ``optimizer.batch_fluctuation`` gives the resulting spread of
  a request's decode time and the extra load a request sees because arrivals come in bursts.
  ITL at the percentile = mean + z * sd (normal approximation).
* Slot wait (a state-dependent birth-death chain in the heavy-traffic regime). An arrival waits
  for a slot with the Erlang C probability for K servers, using the occupancy's mean and its
  variance from the fluctuation model (peakedness, Hayward's scaling; not the Poisson variance of
  M/M/K; Halfin-Whitt, its many-server limit, was 2-5x too low at tens of slots); a waiting
  request's wait is exponential with rate 2 (X_max - lambda) / (1 + cv_out^2), the heavy-traffic
  rate for a slot held as long as the request's answer (2 (X_max - lambda) when all answers are alike).
* TTFT. Slot wait, then the rest of the iteration in flight when the request arrives (idle, a
  decode step, or a prefill of m prompts, m distributed as 1 + Poisson), then its own prefill
  batch: itself plus the Poisson(lambda x that iteration) requests that arrived with it. The
  percentile is read off that mixture distribution, not from a mean.
* Chunked prefill (the profile's ``max_num_batched_tokens``, default 2048 as vLLM V1 serves; see
  the simulator). A prompt's chunks ride the decode steps: it stalls the batch for its own
  prefill beyond the fixed cost, p(I) - p(0), instead of its batch's share p(m)/m; its stalls are
  ceil(I / (budget - n)) smaller ones (less skew); and its TTFT is that many iterations, each a
  decode step d(n) plus its chunk, k d(n) + p(I) - p(0) (longer prompts of a spread bucket take
  more iterations). A prefill in progress is the whole job, decode steps included, for the wait of
  a request arriving behind it. No budget (None): vLLM V0, prefill batches stall the batch whole.
* Roles. P: prefill only, TTFT includes the KV transfer, up to K prompts per prefill batch (with
  ``AllocationOptions.prefill_queue`` and a budget: an M/G/1 queue of prompts, as PD's chunked one).
  D: decode only; a slot wait delays the second token, so it spends the ITL budget (and E2E);
  TTFT is the prefill side's business. PD: both.
* E2E at the percentile = TTFT percentile + W x ITL percentile (conservative).
* Lengths spread within a bucket (``input_tokens_cv``, ``output_tokens_cv``; 0 = all alike). At
  p99 the mean request is not what breaks the SLO. A request's ITL averages its own decode steps,
  so short answers spread more (sd ~ 1/sqrt(steps)): the ITL percentile is that of a lognormal
  mixture over output lengths. Long prompts stall the batch longer: their extra variance joins the
  prefill noise, amplified by the same feedback, and a request's own prefill varies with its
  prompt (TTFT averaged over lognormal prompt lengths). At small batches the stalls a request sees
  are few and long, a skewed, self-exciting sum (each stall lets more prompts in): a busy period
  started by the request's own W d(n), its skewness from the busy-period third cumulant, read off a
  gamma (Pearson III) tail; Cornish-Fisher capped at skew 1.5 left long-prompt p99 +20 % optimistic.
  Long answers also hold their KV reservation longer, so the cache holds kv / (I + O (1 + cv_out^2)) sequences.

Measured against the simulator (tests/test_capacity.py, printed by benchmarks/bench_capacity.py):
on the example fleet's 6 PD variants x 4 mixes (short chat, Azure-conv-like lognormal, 8-12k
prompts, KV-bound decode) x p90/p99, 36 of 45 servable cells are within +/-5 %; the rest are named
in the test with their figures (worst: +11.5 % on an L4 KV-bound at p99, +10.6 % for 32B long
prompts at p99, -7.4 % for 70B on A100 at p99 with Azure-like spread).
``service_level`` is the knob for headroom.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import gammainc, gammaincc, gammaincinv, gammaln, ndtr, ndtri

from optimizer.batch_fluctuation import fluctuation_factors
from optimizer.fleet import Accelerator, ModelSpec, Role, Variant
from optimizer.kv_memory import kv_capacity_tokens
from optimizer.problem import Problem
from optimizer.workload import SLO, LengthBucket

Limiting = Literal["ttft", "itl", "e2e", "max_batch", "kv_memory", "none"]

_SEARCH_STEPS = 22
_QUANTILE_STEPS = 24
_PREFILL_GRID = 64  # a prefill server batching this many prompts counts as uncapped
_MIN_TIME_S = 1e-9  # floor for profile times, so rates stay finite
_MAX_SKEW = 4.0  # the gamma tail fit is kept below this skewness
_SLOT_TAIL_SPEEDUP = 2.0  # heavy-traffic wait-tail rate factor 2 / (1 + C_s^2), here at C_s = 0
_SLOT_LIMITED_WAIT_SHARE = 0.5  # TTFT misses are "slot" misses when slot waits make up this share
_ROLE_CODE = {Role.BOTH: 0, Role.PREFILL: 1, Role.DECODE: 2}
_PD, _P, _D = 0, 1, 2


class CapacityEstimate(BaseModel):
    """What one replica of a variant can take of one bucket's traffic while meeting the SLO."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str
    bucket: str
    max_rate_rps: float = Field(
        ge=0, description="Highest sustainable arrival rate x service_level; 0 = cannot meet the SLO."
    )
    ttft_s: float | None = Field(description="Predicted TTFT at max_rate_rps at the SLO percentile (None for D).")
    itl_s: float | None = Field(description="Predicted ITL at max_rate_rps at the SLO percentile (None for P).")
    e2e_s: float | None = Field(description="Predicted E2E at max_rate_rps at the SLO percentile (None for P).")
    batch_at_max: float = Field(ge=0, description="Mean decode batch (role P: mean prefill batch) at max_rate_rps.")
    max_concurrency: int = Field(ge=0, description="Sequences that fit at once: min(max_batch, KV cache / request).")
    kv_capacity_tokens: float = Field(ge=0)
    limiting: Limiting = Field(
        description="What stops a higher rate: an SLO, or the slots (max_batch / kv_memory) when queueing for "
        "them is what breaks it; 'none' when a prefill server saturates its compute first. At rate 0: what "
        "fails even unloaded."
    )
    reason: str | None = Field(default=None, description="Why the replica cannot serve this bucket at all, or why "
                               "it is planned at a percentile below its SLO's (see `percentile`).")
    percentile: float | None = Field(
        default=None, gt=0, lt=100,
        description="Set where no variant of the model serves this bucket at its SLO's percentile: the lower "
        "percentile this estimate is planned at, the highest at which one does (None: the SLO's own).")


def replica_capacity(
    variant: Variant,
    model: ModelSpec,
    accelerator: Accelerator,
    bucket: LengthBucket,
    slo: SLO,
    *,
    kv_transfer_s: float = 0.0,
    service_level: float = 1.0,
    prefill_queue: bool = False,
) -> CapacityEstimate:
    """Capacity of one replica of ``variant`` for requests of ``bucket`` at ``slo``.

    ``kv_transfer_s``: P->D KV-cache transfer per request (P: part of TTFT; D: part of E2E).
    ``service_level`` in (0, 1] scales the sustainable rate down to buy latency headroom.
    ``prefill_queue``: see ``AllocationOptions.prefill_queue``.
    """
    _check_levels(kv_transfer_s, service_level)
    profiles: dict[str, object] = {}
    key = _prefix(variant, model, accelerator, profiles) + _suffix(bucket, slo, kv_transfer_s, service_level,
                                                                    prefill_queue)
    return _estimates([(variant.name, bucket.label)], [key], profiles)[0]


def capacity_table(problem: Problem) -> dict[tuple[str, str], CapacityEstimate]:
    """Every variant x every bucket of its model's workload, keyed (variant name, bucket label).

    P and D variants pay a KV transfer of input_tokens x kv_bytes_per_token / kv_transfer_gb_s
    (P in TTFT, D in E2E). Models without a workload have no buckets, so no entries.

    The table holds each replica's full capacity at SLO (service level 1): the allocation applies
    ``problem.options.service_level`` itself (load <= service_level x replicas), so applying it here
    too would plan for its square, and the capacity the operator reports must be the replica's own.
    """
    opts = problem.options
    levels = bucket_percentiles(problem) if opts.shared_tail else {}
    return _attainable(problem, _table(problem, levels), levels)


ATTAINABLE_TAIL_LEVELS = tuple(2.0 ** (k / 3.0) for k in range(1, 13))
"""Where no variant serves a bucket at its percentile: the miss shares, as multiples of the SLO's
(1 - percentile), tried in turn for the highest level one serves it at (2^(1/3) to 16x)."""


def _served(model: str, label: str, variants, table) -> bool:
    """Some PD variant, or some P and some D variant, take a positive rate of the bucket."""
    rate = {r: any(table[(v.name, label)].max_rate_rps > 0 for v in variants if Role(v.role) is r) for r in Role}
    return rate[Role.BOTH] or (rate[Role.PREFILL] and rate[Role.DECODE])


def _attainable(problem: Problem, table: dict[tuple[str, str], CapacityEstimate],
                levels: dict[tuple[str, str], float]) -> dict[tuple[str, str], CapacityEstimate]:
    """Buckets no variant serves at their percentile, planned at the highest percentile one does.

    Why: a bucket whose tail is too long for every variant at p99 (long-context prompts whose p99
    prefill alone nearly fills the TTFT) got rate 0 everywhere, so the allocation planned nothing
    for it: as its mean prompt drifted across that edge, longctx70b's plan fell from an H100 prefill
    + A100 decode pair to one A100 PD replica (the fleet was kept only because demand went unserved).
    Those requests still come; the plan should serve them as well as any variant can, and say so.
    """
    slos = {s.model: s for s in problem.slos}
    out = dict(table)
    for w in problem.workloads:
        slo = slos[w.model]
        variants = [v for v in problem.variants if v.model == w.model]
        for b in w.buckets:
            if not variants or _served(w.model, b.label, variants, table):
                continue
            pct = levels.get((w.model, b.label), slo.percentile)
            lone = problem.model_copy(update={"workloads": [w.model_copy(update={
                "buckets": [b.model_copy(update={"share": 1.0})]})]})
            for mult in ATTAINABLE_TAIL_LEVELS:
                lower = 100.0 - mult * (100.0 - pct)
                if lower < _MIN_SHARED_PERCENTILE:
                    break
                at = _table(lone, {(w.model, b.label): lower})
                if _served(w.model, b.label, variants, at):
                    why = (f"no variant meets p{pct:g} for bucket {b.label}; planned at p{lower:.3g}, the highest "
                           f"percentile one serves")
                    for v in variants:
                        est = at[(v.name, b.label)]
                        out[(v.name, b.label)] = est.model_copy(update={
                            "percentile": lower, "reason": why if est.max_rate_rps > 0 else est.reason})
                    break
    return out


def _table(problem: Problem, levels: dict[tuple[str, str], float],
           tail: float | None = None) -> dict[tuple[str, str], CapacityEstimate]:
    """The table at each bucket's percentile in `levels` (default: its SLO's), or every bucket at
    `tail` x the SLO's miss share."""
    opts = problem.options
    full = 1.0
    accs = {a.name: a for a in problem.accelerators}
    models = {m.name: m for m in problem.models}
    slos = {s.model: s for s in problem.slos}
    # Per model: (bucket label, case suffix without transfer, with transfer) for each bucket.
    suffixes: dict[str, list[tuple[str, tuple, tuple]]] = {}
    for w in problem.workloads:
        model, slo = models[w.model], slos[w.model]
        rows = []
        for b in w.buckets:
            if tail is not None:
                pct = max(100.0 - tail * (100.0 - slo.percentile), _MIN_SHARED_PERCENTILE)
            else:
                pct = levels.get((w.model, b.label), slo.percentile)
            at = slo if pct == slo.percentile else slo.model_copy(update={"percentile": pct})
            transfer = b.input_tokens * model.kv_bytes_per_token / (opts.kv_transfer_gb_s * 1e9)
            rows.append((b.label, _suffix(b, at, 0.0, full, opts.prefill_queue),
                         _suffix(b, at, transfer, full, opts.prefill_queue)))
        suffixes[w.model] = rows
    profiles: dict[str, object] = {}
    names: list[tuple[str, str]] = []
    keys: list[tuple] = []
    for v in problem.variants:
        rows = suffixes.get(v.model)
        if not rows:
            continue
        prefix = _prefix(v, models[v.model], accs[v.accelerator], profiles)
        split = v.role is not Role.BOTH
        for label, plain, with_transfer in rows:
            names.append((v.name, label))
            keys.append(prefix + (with_transfer if split else plain))
    return dict(zip(names, _estimates(names, keys, profiles), strict=True))


SHARED_TAIL_LEVELS = tuple(2.0 ** (k / 3.0) for k in range(-6, 7))
"""A bucket's miss share, as multiples of the SLO's (1 - percentile), that `shared_tail` chooses from
(1/4 to 4, steps of 2^(1/3): a bucket of 80 % of the requests can only take ~1.2x)."""
_MIN_SHARED_PERCENTILE = 50.0


def bucket_percentiles(problem: Problem) -> dict[tuple[str, str], float]:
    """Each bucket's percentile when the SLO's tail is shared across a model's buckets (percent).

    Why: the SLO says 99 % of a model's requests, not 99 % of each length bucket's. Holding every
    bucket to its own p99 makes the costliest bucket (long prompts whose p99 prefill barely fits
    the TTFT) set the fleet, while a bucket of short prompts meets p99.8 on the same replicas for
    free. Here every bucket's miss share m_b is chosen from `SHARED_TAIL_LEVELS` x (1 - percentile)
    so that sum_b share_b m_b stays within the model's (1 - percentile), at the least cost per
    request/s: for each bucket, the cheapest $/h per req/s over the PD variants and over a P plus a
    D variant at that level. The choice is a multiple-choice knapsack, solved by a Lagrange price
    on the tail budget (every price tried on a log grid, the cheapest assignment that fits kept; the
    one where every bucket takes the SLO's own percentile always fits); besides the grid, each bucket
    may take all the budget the others leave at their lowest level. Buckets no variant serves at any
    level keep the SLO's percentile.
    """
    slos = {s.model: s for s in problem.slos}
    low = SHARED_TAIL_LEVELS[0]
    # One more option per bucket: the most it can take with every other bucket at the lowest level
    # (the grid's steps miss it: a bucket of 80 % can take 1.19x, the next step is 1.26x).
    most: dict[tuple[str, str], float] = {}
    for w in problem.workloads:
        pct = slos[w.model].percentile
        for b in w.buckets:
            mult = min((1.0 - (1.0 - b.share) * low) / b.share, SHARED_TAIL_LEVELS[-1])
            most[(w.model, b.label)] = max(100.0 - mult * (100.0 - pct), _MIN_SHARED_PERCENTILE)
    tables = [_table(problem, {}, tail=level) for level in SHARED_TAIL_LEVELS] + [_table(problem, most)]
    base = SHARED_TAIL_LEVELS.index(1.0)
    out: dict[tuple[str, str], float] = {}
    for w in problem.workloads:
        slo = slos[w.model]
        variants = [v for v in problem.variants if v.model == w.model]
        price = {v.name: problem.variant_cost_per_hour(v) for v in variants}
        grid = np.maximum(100.0 - np.array(SHARED_TAIL_LEVELS) * (100.0 - slo.percentile), _MIN_SHARED_PERCENTILE)
        levels = np.array([[*grid, most[(w.model, b.label)]] for b in w.buckets])
        shares = np.array([b.share for b in w.buckets])
        cost = np.full(levels.shape, np.inf)
        for j, b in enumerate(w.buckets):
            for k, table in enumerate(tables):
                per = {r: [price[v.name] / table[(v.name, b.label)].max_rate_rps for v in variants
                           if Role(v.role) is r and table[(v.name, b.label)].max_rate_rps > 0] for r in Role}
                best_split = min(per[Role.PREFILL], default=np.inf) + min(per[Role.DECODE], default=np.inf)
                cost[j, k] = min(min(per[Role.BOTH], default=np.inf), best_split)
        servable = np.isfinite(cost).any(axis=1)
        # Share of the model's tail budget each level takes.
        take = shares[:, None] * (100.0 - levels) / (100.0 - slo.percentile)
        budget = 1.0 - float(shares[~servable].sum())
        rows = np.arange(len(w.buckets))
        best = np.full(len(w.buckets), base)
        at_base = cost[servable, base]
        best_cost = float(shares[servable] @ at_base) if np.isfinite(at_base).all() else np.inf
        finite = cost[np.isfinite(cost)]
        scale = float(np.max(finite)) if finite.size else 1.0
        for price_of_tail in scale * np.logspace(-4, 4, 81):
            pick = np.argmin(np.where(np.isfinite(cost), shares[:, None] * cost + price_of_tail * take, np.inf), axis=1)
            if float(take[rows, pick][servable].sum()) > budget + 1e-9:
                continue
            total = float(np.sum(np.where(servable, shares * cost[rows, pick], 0.0)))
            if total < best_cost * (1.0 - 1e-9):
                best, best_cost = pick, total
        for j, b in enumerate(w.buckets):
            if servable[j]:
                out[(w.model, b.label)] = float(levels[j, best[j]])
    return out


# ----------------------------------------------------------------------------------------------
# Cases are plain tuples (hashable, cheap), solved in one vectorised batch and cached.


class _Solved(NamedTuple):
    rate: float
    ttft: float
    itl: float
    e2e: float
    batch: float
    k: int
    kv_tokens: float
    limiting: str
    reason: str | None


def _check_levels(kv_transfer_s: float, service_level: float) -> None:
    if not 0 < service_level <= 1:
        raise ValueError(f"service_level must be in (0, 1], got {service_level}")
    if not kv_transfer_s >= 0:
        raise ValueError(f"kv_transfer_s must be >= 0, got {kv_transfer_s}")


def _prefix(variant: Variant, model: ModelSpec, accelerator: Accelerator, profiles: dict) -> tuple:
    pkey = variant.profile.model_dump_json()
    profiles.setdefault(pkey, variant.profile)
    return (pkey, _ROLE_CODE[Role(variant.role)], int(variant.max_batch),
            kv_capacity_tokens(model, accelerator, variant.accelerators_per_replica))


def _suffix(bucket: LengthBucket, slo: SLO, kv_transfer_s: float, service_level: float,
            prefill_queue: bool = False) -> tuple:
    return (float(bucket.input_tokens), float(bucket.output_tokens), float(slo.ttft_s), float(slo.itl_s),
            float(slo.e2e_s) if slo.e2e_s is not None else np.inf, float(slo.percentile) / 100.0,
            float(kv_transfer_s), float(service_level), float(bucket.input_tokens_cv),
            float(bucket.output_tokens_cv), bool(prefill_queue))


def _estimate(variant: str, bucket: str, s: _Solved) -> CapacityEstimate:
    def opt(x):
        return float(x) if np.isfinite(x) else None

    # Built from values the model produced and checked itself: skip re-validation (10k per cycle).
    return CapacityEstimate.model_construct(
        variant=variant, bucket=bucket, max_rate_rps=s.rate, ttft_s=opt(s.ttft), itl_s=opt(s.itl),
        e2e_s=opt(s.e2e), batch_at_max=s.batch, max_concurrency=s.k, kv_capacity_tokens=s.kv_tokens,
        limiting=s.limiting, reason=s.reason,
    )


# The operator recomputes the table every cycle with mostly unchanged inputs: keep solved cases,
# the estimates built from them, and each profile's tabulated decode curve.
_CACHE_LIMIT = 200_000
_SOLVED: dict[tuple, _Solved] = {}
_ESTIMATES: dict[tuple, CapacityEstimate] = {}
_DECODE_ROWS: dict[str, np.ndarray] = {}


def clear_capacity_cache() -> None:
    """Forget solved cases and tabulated profiles (memory, or to time a cold start)."""
    for cache in (_SOLVED, _ESTIMATES, _DECODE_ROWS):
        cache.clear()


def _solve_many(keys: list[tuple], profiles: dict[str, object]) -> list[_Solved]:
    todo = list(dict.fromkeys(k for k in keys if k not in _SOLVED))
    if todo:
        if len(_SOLVED) + len(todo) > _CACHE_LIMIT:
            _SOLVED.clear()
            _ESTIMATES.clear()
        # Branches np.where discards may divide by zero or overflow; their results are never used.
        with np.errstate(all="ignore"):
            solved = _CapacityModel(todo, profiles).solve()
        for k, s in zip(todo, solved, strict=True):
            _SOLVED[k] = s
    return [_SOLVED[k] for k in keys]


def _estimates(names: list[tuple[str, str]], keys: list[tuple], profiles: dict) -> list[CapacityEstimate]:
    out: list[CapacityEstimate | None] = [_ESTIMATES.get((n, k)) for n, k in zip(names, keys, strict=True)]
    missing = [i for i, e in enumerate(out) if e is None]
    if missing:
        solved = _solve_many([keys[i] for i in missing], profiles)
        if len(_ESTIMATES) + len(missing) > _CACHE_LIMIT:
            _ESTIMATES.clear()
        for i, s in zip(missing, solved, strict=True):
            est = _estimate(names[i][0], names[i][1], s)
            _ESTIMATES[(names[i], keys[i])] = est
            out[i] = est
    return out


# ----------------------------------------------------------------------------------------------
# The vectorised model.


class _Point(NamedTuple):
    lam: np.ndarray  # arrival rate
    x_max: np.ndarray  # saturation throughput
    batch: np.ndarray  # mean decode batch (P: mean prefill batch)
    itl_q: np.ndarray  # ITL at the percentile (decode roles; inf past the stable range)
    wait_p: np.ndarray  # probability of waiting for a slot
    tail_rate: np.ndarray  # rate of the exponential slot wait
    w_idle: np.ndarray  # chance a request finds the replica idle (TTFT = one prefill)
    w_busy: np.ndarray  # otherwise TTFT - one prefill ~ Gamma(shape, scale)
    shape: np.ndarray
    scale: np.ndarray
    own: np.ndarray  # (node, case): its own prefill, first iteration to first token, per prompt length
    r_share: np.ndarray  # share of the busy path that is one residual prefill exactly (prefill servers)
    work: np.ndarray  # (case, node): each prompt's prefill work in the queue, per prompt length


class _CapacityModel:
    """All cases as arrays; every formula below works on every case at once."""

    def __init__(self, keys: list[tuple], profiles: dict[str, object]):
        cols = list(zip(*keys, strict=True))
        f = np.array
        self.keys = keys
        self.role = f(cols[1], dtype=np.int64)
        self.mb = f(cols[2], dtype=float)
        self.kv = f(cols[3], dtype=float)
        self.I = f(cols[4], dtype=float)
        self.O = f(cols[5], dtype=float)
        self.ttft_t, self.itl_t, self.e2e_t = f(cols[6]), f(cols[7]), f(cols[8])
        self.q = f(cols[9])
        self.z = ndtri(self.q)
        self.xfer, self.level = f(cols[10]), f(cols[11])
        self.cv_in, self.cv_out = f(cols[12]), f(cols[13])
        self.fcfs = f(cols[14], dtype=bool)
        # PD with (about) one output token never decodes: it is a prefill server.
        self.prefill_only = (self.role == _P) | ((self.role == _PD) & (self.O < 1.5))
        self.decodes = ~self.prefill_only
        self.is_pd = (self.role == _PD) & self.decodes
        self.is_d = self.role == _D
        self.prefills = ~self.is_d
        self.W = np.maximum(self.O - 1.0, 1.0)  # a D replica given one-token answers still runs a step
        # A running sequence holds its reservation for as long as it decodes, so long answers hold
        # the cache longer: the mean reservation in the cache is I + O (1 + cv_out^2), not I + O.
        per_request = np.where(self.prefill_only, self.I + 1.0, self.I + self.O * (1.0 + self.cv_out**2))
        self.k_kv = np.floor(self.kv / per_request)
        self.K = np.minimum(self.mb, self.k_kv)
        self.Kc = np.maximum(self.K, 1.0)
        self._tabulate([k[0] for k in keys], profiles)
        self.z_itl = _itl_spread_quantile(self.q, self.W, self.cv_out)

    # ----- profile tables -----
    def _tabulate(self, profile_keys: list[str], profiles: dict[str, object]) -> None:
        """Decode step d(n), n = 0..max_batch+1 (flat, per profile); one prompt's prefill per case."""
        n_cases = len(profile_keys)
        groups: dict[str, list[int]] = {}
        for i, pk in enumerate(profile_keys):
            groups.setdefault(pk, []).append(i)
        self.kv_coef = np.zeros(n_cases)
        offsets = np.zeros(n_cases, dtype=np.int64)
        rows = []
        # A prompt's own prefill varies with its length (lognormal, cv_in): its prefill at the
        # quadrature nodes of that spread. The attention term makes long prompts cost more than
        # their share, so the mean prefill is above the prefill of the mean prompt.
        sigma = np.sqrt(np.log1p(self.cv_in**2))
        ratio = np.exp(sigma[:, None] * _OWN_NODES[None, :] - 0.5 * sigma[:, None] ** 2)
        own = np.zeros((n_cases, _OWN_NODES.size))
        fill = np.zeros((n_cases, _OWN_NODES.size))
        self.p0 = np.zeros(n_cases)
        self.budget = np.full(n_cases, np.inf)
        start = 0
        for pk, idx in groups.items():
            prof = profiles[pk]
            idx = np.asarray(idx)
            row = _decode_row(pk, prof, int(self.mb[idx].max()))
            rows.append(row)
            offsets[idx] = start
            start += row.size
            self.kv_coef[idx] = float(getattr(prof, "decode_per_kv_token_s", 0.0))
            self.p0[idx] = max(float(prof.prefill_base_time_s()), 0.0)
            budget = getattr(prof, "max_num_batched_tokens", None)
            self.budget[idx] = np.inf if budget is None else float(budget)
            tokens = self.I[idx, None] * ratio[idx]
            own[idx] = np.asarray(prof.prefill_s(tokens), dtype=float).reshape(tokens.shape)
            if budget is not None:
                # The budget left in a prompt's last iteration, which the next prompts' first chunks fill.
                last = tokens - float(budget) * (np.ceil(np.maximum(tokens, 1.0) / float(budget)) - 1.0)
                left = np.maximum(float(budget) - last, 0.0)
                fill[idx] = (np.asarray(prof.prefill_s(left), dtype=float).reshape(left.shape)
                             - self.p0[idx, None])
        self.decode_flat = np.concatenate(rows)
        self.decode_off = offsets
        self.ctx = self.I + 1.0 + self.W / 2.0  # mean context a decoding sequence reads
        own = np.maximum(own, _MIN_TIME_S)
        self.p1 = own @ _OWN_WEIGHTS  # mean prefill of one prompt
        self.p0 = np.minimum(self.p0, self.p1)
        # Each extra prompt in a prefill batch adds its own prefill beyond the shared fixed cost.
        self.prefill_slope = self.p1 - self.p0
        self.sd_prefill = np.sqrt(np.maximum((own - self.p1[:, None]) ** 2 @ _OWN_WEIGHTS, 0.0))
        self.own_prefill = own  # (case, node): a prompt's own prefill at each node of the length spread
        self.fill = np.maximum(fill, 0.0)  # (case, node): the next prompts' chunks in its last iteration
        self.any_spread = bool(np.any(self.cv_in > 0))
        self.own_ratio = ratio
        self.chunked = np.isfinite(self.budget)
        self.own0 = self.job(np.ones(n_cases), self.p0, self.budget)  # one prompt on an idle replica
        self._mb_i = self.mb.astype(np.int64)

    def decode(self, n):
        """Decode step at (fractional) batch n, each case at its mean context."""
        n = np.clip(np.nan_to_num(n), 0.0, self.mb + 1.0)
        lo = np.minimum(np.floor(n).astype(np.int64), self._mb_i)
        a = self.decode_flat[self.decode_off + lo]
        b = self.decode_flat[self.decode_off + lo + 1]
        return a + (n - lo) * (b - a) + self.kv_coef * n * self.ctx

    def decode_slope(self, n):
        """Added decode time per added sequence at batch n."""
        lo = np.minimum(np.floor(np.clip(np.nan_to_num(n), 0.0, self.mb)).astype(np.int64), self._mb_i)
        return (self.decode_flat[self.decode_off + lo + 1] - self.decode_flat[self.decode_off + lo]
                + self.kv_coef * self.ctx)

    def prefill(self, m):
        """Prefill of m prompts batched together: p(0) + m x (p(I) - p(0)), attention per prompt.

        Fractional m interpolates; below one prompt it goes linearly to 0 at m = 0.
        """
        m = np.clip(np.nan_to_num(m), 0.0, 1e9)
        p0, p1 = (self.p0, self.p1) if m.ndim == 1 else (self.p0[:, None], self.p1[:, None])
        return np.where(m >= 1.0, p0 + m * (p1 - p0), m * p1)

    def job(self, m, d_iter, room):
        """How long m prompts batched together take from their first iteration to their first tokens.

        No budget: one prefill iteration, p(m). Chunked prefill: ceil(m I / room) iterations, each
        of length d_iter (the decode step it shares, or the fixed cost of a pass with no decodes),
        plus each prompt's own prefill beyond that fixed cost.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.maximum(1.0, np.ceil(m * self.I / np.maximum(room, 1.0)))
        return np.where(self.chunked, k * d_iter + m * self.prefill_slope, self.prefill(m))

    # ----- the model at one operating point per case -----
    def point(self, u) -> _Point:
        """The operating point at search position u in [0, 1] (0 = no load, 1 = saturation)."""
        K, W = self.Kc, self.W

        # Decoding roles: the mean batch n is the search variable, the rate follows from it.
        n = u * K
        per_step = n / W  # arrivals during one decode step, prefilled together
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            m_bar = np.where(per_step > 1e-9, per_step / -np.expm1(-per_step), 1.0)
        # What a request's prefill stalls the batch for: its batch's prefill shared out, or with chunked
        # prefill its own chunks only (the decode step they ride along already pays the fixed cost).
        p_eff = np.where(self.is_pd, np.where(self.chunked, self.prefill_slope, self.prefill(m_bar) / m_bar), 0.0)
        d_n = self.decode(n)
        slope = self.decode_slope(n)
        lam_dec = n / (W * d_n + n * p_eff)
        rho = np.clip(lam_dec * p_eff, 0.0, 0.999999)
        g = lam_dec * slope * W
        stable = 1.0 - g - rho > 2e-3
        tau = d_n / (1.0 - rho)
        fj, fc, fn = fluctuation_factors(g, rho)
        with np.errstate(divide="ignore", invalid="ignore"):
            extra = np.where(lam_dec > 0, fc / lam_dec, slope * W + p_eff) - p_eff  # minus its own prefill
            # Prompts of unequal length stall the batch unequally: extra noise on the prefill channel,
            # amplified by the same feedback as the arrival noise (exact in the no-feedback limit).
            amplification = np.maximum(fj / np.maximum((g + rho) ** 2, 1e-300), 1.0)
            fj = fj + amplification * (lam_dec * self.is_pd * self.sd_prefill) ** 2
            sd = np.where(lam_dec > 0, np.sqrt(tau * fj / (lam_dec * W)), 0.0)
            # At small batches a request sees a handful of prefill stalls, each long: a skewed sum,
            # and self-exciting (each stall lets more prompts in, whose stalls count too). A request's
            # decode time is then a busy period started by its own W d(n) of work: third cumulant
            # lam W d (m3 (1 - rho) + 3 lam m2^2) / (1 - rho)^5 over stalls of moments m2, m3.
            m2 = p_eff**2 * (1.0 + self.cv_in**2)
            m3 = (p_eff * (1.0 + self.cv_in**2)) ** 3
            free = np.maximum(1.0 - rho, 1e-3)
            k3 = lam_dec * W * d_n * (m3 * free + 3.0 * lam_dec * m2**2) / free**5
            skew = np.where(sd > 0, k3 / np.maximum((sd * W) ** 3, 1e-300), 0.0)
            skew = np.minimum(skew, _MAX_SKEW)
        # Skewed tail: the standardised gamma (Pearson III) quantile at the percentile's level.
        shape_g = 4.0 / np.maximum(skew, 1e-6) ** 2
        with np.errstate(invalid="ignore", over="ignore"):
            z_gamma = (gammaincinv(shape_g, ndtr(self.z_itl)) - shape_g) / np.sqrt(shape_g)
        z = np.where(skew > 1e-3, z_gamma, self.z_itl)
        itl_q = tau + extra / W + np.maximum(z, self.z_itl) * sd
        p_sat = np.where(self.is_pd, np.where(self.chunked, self.prefill_slope, self.p1), 0.0)
        d_full = self.decode(K)
        x_max_dec = K / (W * d_full + K * p_sat)
        itl_full = d_full / (1.0 - x_max_dec * p_sat)  # a full batch cannot decode slower than this
        itl_q = np.where(stable, np.minimum(itl_q, np.maximum(itl_full, tau)), np.inf)

        # Prefill-only: search over the rate, up to full prefill batches back to back.
        x_max_pre = K / self.job(K, self.p0, self.budget)
        lam = np.where(self.decodes, lam_dec, u * x_max_pre)
        x_max = np.where(self.decodes, x_max_dec, x_max_pre)

        # Slot wait: Erlang C with the occupancy's own variance (peakedness, Hayward's scaling).
        occupancy = n + np.where(lam_dec > 0, fc, 0.0) + rho
        peakedness = np.maximum(n * fn, 1e-12) / np.maximum(occupancy, 1e-12)
        wait_p = _erlang_c(occupancy, K, peakedness)
        wait_p = np.where(self.decodes, np.where(stable, np.where(n > 0, wait_p, 0.0), 1.0), 0.0)
        # A slot is held for the request's decode, so its service time spreads as its output length does
        # (C_s = cv_out): spread answers slow the heavy-traffic wait tail, 2 / (1 + C_s^2).
        tail_rate = _SLOT_TAIL_SPEEDUP / (1.0 + self.cv_out**2) * np.maximum(x_max - lam, 0.0)

        # What is in flight when a request arrives, as moments of its TTFT beyond one prefill.
        slope_p = self.prefill_slope  # each extra prompt in a prefill batch
        d_step = self.decode(np.maximum(n, 1.0))
        # The pass a prefill rides: a decode step (PD with chunked prefill) or the bare fixed cost.
        d_iter = np.where(self.decodes, d_step, self.p0)
        room = np.where(self.decodes, self.budget - n, self.budget)
        # Its own prefill at each node of the prompt-length spread; chunked, a longer prompt also
        # takes more iterations, each paying the decode step it rides.
        with np.errstate(divide="ignore", invalid="ignore"):
            k_own = np.maximum(1.0, np.ceil(self.I[:, None] * self.own_ratio / np.maximum(room, 1.0)[:, None]))
        own_nodes = np.where(self.chunked[:, None], k_own * d_iter[:, None] + self.own_prefill - self.p0[:, None],
                             self.own_prefill).T
        m_pre, var_m = self._prefill_batches(lam, d_step, slope_p)
        mean_len = self.job(m_pre, d_iter, room)
        # Its length varies with the number of prompts in it and with each prompt's own length.
        var_len = slope_p**2 * var_m + np.maximum(m_pre, 1.0) * self.sd_prefill**2
        len2 = mean_len**2 + var_len
        len3 = mean_len**3 + 3.0 * mean_len * var_len + slope_p**3 * var_m
        with np.errstate(divide="ignore", invalid="ignore"):
            idle_gap = np.where(lam > 0, np.exp(-lam * mean_len) / lam, np.inf)
            busy_p = np.where(lam > 0, mean_len / (mean_len + idle_gap), 0.0)
        # PD: the share of time a prefill is under way (chunked: its whole job, decode steps included).
        with np.errstate(divide="ignore", invalid="ignore"):
            job_share = np.clip(lam * mean_len / np.maximum(m_pre, 1.0), 0.0, 0.999999)
        w_pre = np.where(self.decodes, np.where(self.chunked, job_share, rho), busy_p)
        w_dec = np.where(self.decodes, (1.0 - rho) * -np.expm1(-n), 0.0)
        w_idle = np.clip(1.0 - w_pre - w_dec, 0.0, 1.0)
        # Arriving during an iteration of length L (length-biased): wait U*L, then its own batch,
        # itself plus Poisson(lam L) others, each adding slope_p.
        own = slope_p * lam
        lb1, lb2 = len2 / mean_len, len3 / mean_len
        e1_pre, e1_dec = lb1 * (0.5 + own), d_step * (0.5 + own)
        e2_pre = lb2 * (1.0 / 3.0 + own + own**2) + slope_p**2 * lam * lb1
        e2_dec = d_step**2 * (1.0 / 3.0 + own + own**2) + slope_p**2 * lam * d_step
        # Chunked prefill (PD): prompts queue first come first served for the budget left by the
        # decodes, so waits add up behind every prompt still prefilling (M/G/1, Pollaczek-Khinchine),
        # each holding the queue for its own prefill plus its share I / room of the decode steps it
        # rides; then the iteration in flight ends (it is always a decode step here).
        work = (self.own_prefill - self.p0[:, None]
                + d_iter[:, None] * self.I[:, None] * self.own_ratio / np.maximum(room, 1.0)[:, None])
        es, es2, es3 = work @ _OWN_WEIGHTS, work**2 @ _OWN_WEIGHTS, work**3 @ _OWN_WEIGHTS
        rho_q = np.clip(lam * es, 0.0, 0.999)
        with np.errstate(divide="ignore", invalid="ignore"):
            ew = lam * es2 / (2.0 * (1.0 - rho_q))
            ew2 = 2.0 * ew**2 + lam * es3 / (3.0 * (1.0 - rho_q))
            c1 = np.where(rho_q > 0, ew / rho_q, 0.0)
            c2 = np.where(rho_q > 0, ew2 / rho_q, 0.0)
        # PD under a budget, and with `prefill_queue` a prefill server under one, queue their prompts.
        queued = self.chunked & (self.is_pd | (self.fcfs & self.prefill_only))
        # A prefill server's prompt ends its prefill in an iteration the prompts queued behind it fill
        # up to the budget, and its first token comes when that whole iteration ends: it waits for
        # their chunks too (there when one arrived during its wait or its own prefill).
        filled = np.where(self.prefill_only & queued, -np.expm1(-lam * (c1 * rho_q + es)), 0.0)
        own_nodes = own_nodes + (filled[:, None] * self.fill).T
        # A decoding replica's arrival then waits for the decode step in flight; a prefill server
        # has none (the P-K wait already holds the rest of the chunk in flight).
        d_tail = np.where(self.decodes, d_step, 0.0)
        w_pre = np.where(queued, rho_q, w_pre)
        w_dec = np.where(queued, np.where(self.decodes, (1.0 - rho_q) * -np.expm1(-n), 0.0), w_dec)
        w_idle = np.clip(1.0 - w_pre - w_dec, 0.0, 1.0)
        e1_pre = np.where(queued, c1 + 0.5 * d_tail, e1_pre)
        e2_pre = np.where(queued, c2 + c1 * d_tail + d_tail**2 / 3.0, e2_pre)
        # A prefill server's queue (M/G/1): the wait, given one, is the residual R of the prefill in
        # service plus, with probability rho, an independent copy of the wait again (the ladder
        # heights of Pollaczek-Khinchine). The first residual is read off the prompt-length nodes
        # exactly; only the rest, R + W, is fitted by a gamma. Fitting the whole wait by a gamma from its
        # two moments put the long-prompt p99 ~1 s (10 %) too high at cv_in 0.85, which halved the
        # rate: the variance of a wait behind rare huge prompts spread into the tail's body.
        exact = self.prefill_only & queued & (rho_q > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r1 = es2 / (2.0 * es)
            r2 = es3 / (3.0 * es)
        e1_pre = np.where(exact, r1 + c1, e1_pre)
        e2_pre = np.where(exact, r2 + 2.0 * r1 * c1 + c2, e2_pre)
        r_share = np.where(exact, 1.0 - rho_q, 0.0)
        busy = w_pre + w_dec
        with np.errstate(divide="ignore", invalid="ignore"):
            m1 = np.where(busy > 0, (w_pre * e1_pre + w_dec * e1_dec) / busy, 0.0)
            m2 = np.where(busy > 0, (w_pre * e2_pre + w_dec * e2_dec) / busy, 0.0)
        var = np.maximum(m2 - m1**2, 1e-12 * np.maximum(m1**2, 1e-30))
        shape = np.where(m1 > 0, m1**2 / var, 1.0)
        scale = np.where(m1 > 0, var / np.maximum(m1, 1e-300), 1.0)
        batch = np.where(self.decodes, n, m_pre)
        return _Point(lam, x_max, batch, itl_q, wait_p, tail_rate, w_idle, busy, shape, scale, own_nodes,
                      r_share, work)

    def _prefill_batches(self, lam, d_step, slope_p):
        """Mean and variance of the prompts in a prefill batch: those that arrived during the last iteration.

        P: the previous prefill batch (branching: long batches breed long batches), or 1 after an
        idle spell. PD: mostly the arrivals during one decode step, given there was one.
        """
        m = np.ones_like(lam)
        for _ in range(6):
            a = lam * self.job(m, self.p0, self.budget)
            m = a + np.exp(-a)
        a = lam * self.job(m, self.p0, self.budget)
        first = a + np.exp(-a)
        var_p = (a + a * a + np.exp(-a) - first**2) / (1.0 - np.minimum((lam * slope_p) ** 2, 0.95))
        seen = lam * d_step
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            m_pd = np.where(seen > 1e-9, seen / -np.expm1(-seen), 1.0)
        return np.where(self.decodes, m_pd, m), np.where(self.decodes, m_pd - 1.0, np.maximum(var_p, 0.0))

    def ttft_cdf(self, x, pt: _Point):
        """P(TTFT <= x) for prefilling roles (KV transfer excluded): gamma fit beyond one prefill."""
        if not self.any_spread:
            return self._ttft_cdf_beyond(x - pt.own[0], pt)
        # Its own prompt's length varies: average over lognormal prompt lengths (quadrature). With no
        # wait (the replica idle) TTFT is its own prefill alone, whose distribution is continuous:
        # read it off between the nodes (own prefill grows with the prompt's normal score), or the
        # percentile would snap to a node.
        total = 0.0
        for own, weight in zip(pt.own, _OWN_WEIGHTS, strict=True):
            total = total + weight * self._ttft_cdf_beyond(x - own, pt, idle=False)
        return total + (1.0 - pt.wait_p) * pt.w_idle * self._own_prefill_cdf(x, pt.own)

    def _own_prefill_cdf(self, x, own):
        """P(own prefill <= x): its normal score interpolated between the quadrature nodes."""
        below = (own <= x[None, :]).sum(axis=0)
        j = np.clip(below, 1, own.shape[0] - 1)
        cols = np.arange(own.shape[1])
        lo, hi = own[j - 1, cols], own[j, cols]
        # With `prefill_queue`, geometrically: a prefill grows about exponentially in the prompt's normal
        # score (lognormal lengths, attention on top), and the linear chord between the nodes, above that
        # convex curve, reads the p99 of 15k-token prompts at cv 0.85 0.6 s (8 %) too high when idle.
        with np.errstate(divide="ignore", invalid="ignore"):
            chord = (x - lo) / (hi - lo)
            geometric = np.log(np.maximum(x, lo) / lo) / np.log(hi / lo)
            f = np.clip(np.where(hi > lo, np.where(self.fcfs, geometric, chord), 1.0), 0.0, 1.0)
        z = _OWN_NODES[j - 1] + f * (_OWN_NODES[j] - _OWN_NODES[j - 1])
        return np.where(below == 0, 0.0, np.where(below >= own.shape[0], 1.0, ndtr(z)))

    @staticmethod
    def _residual_cdf(y, pt: _Point):
        """P(R <= y), R the residual of the prefill in service: 1 - E[(S - y)+] / E[S] over the nodes."""
        over = np.maximum(pt.work - np.maximum(y, 0.0)[:, None], 0.0) @ _OWN_WEIGHTS
        mean = np.maximum(pt.work @ _OWN_WEIGHTS, 1e-300)
        return np.clip(1.0 - over / mean, 0.0, 1.0)

    def _ttft_cdf_beyond(self, beyond, pt: _Point, idle: bool = True):
        busy_cdf = gammainc(pt.shape, np.maximum(beyond, 0.0) / pt.scale)
        if np.any(pt.r_share > 0):
            busy_cdf = pt.r_share * self._residual_cdf(beyond, pt) + (1.0 - pt.r_share) * busy_cdf
        path = pt.w_busy * busy_cdf
        if idle:
            path = path + pt.w_idle * (beyond >= 0)
        slot_ok = -np.expm1(-pt.tail_rate * np.maximum(beyond, 0.0))
        return (1.0 - pt.wait_p) * path + pt.wait_p * slot_ok

    def wait_cdf(self, y, pt: _Point):
        """P(slot wait <= y)."""
        return np.where(y >= 0, 1.0 - pt.wait_p * np.exp(-pt.tail_rate * np.maximum(y, 0.0)), 0.0)

    def checks(self, pt: _Point):
        """Per constraint, whether it holds: ttft, itl (decode speed), slot wait of D, e2e."""
        ok_ttft = np.where(self.prefills, self.ttft_cdf(self.ttft_t - self.xfer, pt) >= self.q, True)
        ok_itl = np.where(self.decodes, pt.itl_q <= self.itl_t, True)
        # D: waiting for a slot delays the second token, so it spends the ITL budget.
        ok_wait = np.where(self.is_d, self.wait_cdf(self.W * (self.itl_t - pt.itl_q), pt) >= self.q, True)
        finite = np.isfinite(self.e2e_t)
        room = np.where(finite, self.e2e_t - self.W * pt.itl_q, 0.0)
        ok_e2e = np.ones_like(ok_ttft)
        if (finite & self.is_pd).any():
            ok_e2e = np.where(finite & self.is_pd, self.ttft_cdf(room - self.xfer, pt) >= self.q, ok_e2e)
        ok_e2e = np.where(finite & self.is_d, self.wait_cdf(room - self.p1 - self.xfer, pt) >= self.q, ok_e2e)
        return ok_ttft, ok_itl, ok_wait, ok_e2e

    def ttft_quantile(self, pt: _Point):
        lo = np.zeros_like(self.q)
        hi = np.maximum(self.ttft_t, self.p1) * 2.0 + 1.0
        for _ in range(8):  # widen until the quantile is bracketed
            short = self.ttft_cdf(hi, pt) < self.q
            if not short.any():
                break
            hi = np.where(short, hi * 4.0, hi)
        for _ in range(_QUANTILE_STEPS):
            mid = 0.5 * (lo + hi)
            ok = self.ttft_cdf(mid, pt) >= self.q
            lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
        return hi

    def _unloaded_failures(self):
        """Cases no load can save, with the constraint and a reason for a human."""
        W = self.W
        itl0 = self.decode(1.0)
        e2e0 = self.p1 + self.xfer + W * itl0
        checks = [
            ("kv_memory", self.k_kv < 1),
            ("ttft", self.prefills & (self.own0 + self.xfer > self.ttft_t)),
            ("itl", self.decodes & (itl0 > self.itl_t)),
            ("e2e", self.decodes & (e2e0 > self.e2e_t)),
        ]
        limiting = {}
        for name, bad in checks:
            for i in np.flatnonzero(bad):
                if i in limiting:
                    continue
                if name == "kv_memory":
                    per = self.I[i] + (1.0 if self.prefill_only[i] else self.O[i])
                    why = (f"one request needs {per:g} KV-cache tokens but the replica holds "
                           f"{self.kv[i]:.0f} once the weights are loaded")
                elif name == "ttft":
                    why = (f"prefill of {self.I[i]:g} tokens alone takes {self.own0[i]:.3g} s"
                           + (f" (+{self.xfer[i]:.3g} s KV transfer)" if self.xfer[i] > 0 else "")
                           + f", over the TTFT target {self.ttft_t[i]:g} s")
                elif name == "itl":
                    why = (f"a single sequence decodes at {itl0[i]:.3g} s/token, over the ITL target "
                           f"{self.itl_t[i]:g} s")
                else:
                    why = (f"unloaded, a request takes {e2e0[i]:.3g} s end to end, over the E2E target "
                           f"{self.e2e_t[i]:g} s")
                limiting[i] = (name, why)
        return limiting

    def _u_for_rate(self, target, ceiling):
        """Search position in [0, ceiling] whose rate is `target` (rates rise with u there)."""
        lo, hi = np.zeros_like(target), ceiling.copy()
        for _ in range(_SEARCH_STEPS):
            mid = 0.5 * (lo + hi)
            below = self.point(mid).lam <= target
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        return lo

    def solve(self) -> list[_Solved]:
        dead = self._unloaded_failures()
        lo = np.zeros(len(self.keys))
        hi = np.ones(len(self.keys))
        for _ in range(_SEARCH_STEPS):
            mid = 0.5 * (lo + hi)
            ok = np.logical_and.reduce(self.checks(self.point(mid)))
            lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
        at_max = self.point(lo)
        fails_above = [~c for c in self.checks(self.point(hi))]
        hit_ceiling = lo >= 1.0 - 1e-6

        rate = at_max.lam * self.level
        at = at_max
        if np.any(self.level < 1.0):
            at = self.point(np.where(self.level < 1.0, self._u_for_rate(rate, lo), lo))
        ttft_q = np.where(self.prefills, self.ttft_quantile(at) + self.xfer, np.nan)
        # D: the slot wait (its percentile) is spread over the request's tokens, as the simulator sees it.
        wait_q = np.where(at.wait_p > 1.0 - self.q,
                          np.log(at.wait_p / (1.0 - self.q)) / np.maximum(at.tail_rate, 1e-300), 0.0)
        itl_q = np.where(self.decodes, at.itl_q + np.where(self.is_d, wait_q / self.W, 0.0), np.nan)
        e2e_q = np.where(self.is_pd, ttft_q + self.W * itl_q,
                         np.where(self.is_d, self.p1 + self.xfer + self.W * itl_q, np.nan))
        slot_label = np.where(self.k_kv < self.mb, "kv_memory", "max_batch")
        waits = at_max.wait_p >= _SLOT_LIMITED_WAIT_SHARE * (1.0 - self.q)
        # A prefill server is slot-bound only if its batch cap keeps it well below what unlimited
        # batching would reach; otherwise the prefill compute itself saturates.
        grid = float(_PREFILL_GRID)
        full = self.job(np.full_like(self.Kc, grid), self.p0, self.budget)
        capped = (self.K < grid) & (self.K / self.job(self.Kc, self.p0, self.budget) < 0.95 * grid / full)
        full_prefills = self.prefill_only & capped & (at_max.lam >= 0.9 * at_max.x_max)
        compute_bound = self.prefill_only & ~capped

        f_ttft, f_itl, f_wait, f_e2e = fails_above
        slot = slot_label.astype(object)
        limiting = np.select(
            [hit_ceiling & compute_bound, hit_ceiling, f_itl, f_ttft & (waits | full_prefills), f_ttft, f_wait, f_e2e],
            [np.array("none", dtype=object), slot, np.array("itl", dtype=object), slot,
             np.array("ttft", dtype=object), slot, np.array("e2e", dtype=object)],
            default=np.array("none", dtype=object),
        ).tolist()
        reasons: list[str | None] = [None] * len(self.keys)
        for i in np.flatnonzero(lo <= 0.0):
            if i not in dead:  # fine unloaded, yet the lightest load already breaks something
                name = limiting[i] if limiting[i] in ("ttft", "itl", "e2e") else "ttft" if self.prefills[i] else "itl"
                dead[i] = (name, f"the {name.upper()} target is met unloaded but not at any sustained rate "
                                 f"(the profile leaves no stable operating point)")
        for i, (name, why) in dead.items():
            limiting[i], reasons[i] = name, why
            rate[i], ttft_q[i], itl_q[i], e2e_q[i] = 0.0, np.nan, np.nan, np.nan
        batch = np.where(np.isin(np.arange(len(self.keys)), list(dead)), 0.0, at.batch)
        return [_Solved(*row) for row in zip(
            rate.tolist(), ttft_q.tolist(), itl_q.tolist(), e2e_q.tolist(), batch.tolist(),
            np.maximum(self.K, 0).astype(np.int64).tolist(), self.kv.tolist(), limiting, reasons, strict=True)]


def _decode_row(pkey: str, profile, max_batch: int) -> np.ndarray:
    """d(n) at context 0 for n = 0..max_batch+1 (the context term is added per case)."""
    row = _DECODE_ROWS.get(pkey)
    if row is None or row.size < max_batch + 2:
        if len(_DECODE_ROWS) > _CACHE_LIMIT // 10:
            _DECODE_ROWS.clear()
        n = np.arange(max(max_batch, 255) + 2, dtype=float)
        # A step never takes no time (a measured table may extrapolate to 0 at tiny batches).
        row = np.maximum(np.atleast_1d(np.asarray(profile.decode_step_s(n, 0.0), dtype=float)), _MIN_TIME_S)
        _DECODE_ROWS[pkey] = row
    return row


def _erlang_c(offered, servers, peakedness):
    """P(wait) for `servers` slots at mean occupancy `offered` (Erlang C, fractional servers via the
    incomplete gamma), with Hayward's approximation for non-Poisson occupancy: offered / z on
    servers / z. Halfin-Whitt, its many-server limit, is 2-5x too low at the tens of slots of an
    L4 or a KV-bound replica (measured: 0.4 % vs 1.0 % at 14.7 of 25)."""
    z = np.clip(peakedness, 1e-3, 1e3)
    a = np.maximum(offered / z, 1e-12)
    k = np.maximum(servers / z, 1e-12)
    log_pmf = k * np.log(a) - a - gammaln(k + 1.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        erlang_b = np.clip(np.exp(log_pmf) / np.maximum(gammaincc(k + 1.0, a), 1e-300), 0.0, 1.0)
        rho = a / k
        c = erlang_b / np.maximum(1.0 - rho + rho * erlang_b, 1e-300)
    return np.where(a < k, np.clip(c, 0.0, 1.0), 1.0)


_SPREAD_NODES, _SPREAD_WEIGHTS = np.polynomial.hermite_e.hermegauss(24)
_OWN_NODES, _OWN_WEIGHTS = np.polynomial.hermite_e.hermegauss(16)
_OWN_WEIGHTS = _OWN_WEIGHTS / _OWN_WEIGHTS.sum()
_SPREAD_WEIGHTS = _SPREAD_WEIGHTS / _SPREAD_WEIGHTS.sum()


def _itl_spread_quantile(q, steps, cv_out):
    """The z that puts the q-quantile of per-request ITL at mean + z x sd, sd that of a mean-length request.

    A request's ITL averages its own decode steps, so its spread scales as 1 / sqrt(its steps): with
    output lengths spread (lognormal, cv_out) around the bucket mean, the percentile over requests
    is a mixture whose tail comes from the short answers. The spread is the same at every load, so
    one z per case: solve E_w[P(Z > z sqrt(w / W))] = 1 - q over lognormal w, w >= 1 step.
    """
    sigma = np.sqrt(np.log1p(cv_out**2))
    w_rel = np.exp(sigma[:, None] * _SPREAD_NODES[None, :] - 0.5 * sigma[:, None] ** 2)
    w_rel = np.maximum(w_rel, 1.0 / np.maximum(steps, 1.0)[:, None])
    root = np.sqrt(w_rel)
    target = 1.0 - q
    lo, hi = np.zeros_like(q), np.full_like(q, 40.0)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        tail = (ndtr(-mid[:, None] * root) * _SPREAD_WEIGHTS[None, :]).sum(axis=1)
        lo, hi = np.where(tail > target, mid, lo), np.where(tail > target, hi, mid)
    return np.where((cv_out > 0) & (q > 0.5), hi, ndtri(q))
