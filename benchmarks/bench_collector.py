"""How long one collection takes for 1,000 variants (100 models x 10 variants x 3 pods = 3,000 pods).

The operator's cycle budget (issue 4: <= 2 s for 1,000 VariantAutoscalings, excluding Prometheus
latency) includes decoding and aggregating what Prometheus sends: four bucket queries alone carry
~60,000 samples each. A replaying server on 127.0.0.1 answers every query instantly with a
pre-serialised result shaped like the real one, so the figures are the collector's own work plus
loopback HTTP. `fetch` is the 19 queries alone with per-pod buckets (HTTP + JSON + checks);
`collect` adds matching pods to variants and computing rates, quantiles and length mixes, with
buckets summed per Deployment in Prometheus (Deployment selectors) or fetched per pod (regexes).

    .venv/bin/python -m pytest -q benchmarks/bench_collector.py --benchmark-columns=min,median,max,rounds
"""

from __future__ import annotations

import json
import random
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from variant_autoscaler.collector import Collector, CollectorSettings, PrometheusSettings, VariantSelector
from variant_autoscaler_testbed.vllm_metrics import ITL_BUCKETS_S, TTFT_BUCKETS_S, one_two_five_buckets

MODELS, VARIANTS_PER_MODEL, PODS_PER_VARIANT = 100, 10, 3


def _pods() -> list[dict[str, str]]:
    return [{"namespace": f"ns{m % 10}", "model_name": f"model-{m}", "pod": f"m{m}-v{v}-5d8f9c7b4-p{p:04d}"}
            for m in range(MODELS) for v in range(VARIANTS_PER_MODEL) for p in range(PODS_PER_VARIANT)]


def selectors(by: str = "deployment") -> list[VariantSelector]:
    def how(m: int, v: int) -> dict:
        return {"deployment": f"m{m}-v{v}"} if by == "deployment" else {"pod_regex": f"m{m}-v{v}-.*"}

    return [VariantSelector(name=f"ns{m % 10}/m{m}-v{v}", namespace=f"ns{m % 10}", model=f"model-{m}", **how(m, v))
            for m in range(MODELS) for v in range(VARIANTS_PER_MODEL)]


def _answers() -> dict[str, bytes]:
    """Answer bodies by a substring of the query: per-pod vectors, and per-Deployment bucket vectors
    for the label_replace form the collector uses when every selector names a Deployment."""
    rng = random.Random(1)
    pods = _pods()
    deployments = [{"namespace": f"ns{m % 10}", "model_name": f"model-{m}", "va_deployment": f"m{m}-v{v}"}
                   for m in range(MODELS) for v in range(VARIANTS_PER_MODEL)]

    def vector(samples):
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": samples}}).encode()

    def scalar():
        return vector([{"metric": p, "value": [1.0, f"{rng.uniform(0.1, 10):.4f}"]} for p in pods])

    def buckets(bounds, groups):
        out = []
        for p in groups:
            total = 0.0
            for b in (*bounds, "+Inf"):
                total += rng.uniform(0, 2)
                out.append({"metric": p | {"le": str(b)}, "value": [1.0, f"{total:.4f}"]})
        return vector(out)

    tokens = one_two_five_buckets(8192)
    info = vector([{"metric": {"namespace": p["namespace"], "pod": p["pod"], "block_size": "16",
                               "num_gpu_blocks": "8192"}, "value": [1.0, "1"]} for p in pods])
    histograms = {"prompt_tokens_bucket": tokens, "generation_tokens_bucket": tokens,
                  "first_token_seconds_bucket": TTFT_BUCKETS_S, "inter_token_latency_seconds_bucket": ITL_BUCKETS_S}
    answers = {f"label_replace*{k}": buckets(b, deployments) for k, b in histograms.items()}
    answers |= {k: buckets(b, pods) for k, b in histograms.items()}
    return answers | {"cache_config_info": info, "": scalar()}


def _answer(answers: dict[str, bytes], query: str) -> bytes:
    for key, body in answers.items():
        if all(part in query for part in key.split("*")):
            return body
    raise KeyError(query)


class ReplayingPrometheus:
    def __init__(self) -> None:
        answers = _answers()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).get("query", [""])[0]
                body = _answer(answers, query)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def collector():
    prom = ReplayingPrometheus()
    with Collector(CollectorSettings(prometheus=PrometheusSettings(url=prom.url, timeout_s=30))) as c:
        yield c
    prom.close()


def test_fetch_only_per_pod_buckets(benchmark, collector):
    raw = benchmark.pedantic(collector.queries.run, args=(collector.instant_queries("pod"),), rounds=3, iterations=1)
    assert len(raw["running"]) == MODELS * VARIANTS_PER_MODEL * PODS_PER_VARIANT


@pytest.mark.parametrize("by", ["deployment", "pod_regex"])
def test_collect_1000_variants(benchmark, collector, by):
    sels = selectors(by)
    result = benchmark.pedantic(collector.collect, args=(sels,), rounds=3, iterations=1)
    assert result.available and len(result.variants) == 1000 and len(result.models) == MODELS
    assert all(len(v.pods) == PODS_PER_VARIANT and v.ttft.quantiles_s["p90"] is not None
               for v in result.variants.values())
    print(f"\ncollect by {by}: {result.duration_s:.3f} s for {len(sels)} variants, {result.queries} queries")
