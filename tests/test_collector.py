"""The collector against the real Prometheus scraping emulated vLLM pods on 127.0.0.1, plus fake
Prometheus endpoints that are down, slow or answer garbage.

One Prometheus and one set of pods serve the whole module (the first sample becomes queryable
~6 s after start, and rates need a full window after that). Tests that need data wait for
`warm`; the failure-mode tests come first and need none.
"""

from __future__ import annotations

import math
import random
import time

import pytest
from conftest_metrics import (
    PodPlan,
    fake_prometheus_factory,
    metrics_stack,
    self_signed_certificate,
    wait_until,
)
from pydantic import ValidationError
from variant_autoscaler.collector import (
    Collector,
    CollectorSettings,
    PrometheusSettings,
    VariantSelector,
)
from variant_autoscaler.histogram_estimates import histogram_quantile, joint_length_mix, token_distribution
from variant_autoscaler.online_profile import OnlineProfileFitter
from variant_autoscaler_testbed.model_server import ModelServerConfig
from variant_autoscaler_testbed.prometheus import ScrapeTarget, free_port
from variant_autoscaler_testbed.vllm_metrics import one_two_five_buckets

from optimizer.profile import ParametricProfile

PROFILE = ParametricProfile(decode_base_s=0.015, decode_per_seq_s=0.001, decode_per_kv_token_s=2e-7,
                            prefill_base_s=0.008, prefill_per_token_s=2e-5)
WINDOW_S = 12.0
STALE_AFTER_S = 4.0
CHAT_MIX = [{"prompt_tokens": 150, "max_tokens": 30}, {"prompt_tokens": 700, "max_tokens": 80}]
CHAT_RATE = 6.0
FIT_LOADS = {"qwen-fit-8b7c6d5e4-fffff": (1.0, 2000), "qwen-fit-8b7c6d5e4-ggggg": (2.5, 500),
             "qwen-fit-8b7c6d5e4-hhhhh": (5.0, 100)}
FIT_OUTPUT = 128


def _server(model: str, **kw) -> ModelServerConfig:
    return ModelServerConfig(**({"model": model, "profile": PROFILE, "max_batch": 64} | kw))


def _uniform(rate: float, mix: list[dict]) -> dict:
    return {"phases": [{"duration_s": 300, "rate_rps": rate}], "mix": mix, "arrivals": "uniform",
            "mix_order": "cycle", "drain_timeout_s": 5}


PLANS = [
    *[PodPlan(pod, "prod", _server("llama", iteration_metrics=False), _uniform(CHAT_RATE, CHAT_MIX),
              {"variant": "llama-a100"}) for pod in ("llama-a100-7d4b9c6f5-aaaaa", "llama-a100-7d4b9c6f5-bbbbb")],
    PodPlan("llama-l4-5f6d7c8b9-ccccc", "prod", _server("llama", iteration_metrics=False), _uniform(3.0, CHAT_MIX),
            {"variant": "llama-l4"}),
    PodPlan("mistral-h100-6c5d4b3a2-ddddd", "batch",
            _server("mistral", max_batch=4, kv_cache_tokens=4096, max_model_len=4096),
            _uniform(8.0, [{"prompt_tokens": 500, "max_tokens": 100}]), {"variant": "mistral-h100"}),
    *[PodPlan(pod, "prod", _server("qwen"),
              {"phases": [{"duration_s": 300, "rate_rps": rate}], "arrivals": "poisson", "seed": i,
               "mix": [{"prompt_tokens": prompt, "max_tokens": FIT_OUTPUT}], "drain_timeout_s": 5},
              {"variant": "qwen-fit"}) for i, (pod, (rate, prompt)) in enumerate(FIT_LOADS.items())],
    PodPlan("phi-t4-9a8b7c6d5-iiiii", "edge", _server("phi"), _uniform(2.0, [{"prompt_tokens": 50, "max_tokens": 10}]),
            {"variant": "phi-t4"}),
    # Lengths drawn at random (seeded) from a spread inside two prompt buckets: each window holds a
    # different mix, so the estimated cell means move from window to window.
    PodPlan("gemma-a10-4e5f6a7b8-jjjjj", "prod", _server("gemma"),
            {"phases": [{"duration_s": 300, "rate_rps": 8.0}], "arrivals": "poisson", "seed": 11, "drain_timeout_s": 5,
             "mix": [{"prompt_tokens": p, "max_tokens": m} for p in (230, 310, 420, 560, 870) for m in (24, 45)]},
            {"variant": "gemma-a10"}),
]
GEMMA = VariantSelector(name="prod/gemma-a10", namespace="prod", model="gemma", deployment="gemma-a10")

SELECTORS = [
    VariantSelector(name="prod/llama-a100", namespace="prod", model="llama", deployment="llama-a100"),
    VariantSelector(name="prod/llama-l4", namespace="prod", model="llama", deployment="llama-l4"),
    VariantSelector(name="batch/mistral-h100", namespace="batch", model="mistral", pod_regex=r"mistral-h100-.*"),
    VariantSelector(name="prod/qwen-fit", namespace="prod", model="qwen", deployment="qwen-fit"),
    VariantSelector(name="edge/phi-t4", namespace="edge", model="phi", deployment="phi-t4"),
]


def settings(url: str, **kw) -> CollectorSettings:
    prom = {"url": url, "timeout_s": 5.0} | kw.pop("prometheus", {})
    return CollectorSettings(prometheus=PrometheusSettings(**prom), rate_window_s=WINDOW_S,
                             staleness_threshold_s=STALE_AFTER_S, staleness_lookback_s=60,
                             staleness_resolution_s=1, **kw)


fake_prometheus = pytest.fixture(fake_prometheus_factory)


@pytest.fixture(scope="module")
def stack():
    with metrics_stack(PLANS) as s:
        yield s


@pytest.fixture(scope="module")
def collector(stack):
    with Collector(settings(stack.prometheus.url)) as c:
        yield c


@pytest.fixture(scope="module")
def warm(stack, collector):
    """Waits until every variant reports fresh data over a full rate window of steady load."""

    def ready():
        r = collector.collect(SELECTORS)
        fresh = r.available and all(v.status == "ok" for v in r.variants.values())
        return r if fresh and stack.age_s() > 8 + WINDOW_S else None

    return wait_until(ready, timeout_s=60, what="all variants fresh with a full rate window")


# -- pure estimates ------------------------------------------------------------------------------


def test_histogram_quantile_follows_prometheus_interpolation():
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (math.inf, 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.1, buckets) == pytest.approx(0.1 * 4 / 10)
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 5.0)]) == 0.1, "+Inf bucket -> highest finite bound"
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    assert math.isnan(histogram_quantile(0.5, [(0.1, 1.0), (1.0, 2.0)])), "no +Inf bucket"


def _histogram(values: list[float], bounds: tuple[float, ...]) -> list[tuple[float, float]]:
    return [(b, float(sum(v <= b for v in values))) for b in bounds] + [(math.inf, float(len(values)))]


def test_token_distribution_keeps_the_mean_and_each_request_in_its_bucket():
    rng = random.Random(7)
    values = [round(math.exp(rng.gauss(math.log(400), 0.9))) + 1 for _ in range(4000)]
    mean = sum(values) / len(values)
    bounds = one_two_five_buckets(100_000)
    dist = token_distribution(_histogram(values, bounds), mean)
    assert sum(d.share for d in dist) == pytest.approx(1.0)
    assert sum(d.tokens * d.share for d in dist) == pytest.approx(mean, rel=1e-6)
    true_le_1000 = sum(v <= 1000 for v in values) / len(values)
    assert sum(d.share for d in dist if d.tokens <= 1000) == pytest.approx(true_le_1000, abs=0.06)


def test_token_distribution_of_two_lengths_recovers_them():
    values = [150] * 500 + [700] * 500
    dist = token_distribution(_histogram(values, one_two_five_buckets(8192)), 425.0)
    assert [d.share for d in dist] == pytest.approx([0.5, 0.5])
    assert dist[0].tokens == pytest.approx(150, rel=0.15) and dist[1].tokens == pytest.approx(700, rel=0.15)


def test_mix_names_come_from_the_edges_not_the_means():
    """Ten cycles of lognormal traffic whose median drifts 380 -> 470 tokens: the cell means move
    (the old `in435xout17` names churned every cycle), the cell names stay the histogram's edges."""
    rng = random.Random(3)
    bounds = one_two_five_buckets(100_000)
    label_sets, means = [], set()
    for cycle in range(10):
        prompts = [round(math.exp(rng.gauss(math.log(380 + 10 * cycle), 0.2))) + 1 for _ in range(3000)]
        outputs = [round(math.exp(rng.gauss(math.log(30), 0.15))) + 1 for _ in range(3000)]
        inputs = token_distribution(_histogram(prompts, bounds), sum(prompts) / len(prompts))
        gens = token_distribution(_histogram(outputs, bounds), sum(outputs) / len(outputs))
        mix = joint_length_mix(inputs, gens, min_share=0.01)
        label_sets.append({b.label for b in mix})
        means |= {round(b.input_tokens) for b in mix}
        for b in mix:  # every mean lies within the edges its name gives
            lo, hi = (float(x) for x in b.label.split("x")[0][2:].split("-"))
            assert lo <= b.input_tokens <= hi, b
    assert all(s == label_sets[0] for s in label_sets), label_sets
    assert label_sets[0] == {"in200-500xout20-50", "in500-1000xout20-50"}, label_sets[0]
    assert len(means) >= 10, f"means barely moved: {sorted(means)}"


def test_joint_mix_is_the_product_of_marginals_and_sums_to_one():
    from variant_autoscaler.histogram_estimates import TokenShare

    inputs = [TokenShare(tokens=100, share=0.7), TokenShare(tokens=1000, share=0.295), TokenShare(tokens=9000,
                                                                                                  share=0.005)]
    outputs = [TokenShare(tokens=20, share=0.5), TokenShare(tokens=200, share=0.5)]
    mix = joint_length_mix(inputs, outputs, min_share=0.01)
    assert len(mix) == 4, "the 9000-token cells (0.25 % each) fall under min_share"
    assert sum(b.share for b in mix) == pytest.approx(1.0)
    cell = next(b for b in mix if b.input_tokens == 100 and b.output_tokens == 200)
    assert cell.share == pytest.approx(0.35 / 0.995)


@pytest.mark.parametrize("kw, words", [
    ({"deployment": "a", "pod_regex": "a-.*"}, "exactly one of"),
    ({}, "exactly one of"),
    ({"pod_regex": "a-(["}, "not a valid regex"),
])
def test_selector_rejects_ambiguous_or_broken_matching(kw, words):
    with pytest.raises(ValidationError, match=words):
        VariantSelector(name="x", namespace="ns", model="m", **kw)


def test_settings_reject_bad_url_and_two_tokens(tmp_path):
    with pytest.raises(ValidationError, match="http:// or https://"):
        PrometheusSettings(url="prometheus:9090")
    with pytest.raises(ValidationError, match="not both"):
        PrometheusSettings(url="http://x", bearer_token="a", bearer_token_file=tmp_path / "t")


# -- Prometheus down, slow, garbage, auth ----------------------------------------------------------


def test_prometheus_down_gives_a_reason_not_an_exception():
    url = f"http://127.0.0.1:{free_port()}"
    with Collector(settings(url)) as c:
        r = c.collect(SELECTORS)
    assert not r.available and r.variants == {}
    assert "unreachable" in r.reason and "connection refused" in r.reason and url in r.reason


def test_slow_prometheus_times_out_with_a_reason(fake_prometheus):
    slow = fake_prometheus("slow", delay_s=5.0)
    with Collector(settings(slow.url, prometheus={"timeout_s": 0.3})) as c:
        r = c.collect(SELECTORS)
    assert not r.available
    assert "did not answer" in r.reason and "within 0.3 s" in r.reason


@pytest.mark.parametrize("mode, words", [
    ("html", "not a query result"),
    ("bad-shape", "unexpected shape"),
    ("no-data", "not a query result"),
    ("http-500", "HTTP 500: internal: storage is on fire"),
])
def test_garbage_answers_give_a_reason(fake_prometheus, mode, words):
    fake = fake_prometheus(mode)
    with Collector(settings(fake.url)) as c:
        r = c.collect(SELECTORS)
    assert not r.available and words in r.reason, r.reason


def test_bearer_token_and_extra_headers_are_sent(fake_prometheus, tmp_path):
    fake = fake_prometheus("empty")
    with Collector(settings(fake.url, prometheus={"bearer_token": "s3cret", "headers": {"X-Scope-OrgID": "t1"}})) as c:
        assert c.collect(SELECTORS[:1]).available
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    with Collector(settings(fake.url, prometheus={"bearer_token_file": str(token_file)})) as c:
        r = c.collect(SELECTORS[:1])
    assert r.available and r.variants["prod/llama-a100"].status == "missing"
    auths = {h.get("Authorization") for h in fake.requests}
    assert auths == {"Bearer s3cret", "Bearer from-file"}
    assert all(h.get("X-Scope-OrgID") == "t1" for h in fake.requests if h.get("Authorization") == "Bearer s3cret")


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
def test_tls_verification_can_use_a_ca_file_or_be_disabled(fake_prometheus, tmp_path):
    cert = self_signed_certificate(tmp_path)
    if cert is None:
        pytest.skip("openssl CLI not installed: cannot make a test certificate")
    fake = fake_prometheus("empty", tls=cert)
    with Collector(settings(fake.url)) as c:
        refused = c.collect(SELECTORS[:1])
    with Collector(settings(fake.url, prometheus={"verify_tls": False})) as c:
        insecure = c.collect(SELECTORS[:1])
    with Collector(settings(fake.url, prometheus={"ca_file": str(cert[0])})) as c:
        pinned = c.collect(SELECTORS[:1])
    assert not refused.available and "TLS error" in refused.reason
    assert insecure.available and pinned.available


# -- real Prometheus ------------------------------------------------------------------------------


def test_vllm_names_with_colons_are_queryable_in_prometheus(stack):
    series = stack.prometheus.wait_for("vllm:num_requests_running", min_results=len(PLANS), timeout_s=30)
    pods = {s["metric"]["pod"] for s in series}
    assert pods == {p.pod for p in PLANS}
    assert all(s["metric"]["model_name"] in {"llama", "mistral", "qwen", "phi", "gemma"} for s in series)
    assert stack.prometheus.query("vllm_num_requests_running") == [], "names must not be mangled to underscores"


def test_prometheus_bad_query_is_reported_with_its_error(stack):
    with Collector(settings(stack.prometheus.url, series_matchers='job="vllm')) as c:
        r = c.collect(SELECTORS)
    assert not r.available and "HTTP 400: bad_data" in r.reason and "parse error" in r.reason


def test_unknown_variant_is_missing_with_a_reason(stack, warm, collector):
    ghost = VariantSelector(name="prod/ghost", namespace="prod", model="llama", deployment="ghost")
    r = collector.collect([ghost])
    v = r.variants["prod/ghost"]
    assert r.available and v.status == "missing" and not v.available
    assert "no vLLM series" in v.reason and "'ghost'" in v.reason
    assert "prod/llama-a100-7d4b9c6f5-aaaaa" in r.unmatched_pods


def test_arrival_rate_and_token_means_match_the_load(warm, collector):
    """Uniform arrivals and a cycling two-class mix make the truth exact: 6 rps per pod, mean prompt
    (150+700)/2 = 425, mean output 55. Tolerances: rate 10 % (+-1 request per pod at each window
    edge is 1.4 % of 144; scrape jitter of 1 s scrapes in a 12 s window moves rate() by a few %);
    means 8 % (a window holds ~144 completions; an odd number of each class shifts the mean by
    275/144 = 2 %, and completions of long and short requests interleave unevenly)."""
    r = collector.collect(SELECTORS)
    a100 = r.variants["prod/llama-a100"]
    assert a100.status == "ok" and a100.pods == ["llama-a100-7d4b9c6f5-aaaaa", "llama-a100-7d4b9c6f5-bbbbb"]
    assert a100.arrival_rate_rps == pytest.approx(2 * CHAT_RATE, rel=0.10)
    assert a100.mean_input_tokens == pytest.approx(425, rel=0.08)
    assert a100.mean_output_tokens == pytest.approx(55, rel=0.08)
    assert a100.waiting <= 2, "not overloaded: at most a request or two waiting for the step in progress"
    assert a100.ttft.mean_s is not None and a100.itl.quantiles_s["p90"] is not None
    model = r.models["llama"]
    assert model.variants == ["prod/llama-a100", "prod/llama-l4"]
    assert model.arrival_rate_rps == pytest.approx(a100.arrival_rate_rps + r.variants["prod/llama-l4"].arrival_rate_rps)
    workload = model.to_workload()
    assert workload.model == "llama" and workload.arrival_rate_rps == model.arrival_rate_rps
    assert sum(b.share for b in workload.buckets) == pytest.approx(1.0)


def test_length_mix_has_the_four_cells_of_the_two_classes(warm, collector):
    mix = collector.collect(SELECTORS).variants["prod/llama-a100"].length_mix
    assert len(mix) == 4
    assert {b.label for b in mix} == LLAMA_CELLS, "cells are named by vLLM's 1-2-5 edges around 150/700 and 30/80"
    for bucket in mix:
        assert bucket.share == pytest.approx(0.25, abs=0.08)
        assert min(abs(bucket.input_tokens / t - 1) for t in (150, 700)) < 0.15
        assert min(abs(bucket.output_tokens / t - 1) for t in (30, 80)) < 0.15


def test_overload_shows_queue_full_batch_and_kv_use(warm, collector):
    """8 rps into a server that completes ~2 rps (batch 4, 100 tokens at ~19 ms a step)."""
    v = collector.collect(SELECTORS).variants["batch/mistral-h100"]
    assert v.status == "ok"
    assert v.running == 4 and v.waiting > 10
    assert v.kv_cache_usage_max > 0.45, "4 x (500 prompt + generated) tokens of a 4096-token cache"
    assert v.kv_capacity_tokens == 4096
    assert v.completion_rate_rps < 3.0
    assert v.arrival_rate_rps == pytest.approx(8.0, rel=0.25), "completions + backlog growth = offered load"


def test_quantiles_equal_prometheus_histogram_quantile(stack, warm, collector):
    at = time.time() - 1
    v = collector.collect(SELECTORS, at=at).variants["prod/llama-l4"]
    for q, key in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
        for metric, ours in (("vllm:time_to_first_token_seconds", v.ttft), ("vllm:inter_token_latency_seconds", v.itl)):
            promql = (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket"
                      f'{{pod="llama-l4-5f6d7c8b9-ccccc"}}[{WINDOW_S:g}s])))')
            theirs = float(stack.prometheus.query(promql, at=at)[0]["value"][1])
            assert ours.quantiles_s[key] == pytest.approx(theirs, rel=1e-9), (metric, q)


def test_one_query_per_metric_whatever_the_number_of_variants(stack, warm, collector):
    many = SELECTORS + [VariantSelector(name=f"prod/extra-{i}", namespace="prod", model="llama",
                                        deployment=f"extra-{i}") for i in range(50)]
    before = len(stack.prometheus.logged_queries())
    one = collector.collect(SELECTORS[:1])
    middle = len(stack.prometheus.logged_queries())
    lots = collector.collect(many)
    logged = stack.prometheus.logged_queries()
    assert one.queries == lots.queries == len(collector.instant_queries())
    assert middle - before == len(logged) - middle == one.queries, "Prometheus's query log agrees"
    assert not any("extra-" in q or "llama-a100" in q for q in logged[middle:]), "no per-variant PromQL"
    assert len(lots.variants) == 55


LLAMA_CELLS = {"in100-200xout20-50", "in100-200xout50-100", "in500-1000xout20-50", "in500-1000xout50-100"}


def test_length_mix_labels_stay_fixed_while_the_window_moves(stack, warm, collector):
    """Ten evaluations 1 s apart (ten cycles' windows over live traffic): the estimated cell means
    move with the requests inside each window, the names (the exported `bucket` label) do not."""
    now = time.time() - 1
    mixes = [collector.collect([GEMMA], at=now - k).models["gemma"].length_mix for k in range(10)]
    cells = {"in200-500xout20-50", "in500-1000xout20-50"}
    assert all({b.label for b in mix} == cells for mix in mixes), [[b.label for b in m] for m in mixes]
    means = {(b.label, b.input_tokens) for mix in mixes for b in mix}
    assert len(means) >= 4, f"the windows' means did not move, the test shows nothing: {sorted(means)}"


def test_bucket_grouping_by_pod_deployment_or_label_gives_the_same_answers(stack, warm, collector):
    """Histograms summed per pod here, per Deployment in Prometheus, or per variant label in
    Prometheus: the same sums, so the same quantiles and mixes (and the same pods and rates)."""
    at = time.time() - 1
    by_deployment = [s for s in SELECTORS if s.deployment is not None]
    by_label = [VariantSelector(name=s.name, namespace=s.namespace, model=s.model,
                                label_value=s.name.split("/")[1]) for s in SELECTORS]
    assert collector.bucket_grouping(SELECTORS) == "pod" and collector.bucket_grouping(by_deployment) == "deployment"
    named = collector.collect(SELECTORS, at=at)
    grouped = collector.collect(by_deployment, at=at)
    with Collector(settings(stack.prometheus.url, variant_label="variant")) as c:
        assert c.bucket_grouping(by_label) == "label"
        labelled = c.collect(by_label, at=at)
    assert "label_replace" in collector.instant_queries("deployment")["ttft_buckets"]
    for other in (grouped, labelled):
        for sel in by_deployment:
            mine, theirs = named.variants[sel.name], other.variants[sel.name]
            assert theirs.pods == mine.pods and theirs.arrival_rate_rps == pytest.approx(mine.arrival_rate_rps)
            assert theirs.ttft.quantiles_s == pytest.approx(mine.ttft.quantiles_s, rel=1e-9)
            assert theirs.itl.quantiles_s == pytest.approx(mine.itl.quantiles_s, rel=1e-9)
            assert [b.share for b in theirs.length_mix] == pytest.approx([b.share for b in mine.length_mix])


def test_online_fit_recovers_the_profile_from_iteration_metrics(stack, warm, collector):
    """Means of a linear model over exact counter differences are exact: the fit is the profile."""
    fit = OnlineProfileFitter(collector, window_s=5).fit(SELECTORS[3:4], lookback_s=stack.age_s(), step_s=2)
    q = fit.fits["prod/qwen-fit"]
    assert fit.available and q.available and q.source == "iteration_metrics", q.reason
    for batch in (1, 4, 16, 32):
        for context in (200, 2000):
            assert q.profile.decode_step_s(batch, context) == pytest.approx(PROFILE.decode_step_s(batch, context),
                                                                            rel=1e-6)
    for tokens in (100, 500, 2000):
        assert q.profile.prefill_s(tokens) == pytest.approx(PROFILE.prefill_s(tokens), rel=1e-6)


def test_online_fit_from_vllm_request_metrics_alone(stack, warm, collector):
    """Without the emulator's iteration series: decode within 10 % at each pod's operating point
    (mean batch, context = prompt + half the output), prefill within 25 % or half a decode step at
    batch 1. Measured: decode +0.3..+1.4 %, prefill -0.5..-5.4 ms. The residual error is the batch
    average (time-weighted gauge vs token-weighted ITL) and the wait-for-the-step-in-progress
    correction of TTFT, which assumes an arrival waits half a step whenever a batch runs: TTFT alone
    cannot place a prefill finer than that half step, so it is the absolute tolerance."""
    fit = OnlineProfileFitter(collector, window_s=5).fit(SELECTORS[3:4], lookback_s=stack.age_s(), step_s=2,
                                                          use_iteration_metrics=False)
    q = fit.fits["prod/qwen-fit"]
    assert q.available and q.source == "request_metrics" and q.profile.decode_per_kv_token_s == 0, q.reason
    for pod, (_rate, prompt) in FIT_LOADS.items():
        batch = float(stack.prometheus.query(f'avg_over_time(vllm:num_requests_running{{pod="{pod}"}}'
                                             f"[{stack.age_s():.0f}s])")[0]["value"][1])
        truth = PROFILE.decode_step_s(batch, prompt + FIT_OUTPUT / 2)
        assert q.profile.decode_step_s(batch) == pytest.approx(truth, rel=0.10), (pod, batch)
    for tokens in (100, 500, 2000):
        half_step = 0.5 * PROFILE.decode_step_s(1)
        assert abs(q.profile.prefill_s(tokens) - PROFILE.prefill_s(tokens)) <= max(half_step, 0.25 * PROFILE.prefill_s(tokens))


def test_online_fit_refuses_without_a_spread_of_batch_sizes(warm, collector):
    """Both llama-a100 pods run the same load, so their batch sizes barely differ: no slope to fit."""
    fit = OnlineProfileFitter(collector, window_s=5, min_spread=3.0).fit(SELECTORS[:1], lookback_s=30, step_s=2)
    a100 = fit.fits["prod/llama-a100"]
    assert fit.available and not a100.available and a100.source == "request_metrics"
    assert "batch sizes spanning 3x" in a100.reason


def test_prometheus_harness_reload_adds_a_target(stack):
    extra = [ScrapeTarget(address=f"127.0.0.1:{stack.servers[PLANS[0].pod].port}",
                          labels={"namespace": "reload", "pod": "reloaded-pod"})]
    stack.prometheus.set_targets(stack.prometheus.targets + extra)
    series = stack.prometheus.wait_for('up{pod="reloaded-pod"}', timeout_s=20)
    assert series[0]["value"][1] == "1"


def test_stopped_server_is_flagged_stale_after_the_threshold(stack, warm, collector):
    before = collector.collect(SELECTORS).variants["edge/phi-t4"]
    assert before.status == "ok"
    stack.stop_pod("phi-t4-9a8b7c6d5-iiiii")

    def stale():
        r = collector.collect(SELECTORS)
        return r if r.variants["edge/phi-t4"].status == "stale" else None

    r = wait_until(stale, timeout_s=25, what="phi-t4 flagged stale")
    v = r.variants["edge/phi-t4"]
    assert v.newest_sample_age_s > STALE_AFTER_S
    assert "old (threshold 4 s)" in v.reason and v.stale_pods == ["phi-t4-9a8b7c6d5-iiiii"]
    assert r.models["phi"].variants == [] and "edge/phi-t4" in r.models["phi"].excluded_variants
    assert r.models["phi"].to_workload() is None
    assert r.variants["prod/llama-a100"].status == "ok", "other variants unaffected"
