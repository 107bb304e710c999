"""Collect per-variant and per-model load observations from vLLM metrics in Prometheus.

One PromQL query per metric, for all variants at once: every query aggregates
`by (namespace, pod, model_name)` (plus an optional variant label), and the results are split into
variants here. The number of queries, and the work Prometheus does per query, is independent of
how many VariantAutoscalings exist; a cluster with 1,000 variants costs the same 19 queries.

How pods are matched to variants (configurable):
* by pod name (default): a variant's pods are those in its namespace whose `pod` label matches a
  regex, by default the Deployment's pod names `<deployment>-<replicaset hash>-<suffix>`. This
  works with any scrape config that keeps the `pod` and `namespace` labels (kubernetes_sd with
  the usual relabelling, or vLLM's Helm charts).
* by a label the scrape config attaches (`CollectorSettings.variant_label`, e.g. `variant` copied
  from a pod label with relabelling): exact and cheaper, but needs that scrape config.

Histograms are fetched as bucket rates and summed per variant and per model here, so quantiles
and the length mix are computed on the aggregate with Prometheus's own `histogram_quantile`
interpolation (see `histogram_estimates`). Bucket series are most of a collection's bytes (~70 per
pod), so when every selector names a Deployment (or a variant label) Prometheus sums them per
Deployment first (`label_replace` derives it from the pod name with the same pattern the
selectors use); only pod-regex selectors make them come per pod.

Arrival rate = completion rate (`vllm:request_success_total`, all finish reasons) + growth of the
backlog (waiting + running) over the window: vLLM has no arrival counter, and under overload
completions alone would understate demand exactly when it matters.

Failures never raise: Prometheus down, slow, answering an error or garbage all give a
`CollectionResult(available=False, reason=...)`, so the operator can keep its last decision and
set `MetricsAvailable=False` with that reason. Per variant, `status` is `ok`, `stale` (newest
sample older than the threshold: the scrape stopped, the pod hangs, Prometheus lags), `invalid`
(impossible values such as a negative or NaN rate or gauge: wrong data is not zero demand) or `missing`.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import re
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import requests
import urllib3
from prometheus_api_client import PrometheusApiClientException, PrometheusConnect
from pydantic import BaseModel, Field, SecretStr, model_validator
from urllib3.util.retry import Retry

from optimizer import input_limits as lim
from optimizer.workload import LengthBucket, Workload
from variant_autoscaler.histogram_estimates import (
    TokenShare,
    histogram_quantiles,
    joint_length_mix,
    token_distribution,
)
from variant_autoscaler.redaction import redact, redact_url, url_secrets


class _Strict(BaseModel):
    model_config = lim.STRICT


class PrometheusSettings(_Strict):
    """Where Prometheus is and how to talk to it."""

    url: str = Field(min_length=1, description="Base URL, e.g. http://prometheus.monitoring:9090.")
    bearer_token: SecretStr | None = Field(default=None, description="Sent as `Authorization: Bearer ...`.")
    bearer_token_file: Path | None = Field(
        default=None, description="Read before every collection (service-account tokens rotate).")
    verify_tls: bool = Field(default=True, description="False disables certificate verification.")
    ca_file: Path | None = Field(default=None, description="CA bundle to verify Prometheus's certificate.")
    timeout_s: float = Field(default=5.0, gt=0, le=lim.MAX_TIME_LIMIT_S, description="Per-query timeout.")
    retries: int = Field(default=0, ge=0, le=5, description="Retries on connection errors and 5xx.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers (e.g. X-Scope-OrgID).")

    @model_validator(mode="after")
    def _one_token(self) -> PrometheusSettings:
        if self.bearer_token is not None and self.bearer_token_file is not None:
            raise ValueError("give bearer_token or bearer_token_file, not both")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {redact_url(self.url)!r}")
        if (self.bearer_token is not None or self.bearer_token_file is not None) and redact_url(self.url) != self.url:
            # requests turns the URL's userinfo into a basic-auth header that replaces the bearer one: the token
            # would silently never be sent
            raise ValueError("give credentials in the url (basic auth) or a bearer token, not both: the url's "
                             "basic auth would replace the token")
        return self

    @property
    def display_url(self) -> str:
        """The URL as shown to humans (logs, Events, status): without its userinfo."""
        return redact_url(self.url)

    def redact(self, text: str, *more_secrets: str | None) -> str:
        """`text` without the password of the URL, the bearer token or an Authorization header."""
        token = self.bearer_token.get_secret_value() if self.bearer_token is not None else None
        auth = [v for k, v in self.headers.items() if k.lower() in ("authorization", "proxy-authorization", "cookie")]
        return redact(text.replace(self.url, self.display_url),
                      [*url_secrets(self.url), token, *auth, *(v.removeprefix("Bearer ") for v in auth), *more_secrets])


class MetricNames(_Strict):
    """vLLM metric names; a tuple means "the first that a pod exports" (vLLM renamed some)."""

    waiting: str = "vllm:num_requests_waiting"
    running: str = "vllm:num_requests_running"
    kv_cache_usage: tuple[str, ...] = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    request_success: str = "vllm:request_success_total"
    prompt_tokens: str = "vllm:request_prompt_tokens"
    generation_tokens: str = "vllm:request_generation_tokens"
    ttft: str = "vllm:time_to_first_token_seconds"
    itl: tuple[str, ...] = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
    cache_config_info: str = "vllm:cache_config_info"


class CollectorSettings(_Strict):
    prometheus: PrometheusSettings
    rate_window_s: float = Field(default=60.0, ge=2, description="Window of rate()/increase(); >= 2 scrapes.")
    staleness_threshold_s: float = Field(default=60.0, gt=0, description="Older newest sample -> stale.")
    staleness_lookback_s: float = Field(default=600.0, gt=0, description="How far back to look for a last sample.")
    staleness_resolution_s: float = Field(default=5.0, gt=0, description="Step of the last-sample subquery.")
    quantiles: tuple[float, ...] = Field(default=(0.5, 0.9, 0.99), description="TTFT/ITL quantiles to report.")
    namespace_label: str = "namespace"
    pod_label: str = "pod"
    model_label: str = "model_name"
    variant_label: str | None = Field(
        default=None, description="Label identifying a variant's series, if the scrape config attaches one.")
    series_matchers: str = Field(default="", description='Extra label matchers for every series, e.g. job="vllm".')
    namespaces: tuple[str, ...] = Field(default=(), description="Only these namespaces (empty: all).")
    mix_min_share: float = Field(default=0.01, ge=0, lt=1, description="Length-mix cells below this are dropped.")
    mix_max_buckets: int = Field(default=16, gt=0)
    max_parallel_queries: int = Field(default=4, gt=0, le=32)
    metrics: MetricNames = Field(default_factory=MetricNames)

    @model_validator(mode="after")
    def _check(self) -> CollectorSettings:
        for q in self.quantiles:
            if not 0 < q < 1:
                raise ValueError(f"quantiles must lie in (0, 1), got {q}")
        if self.staleness_lookback_s < self.staleness_threshold_s:
            raise ValueError("staleness_lookback_s must be at least staleness_threshold_s")
        return self


DEPLOYMENT_POD_SUFFIX = r"-[a-z0-9]{1,10}-[a-z0-9]{5}"


@functools.lru_cache(maxsize=4096)
def _compiled(regex: str) -> re.Pattern:
    return re.compile(regex)


class VariantSelector(_Strict):
    """Which series belong to one variant: its namespace, served model name and pods."""

    name: str = Field(min_length=1, description="Key of the variant in results, e.g. '<namespace>/<name>'.")
    namespace: str = Field(min_length=1)
    model: str = Field(min_length=1, description="Served model name, as in the `model_name` label.")
    deployment: str | None = Field(default=None, description="Pods named <deployment>-<hash>-<suffix>.")
    pod_regex: str | None = Field(default=None, description="Full-match regex on the pod label.")
    label_value: str | None = Field(default=None, description="Value of CollectorSettings.variant_label.")

    @model_validator(mode="after")
    def _one_way(self) -> VariantSelector:
        given = [k for k in ("deployment", "pod_regex", "label_value") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of deployment, pod_regex, label_value (got {given or 'none'})")
        if self.pod_regex is not None:
            try:
                re.compile(self.pod_regex)
            except re.error as exc:
                raise ValueError(f"pod_regex {self.pod_regex!r} is not a valid regex: {exc}") from None
        return self

    @property
    def pod_pattern(self) -> re.Pattern | None:
        if self.deployment is not None:
            return _compiled(re.escape(self.deployment) + DEPLOYMENT_POD_SUFFIX)
        return _compiled(self.pod_regex) if self.pod_regex is not None else None

    def describe(self) -> str:
        how = (f"pods of Deployment {self.deployment!r}" if self.deployment else
               f"pods matching {self.pod_regex!r}" if self.pod_regex else f"series labelled {self.label_value!r}")
        return f"{how} in namespace {self.namespace!r} serving {self.model!r}"


class LatencyObservation(_Strict):
    mean_s: float | None = Field(description="Mean over the window; None without observations.")
    quantiles_s: dict[str, float | None] = Field(description="'p50' -> seconds (histogram_quantile).")
    observations_per_s: float = Field(ge=0)


class TrafficObservation(_Strict):
    """What a group of pods saw over the rate window (and, for gauges, at the evaluation time)."""

    arrival_rate_rps: float | None = Field(description="Completions plus backlog growth, requests/s.")
    completion_rate_rps: float | None
    mean_input_tokens: float | None
    mean_output_tokens: float | None
    waiting: float = Field(description="Requests queued (sum over pods).")
    running: float = Field(description="Requests in the running batch (sum over pods).")
    kv_cache_usage_mean: float | None = Field(description="Fraction of KV cache in use, mean over pods.")
    kv_cache_usage_max: float | None
    ttft: LatencyObservation
    itl: LatencyObservation
    input_tokens: list[TokenShare] = Field(description="Estimated prompt-length distribution (log2 grid).")
    output_tokens: list[TokenShare]
    length_mix: list[LengthBucket] = Field(description="Input x output buckets, ready for a Workload.")


class VariantObservation(TrafficObservation):
    name: str
    namespace: str
    model: str
    status: Literal["ok", "stale", "missing", "invalid"]
    reason: str
    pods: list[str] = Field(description="Pods with series in the staleness lookback.")
    stale_pods: list[str] = Field(description="Pods whose newest sample is older than the threshold.")
    newest_sample_age_s: float | None
    kv_capacity_tokens: float | None = Field(description="Smallest per-pod KV capacity from cache_config_info.")

    @property
    def available(self) -> bool:
        return self.status == "ok"


class ModelObservation(TrafficObservation):
    model: str
    variants: list[str] = Field(description="Variants whose data is included (status ok).")
    excluded_variants: dict[str, str] = Field(description="Variant -> why it is not included.")

    def to_workload(self, *, priority: float = 1.0, fallback_mix: list[LengthBucket] | None = None) -> Workload | None:
        """The model's demand for the optimizer; None when neither the window nor `fallback_mix` gives a mix."""
        if self.arrival_rate_rps is None:
            return None
        buckets = self.length_mix or fallback_mix
        if not buckets:
            return None
        return Workload(model=self.model, arrival_rate_rps=self.arrival_rate_rps, buckets=buckets, priority=priority)


class CollectionResult(_Strict):
    available: bool = Field(description="False when Prometheus could not be queried or answered garbage.")
    reason: str
    evaluated_at: float | None = Field(description="Evaluation time (unix seconds) when given, else None (now).")
    window_s: float
    queries: int = Field(description="PromQL queries sent in this collection.")
    duration_s: float
    variants: dict[str, VariantObservation] = Field(default_factory=dict)
    models: dict[str, ModelObservation] = Field(default_factory=dict)
    unmatched_pods: list[str] = Field(default_factory=list, description="namespace/pod with vLLM series, no variant.")


def _vector(raw) -> list[tuple[dict[str, str], float]]:
    """Checked (labels, value) pairs of an instant vector. Hand-written rather than a pydantic
    model: a cycle over 1,000 variants decodes ~250,000 bucket samples, and validating them as
    models costs seconds where this single pass costs a fraction of one."""
    if not isinstance(raw, list):
        raise _Shape("result", f"expected a list of samples, got {type(raw).__name__}")
    out = []
    for i, sample in enumerate(raw):
        try:
            labels, value = sample["metric"], sample["value"]
            if not isinstance(labels, dict) or not isinstance(value, list) or len(value) != 2:
                raise TypeError
            out.append((labels, float(value[1])))
        except (KeyError, TypeError, ValueError, IndexError):
            raise _Shape(f"result[{i}]", "expected {metric: {...}, value: [time, \"number\"]}, got "
                                         f"{json.dumps(sample)[:120]}") from None
    return out


def _matrix(raw) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
    if not isinstance(raw, list):
        raise _Shape("result", f"expected a list of series, got {type(raw).__name__}")
    out = []
    for i, series in enumerate(raw):
        try:
            labels, values = series["metric"], series["values"]
            if not isinstance(labels, dict):
                raise TypeError
            out.append((labels, [(float(t), float(v)) for t, v in values]))
        except (KeyError, TypeError, ValueError):
            raise _Shape(f"result[{i}]", "expected {metric: {...}, values: [[time, \"number\"], ...]}, got "
                                         f"{json.dumps(series)[:120]}") from None
    return out


class _Shape(Exception):
    def __init__(self, where: str, what: str):
        super().__init__(f"{where}: {what}")


class QueryFailure(Exception):
    """A query could not be answered; the message is the reason shown to a human."""


class PrometheusQueries:
    """Runs named PromQL queries in parallel through prometheus-api-client and validates answers."""

    def __init__(self, settings: PrometheusSettings, max_parallel: int = 4):
        self.settings = settings
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="promql")
        self.sent = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _headers(self) -> dict[str, str]:
        headers = dict(self.settings.headers)
        token = None
        if self.settings.bearer_token is not None:
            token = self.settings.bearer_token.get_secret_value()
        elif self.settings.bearer_token_file is not None:
            try:
                token = self.settings.bearer_token_file.read_text().strip()
            except OSError as exc:
                raise QueryFailure(f"cannot read bearer token file {self.settings.bearer_token_file}: "
                                   f"{exc.strerror or exc}") from None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _client(self, headers: dict[str, str]) -> PrometheusConnect:
        client = getattr(self._local, "client", None)
        if client is None or client.headers != headers:
            s = self.settings
            session = requests.Session()
            session.verify = str(s.ca_file) if (s.ca_file and s.verify_tls) else s.verify_tls
            retry = Retry(total=s.retries, connect=s.retries, read=0, backoff_factor=0.2,
                          status_forcelist=(502, 503, 504) if s.retries else (), raise_on_status=False)
            client = PrometheusConnect(url=s.url.rstrip("/"), headers=headers, disable_ssl=not s.verify_tls,
                                       retry=retry, session=session, timeout=s.timeout_s)
            self._local.client = client
        return client

    def _describe(self, exc: Exception, name: str) -> str:
        url = self.settings.display_url
        chain = _causes(exc)
        if any(isinstance(e, ConnectionRefusedError) for e in chain):
            return f"Prometheus unreachable at {url}: connection refused"
        # urllib3's NewConnectionError subclasses its TimeoutError, so it is excluded explicitly
        if any(isinstance(e, (requests.exceptions.Timeout, TimeoutError, urllib3.exceptions.TimeoutError))
               and not isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain):
            return f"Prometheus at {url} did not answer query {name!r} within {self.settings.timeout_s:g} s"
        if any(isinstance(e, (requests.exceptions.SSLError, ssl.SSLError)) for e in chain):
            return f"TLS error talking to Prometheus at {url}: {chain[-1]}"
        if isinstance(exc, requests.exceptions.ConnectionError):
            return f"Prometheus unreachable at {url}: {chain[-1]}"
        if isinstance(exc, PrometheusApiClientException):
            return f"Prometheus at {url} rejected query {name!r}: {_api_error_text(str(exc))}"
        if isinstance(exc, (ValueError, KeyError, TypeError)):
            return f"Prometheus at {url} answered query {name!r} with something that is not a query result: " \
                   f"{type(exc).__name__}: {str(exc)[:200]}"
        return f"query {name!r} to Prometheus at {url} failed: {type(exc).__name__}: {exc}"

    def _run_one(self, name: str, promql: str, headers: dict[str, str], at: float | None,
                 span: tuple[float, float, float] | None):
        with self._lock:
            self.sent += 1
        client = self._client(headers)
        try:
            if span is None:
                params = {"time": f"{at:.3f}"} if at is not None else None
                raw = client.custom_query(promql, params=params)
                return _vector(raw)
            start, end, step = span
            raw = client.custom_query_range(
                promql, start_time=datetime.fromtimestamp(start, UTC),
                end_time=datetime.fromtimestamp(end, UTC), step=f"{step:g}s")
            return _matrix(raw)
        except _Shape as exc:
            raise QueryFailure(self._redact(f"Prometheus at {self.settings.display_url} answered query {name!r} "
                                            f"with an unexpected shape ({exc})", headers)) from None
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason, never an exception
            raise QueryFailure(self._redact(self._describe(exc, name), headers)) from None

    def _redact(self, text: str, headers: dict[str, str]) -> str:
        """Reasons end up in logs, Events and status: no password, token (a token file's too) or auth header."""
        auth = headers.get("Authorization", "")
        return self.settings.redact(text, auth, auth.removeprefix("Bearer "))

    def run(self, queries: dict[str, str], *, at: float | None = None,
            span: tuple[float, float, float] | None = None) -> dict[str, list]:
        """All queries in parallel; the first failure (in query order) raises QueryFailure."""
        headers = self._headers()
        futures = {n: self._pool.submit(self._run_one, n, q, headers, at, span) for n, q in queries.items()}
        out, failure = {}, None
        for n, f in futures.items():
            try:
                out[n] = f.result()
            except QueryFailure as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return out


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps (requests -> urllib3 MaxRetryError.reason -> socket error), outermost first."""
    chain: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(chain) < 20:
        e = todo.pop(0)
        if e in chain:
            continue
        chain.append(e)
        todo += [x for x in (getattr(e, "reason", None), e.__cause__, e.__context__, *e.args)
                 if isinstance(x, BaseException)]
    return chain


def _api_error_text(message: str) -> str:
    """prometheus-api-client puts the body's repr in its message; show Prometheus's own error text."""
    m = re.match(r"HTTP Status Code (\d+) \((b'.*'|b\".*\")\)$", message, re.S)
    if not m:
        return message[:300]
    status = m.group(1)
    try:
        body = json.loads(ast.literal_eval(m.group(2)))
        return f"HTTP {status}: {body.get('errorType', 'error')}: {body.get('error', '')}"[:300]
    except (ValueError, SyntaxError, AttributeError):
        return f"HTTP {status}: {ast.literal_eval(m.group(2))[:200]!r}"


@dataclass
class _PodData:
    """Everything one pod (x model x variant label) reported, before aggregation."""

    completed: float | None = None
    backlog_delta: float = 0.0
    prompt_sum: float = 0.0
    prompt_count: float = 0.0
    gen_sum: float = 0.0
    gen_count: float = 0.0
    waiting: float = 0.0
    running: float = 0.0
    kv: float | None = None
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    itl_sum: float = 0.0
    itl_count: float = 0.0
    age_s: float | None = None
    kv_capacity_tokens: float | None = None
    invalid: list[str] = field(default_factory=list)  # impossible values seen, 'query = value'


@dataclass
class _Buckets:
    """Histogram bucket values of one bucket group (a pod, a Deployment or a variant label): le -> value."""

    prompt_buckets: dict[float, float] = field(default_factory=dict)
    gen_buckets: dict[float, float] = field(default_factory=dict)
    ttft_buckets: dict[float, float] = field(default_factory=dict)
    itl_buckets: dict[float, float] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)


BucketGrouping = Literal["pod", "deployment", "label"]
DEPLOYMENT_LABEL = "va_deployment"
SIGNED_QUERIES = frozenset({"backlog_delta"})  # the only query whose value may be negative: a shrinking backlog


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


class Collector:
    """`Collector(settings).collect(selectors)` -> CollectionResult. Thread-safe for one caller at a time."""

    def __init__(self, settings: CollectorSettings):
        self.settings = settings
        self.queries = PrometheusQueries(settings.prometheus, settings.max_parallel_queries)

    def close(self) -> None:
        self.queries.close()

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- PromQL -------------------------------------------------------------------------------

    def series_selector(self, extra: str = "") -> str:
        s = self.settings
        matchers = [m for m in (s.series_matchers.strip(), extra) if m]
        if s.namespaces:
            # a PromQL string literal needs its regex backslashes doubled ("t\\-1", not "t\-1")
            matchers.append(f'{s.namespace_label}=~"{"|".join(re.escape(n).replace(chr(92), chr(92) * 2) for n in s.namespaces)}"')
        return "{" + ",".join(matchers) + "}" if matchers else ""

    def group_labels(self) -> str:
        s = self.settings
        labels = [s.namespace_label, s.pod_label, s.model_label] + ([s.variant_label] if s.variant_label else [])
        return ", ".join(labels)

    @staticmethod
    def first_of(names: tuple[str, ...], expr) -> str:
        """`expr(a) or expr(b)`: per series, the first of several names vLLM has used for one metric."""
        return " or ".join(expr(n) for n in names)

    def bucket_grouping(self, selectors: list[VariantSelector]) -> BucketGrouping:
        """How finely histogram buckets are fetched: bucket queries carry ~70 series per pod, most of a
        collection's bytes, so they are summed per Deployment (or variant label) inside Prometheus
        whenever every selector names one, and fetched per pod only when a pod regex needs them."""
        if selectors and all(sel.label_value is not None for sel in selectors):
            return "label"
        if selectors and all(sel.deployment is not None for sel in selectors):
            return "deployment"
        return "pod"

    def _bucket_query(self, grouping: BucketGrouping, expr: str) -> str:
        s = self.settings
        if grouping == "pod":
            return f"sum by ({self.group_labels()}, le) ({expr})"
        if grouping == "label":
            return f"sum by ({s.namespace_label}, {s.model_label}, {s.variant_label}, le) ({expr})"
        named = (f'label_replace({expr}, "{DEPLOYMENT_LABEL}", "$1", "{s.pod_label}", '
                 f'"(.+){DEPLOYMENT_POD_SUFFIX}")')
        return f"sum by ({s.namespace_label}, {s.model_label}, {DEPLOYMENT_LABEL}, le) ({named})"

    def _bucket_key(self, grouping: BucketGrouping, labels: dict[str, str]) -> tuple:
        s = self.settings
        if grouping == "pod":
            return self.series_key(labels)
        which = s.variant_label if grouping == "label" else DEPLOYMENT_LABEL
        return (grouping, labels.get(s.namespace_label, ""), labels.get(s.model_label, ""), labels.get(which, ""))

    def instant_queries(self, bucket_grouping: BucketGrouping = "pod") -> dict[str, str]:
        """The PromQL of one collection, by name; the same set whatever the number of variants."""
        s, m = self.settings, self.settings.metrics
        g, sel, w = self.group_labels(), self.series_selector(), f"{s.rate_window_s:g}s"

        def buckets(expr: str) -> str:
            return self._bucket_query(bucket_grouping, expr)

        info_group = ", ".join([s.namespace_label, s.pod_label] + ([s.variant_label] if s.variant_label else []))
        return {
            "completed": f"sum by ({g}) (rate({m.request_success}{sel}[{w}]))",
            "backlog_delta": f"sum by ({g}) (delta({m.waiting}{sel}[{w}]) + delta({m.running}{sel}[{w}]))",
            "prompt_sum": f"sum by ({g}) (rate({m.prompt_tokens}_sum{sel}[{w}]))",
            "prompt_count": f"sum by ({g}) (rate({m.prompt_tokens}_count{sel}[{w}]))",
            "gen_sum": f"sum by ({g}) (rate({m.generation_tokens}_sum{sel}[{w}]))",
            "gen_count": f"sum by ({g}) (rate({m.generation_tokens}_count{sel}[{w}]))",
            "prompt_buckets": buckets(f"increase({m.prompt_tokens}_bucket{sel}[{w}])"),
            "gen_buckets": buckets(f"increase({m.generation_tokens}_bucket{sel}[{w}])"),
            "waiting": f"sum by ({g}) ({m.waiting}{sel})",
            "running": f"sum by ({g}) ({m.running}{sel})",
            "kv": f"max by ({g}) ({self.first_of(m.kv_cache_usage, lambda n: f'{n}{sel}')})",
            "ttft_buckets": buckets(f"rate({m.ttft}_bucket{sel}[{w}])"),
            "ttft_sum": f"sum by ({g}) (rate({m.ttft}_sum{sel}[{w}]))",
            "ttft_count": f"sum by ({g}) (rate({m.ttft}_count{sel}[{w}]))",
            "itl_buckets": buckets(self.first_of(m.itl, lambda n: f"rate({n}_bucket{sel}[{w}])")),
            "itl_sum": f"sum by ({g}) ({self.first_of(m.itl, lambda n: f'rate({n}_sum{sel}[{w}])')})",
            "itl_count": f"sum by ({g}) ({self.first_of(m.itl, lambda n: f'rate({n}_count{sel}[{w}])')})",
            "age": f"time() - max by ({g}) (max_over_time(timestamp({m.running}{sel})"
                   f"[{s.staleness_lookback_s:g}s:{s.staleness_resolution_s:g}s]))",
            "kv_capacity": f"max by ({info_group}, block_size, num_gpu_blocks) ({m.cache_config_info}{sel})",
        }

    # -- collection -----------------------------------------------------------------------------

    def collect(self, selectors: list[VariantSelector], *, at: float | None = None) -> CollectionResult:
        """Observations for every selector and every model they serve, from one query per metric."""
        started = time.monotonic()
        sent_before = self.queries.sent
        s = self.settings

        def result(**kw) -> CollectionResult:
            return CollectionResult(evaluated_at=at, window_s=s.rate_window_s, queries=self.queries.sent - sent_before,
                                    duration_s=time.monotonic() - started, **kw)

        if s.variant_label is None and any(sel.label_value is not None for sel in selectors):
            names = [sel.name for sel in selectors if sel.label_value is not None]
            return result(available=False, reason=f"variants {names} select by label_value but "
                                                   "CollectorSettings.variant_label is not set")
        names = [sel.name for sel in selectors]
        if len(set(names)) != len(names):
            return result(available=False, reason=f"duplicate variant names in selectors: {sorted(names)}")
        grouping = self.bucket_grouping(selectors)
        try:
            raw = self.queries.run(self.instant_queries(grouping), at=at)
        except QueryFailure as exc:
            return result(available=False, reason=str(exc))
        pods, buckets = self._pods(raw, grouping)
        by_namespace_model: dict[tuple[str, str], list[tuple]] = {}
        for k in pods:
            by_namespace_model.setdefault((k[0], k[2]), []).append(k)
        variants, keys_of, claimed = {}, {}, set()
        for sel in selectors:
            keys_of[sel.name] = [k for k in by_namespace_model.get((sel.namespace, sel.model), ()) if self.matches(sel, k)]
            claimed.update(keys_of[sel.name])
            variants[sel.name] = self._variant(sel, keys_of[sel.name], pods,
                                               self._buckets_of(sel, grouping, keys_of[sel.name], buckets))
        models = self._models(selectors, variants, keys_of, pods, grouping, buckets)
        unmatched = sorted({f"{k[0]}/{k[1]}" for k in pods if k not in claimed})
        return result(available=True, reason="collected", variants=variants, models=models, unmatched_pods=unmatched)

    def series_key(self, labels: dict[str, str]) -> tuple[str, str, str, str]:
        s = self.settings
        return (labels.get(s.namespace_label, ""), labels.get(s.pod_label, ""), labels.get(s.model_label, ""),
                labels.get(s.variant_label, "") if s.variant_label else "")

    def _pods(self, raw: dict[str, list], grouping: BucketGrouping) -> tuple[dict[tuple, _PodData],
                                                                              dict[tuple, _Buckets]]:
        pods: dict[tuple, _PodData] = {}
        buckets: dict[tuple, _Buckets] = {}
        scalar = {"completed", "backlog_delta", "prompt_sum", "prompt_count", "gen_sum", "gen_count", "waiting",
                  "running", "kv", "ttft_sum", "ttft_count", "itl_sum", "itl_count"}
        bounds: dict[str, float] = {}
        for name, samples in raw.items():
            if name in ("age", "kv_capacity"):
                continue
            is_bucket = name.endswith("_buckets")
            for labels, value in samples:
                if value != value or value in (math.inf, -math.inf) or (value < 0 and name not in SIGNED_QUERIES):
                    # counters' rates, gauges of counts and fractions are never negative, and none of these
                    # queries divides, so none is ever NaN or infinite: the data is wrong (a broken exporter
                    # or recording rule), not zero demand. Skipping such samples instead made a variant whose
                    # every value was NaN look like one without series (MetricsMissing, "no vLLM series").
                    where = self._bucket_key(grouping, labels) if is_bucket else self.series_key(labels)
                    target = buckets if is_bucket else pods
                    data = target.get(where)
                    if data is None:
                        data = target[where] = _Buckets() if is_bucket else _PodData()
                    data.invalid.append(f"{name} = {value:g}")
                    continue
                if is_bucket:
                    text = labels.get("le", "")
                    le = bounds.get(text)
                    if le is None:
                        try:
                            le = bounds.setdefault(text, float(text))
                        except ValueError:
                            continue
                    key = self._bucket_key(grouping, labels)
                    group = buckets.get(key)
                    if group is None:
                        group = buckets[key] = _Buckets()
                    getattr(group, name)[le] = value
                elif name in scalar:
                    key = self.series_key(labels)
                    pod = pods.get(key)
                    if pod is None:
                        pod = pods[key] = _PodData()
                    setattr(pod, name, value)
        for labels, value in raw["age"]:
            if _finite(value):
                pods.setdefault(self.series_key(labels), _PodData()).age_s = value
        capacity: dict[tuple[str, str, str], float] = {}
        for labels, _value in raw["kv_capacity"]:
            try:
                tokens = float(labels["block_size"]) * float(labels["num_gpu_blocks"])
            except (KeyError, ValueError):
                continue
            k = self.series_key(labels)
            capacity[(k[0], k[1], k[3])] = tokens
        for k, d in pods.items():
            d.kv_capacity_tokens = capacity.get((k[0], k[1], k[3]))
        return pods, buckets

    def _buckets_of(self, sel: VariantSelector, grouping: BucketGrouping, keys: list[tuple],
                    buckets: dict[tuple, _Buckets]) -> list[_Buckets]:
        if grouping == "pod":
            return [buckets[k] for k in keys if k in buckets]
        which = sel.label_value if grouping == "label" else sel.deployment
        group = buckets.get((grouping, sel.namespace, sel.model, which))
        return [group] if group is not None else []

    def matches(self, sel: VariantSelector, key: tuple[str, str, str, str]) -> bool:
        namespace, pod, model, label = key
        if namespace != sel.namespace or model != sel.model:
            return False
        if sel.label_value is not None:
            return label == sel.label_value
        return sel.pod_pattern.fullmatch(pod) is not None

    def _variant(self, sel: VariantSelector, keys: list[tuple], pods: dict[tuple, _PodData],
                 bucket_sets: list[_Buckets]) -> VariantObservation:
        s = self.settings
        data = [pods[k] for k in keys]
        ages = {k[1]: pods[k].age_s for k in keys if pods[k].age_s is not None}
        newest = min(ages.values()) if ages else None
        stale_pods = sorted(p for p, a in ages.items() if a > s.staleness_threshold_s)
        traffic = self._traffic(data, bucket_sets)
        invalid = [f"{x} (pod {k[1]})" for k in keys for x in pods[k].invalid]
        invalid += [x for b in bucket_sets for x in b.invalid]
        if not keys:
            status, reason = "missing", (f"no vLLM series for {sel.describe()} in the last "
                                         f"{s.staleness_lookback_s:g} s")
        elif invalid:
            status, reason = "invalid", (f"Prometheus answered impossible (negative or non-finite) values for "
                                         f"{sel.describe()}: "
                                         f"{'; '.join(invalid[:5])}" + (f" and {len(invalid) - 5} more"
                                                                        if len(invalid) > 5 else ""))
        elif newest is not None and newest > s.staleness_threshold_s:
            status, reason = "stale", (f"newest sample is {newest:.1f} s old (threshold "
                                       f"{s.staleness_threshold_s:g} s) for {sel.describe()}")
        elif traffic["completion_rate_rps"] is None:
            status, reason = "missing", (f"fewer than 2 samples in the {s.rate_window_s:g} s rate window for "
                                         f"{sel.describe()} (just started?)")
        else:
            status = "ok"
            reason = "metrics fresh" + (f"; pods with stale series (gone?): {stale_pods}" if stale_pods else "")
        capacities = [d.kv_capacity_tokens for d in data if d.kv_capacity_tokens is not None]
        return VariantObservation(
            name=sel.name, namespace=sel.namespace, model=sel.model, status=status, reason=reason,
            pods=sorted({k[1] for k in keys}), stale_pods=stale_pods, newest_sample_age_s=newest,
            kv_capacity_tokens=min(capacities) if capacities else None, **traffic,
        )

    def _models(self, selectors: list[VariantSelector], variants: dict[str, VariantObservation],
                keys_of: dict[str, list[tuple]], pods: dict[tuple, _PodData], grouping: BucketGrouping,
                buckets: dict[tuple, _Buckets]) -> dict[str, ModelObservation]:
        per_model: dict[str, list[VariantSelector]] = {}
        for sel in selectors:
            per_model.setdefault(sel.model, []).append(sel)
        out = {}
        for model in sorted(per_model):
            ok_sels = [sel for sel in per_model[model] if variants[sel.name].status == "ok"]
            ok = [sel.name for sel in ok_sels]
            keys = {k for name in ok for k in keys_of[name]}
            groups = {id(b): b for sel in ok_sels for b in self._buckets_of(sel, grouping, keys_of[sel.name], buckets)}
            excluded = {sel.name: variants[sel.name].reason for sel in per_model[model] if sel.name not in ok}
            out[model] = ModelObservation(model=model, variants=ok, excluded_variants=excluded,
                                          **self._traffic([pods[k] for k in sorted(keys)], list(groups.values())))
        return out

    def _traffic(self, data: list[_PodData], bucket_sets: list[_Buckets]) -> dict:
        s = self.settings
        completed = [d.completed for d in data if d.completed is not None]
        completion = sum(completed) if completed else None
        arrival = None
        if completion is not None:
            arrival = max(0.0, completion + sum(d.backlog_delta for d in data) / s.rate_window_s)
        p_sum, p_cnt = sum(d.prompt_sum for d in data), sum(d.prompt_count for d in data)
        g_sum, g_cnt = sum(d.gen_sum for d in data), sum(d.gen_count for d in data)
        mean_in = p_sum / p_cnt if p_cnt > 0 else None
        mean_out = g_sum / g_cnt if g_cnt > 0 else None
        inputs = token_distribution(_summed(b.prompt_buckets for b in bucket_sets), mean_in)
        outputs = token_distribution(_summed(b.gen_buckets for b in bucket_sets), mean_out)
        kvs = [d.kv for d in data if d.kv is not None]
        return {
            "arrival_rate_rps": arrival, "completion_rate_rps": completion,
            "mean_input_tokens": mean_in, "mean_output_tokens": mean_out,
            "waiting": sum(d.waiting for d in data), "running": sum(d.running for d in data),
            "kv_cache_usage_mean": sum(kvs) / len(kvs) if kvs else None,
            "kv_cache_usage_max": max(kvs) if kvs else None,
            "ttft": self._latency([b.ttft_buckets for b in bucket_sets], sum(d.ttft_sum for d in data),
                                  sum(d.ttft_count for d in data)),
            "itl": self._latency([b.itl_buckets for b in bucket_sets], sum(d.itl_sum for d in data),
                                 sum(d.itl_count for d in data)),
            "input_tokens": inputs, "output_tokens": outputs,
            "length_mix": joint_length_mix(inputs, outputs, min_share=s.mix_min_share,
                                           max_buckets=s.mix_max_buckets),
        }

    def _latency(self, bucket_sets: list[dict[float, float]], total: float, count: float) -> LatencyObservation:
        qs = self.settings.quantiles
        values = histogram_quantiles(list(qs), _summed(bucket_sets))
        quantiles = {f"p{q * 100:g}": (v if _finite(v) else None) for q, v in zip(qs, values, strict=True)}
        return LatencyObservation(mean_s=total / count if count > 0 else None, quantiles_s=quantiles,
                                  observations_per_s=max(0.0, count))


def _summed(bucket_sets) -> list[tuple[float, float]]:
    total: dict[float, float] = {}
    for buckets in bucket_sets:
        for le, v in buckets.items():
            total[le] = total.get(le, 0.0) + v
    return sorted(total.items())
