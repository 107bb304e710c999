"""Regenerate examples/fleet.yaml: the example fleet `make demo` plans.

Every number in the file comes from here: model sizes from config.json shapes
(optimizer.datasheet.MODEL_FACTS), accelerator facts from public datasheets
(optimizer.datasheet.DATASHEETS), prices from the cloud price list quoted below, and each
variant's profile from optimizer.datasheet.datasheet_profile with the calibrated efficiencies.
max_batch is what the KV cache holds at the model's mean request length (optimizer.kv_memory),
capped at vLLM's default max_num_seqs.

Usage: .venv/bin/python examples/make_fleet.py           # rewrite examples/fleet.yaml
       .venv/bin/python examples/make_fleet.py --check   # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from optimizer.datasheet import DATASHEETS, MODEL_FACTS, datasheet_profile  # noqa: E402
from optimizer.fleet import Role, Variant  # noqa: E402
from optimizer.kv_memory import kv_capacity_tokens  # noqa: E402
from optimizer.problem import Problem  # noqa: E402
from optimizer.workload import SLO, LengthBucket, Workload  # noqa: E402

OUTPUT = HERE / "fleet.yaml"
VLLM_MAX_NUM_SEQS = 256

PRICE_SOURCE = """\
# Prices: AWS EC2 On-Demand, us-east-1, Linux, list prices of 2024 (before AWS's June 2025
# P4/P5 price cut), per GPU-hour = instance price / GPUs per instance:
#   H100      p5.48xlarge   $98.32 / 8 = $12.29
#   A100-80G  p4de.24xlarge $40.97 / 8 = $5.12
#   L4        g6.12xlarge   $4.602 / 4 = $1.15
#   T4        g4dn.12xlarge $3.912 / 4 = $0.978
# Check https://aws.amazon.com/ec2/pricing/on-demand/ before relying on them."""

# name: (instance, instance $/h, GPUs per instance, GPUs the cluster has, why that many)
PRICES = {
    "H100": ("p5.48xlarge", 98.32, 8, 8, "one p5 node: the scarce type"),
    "A100-80G": ("p4de.24xlarge", 40.97, 8, 32, "four p4de nodes"),
    "L4": ("g6.12xlarge", 4.602, 4, 32, "eight g6.12xlarge"),
    "T4": ("g4dn.12xlarge", 3.912, 4, 32, "eight g4dn.12xlarge"),
}

MODELS = ["Llama-3.1-8B", "Qwen2.5-32B", "Llama-3.1-70B"]

# (variant name, model, accelerator, accelerators per replica, role)
VARIANTS = [
    ("llama8b-h100", "Llama-3.1-8B", "H100", 1, Role.BOTH),
    ("llama8b-a100", "Llama-3.1-8B", "A100-80G", 1, Role.BOTH),
    ("llama8b-l4", "Llama-3.1-8B", "L4", 1, Role.BOTH),
    ("llama8b-t4x2", "Llama-3.1-8B", "T4", 2, Role.BOTH),
    ("llama8b-prefill-a100", "Llama-3.1-8B", "A100-80G", 1, Role.PREFILL),
    ("llama8b-decode-l4", "Llama-3.1-8B", "L4", 1, Role.DECODE),
    ("qwen32b-h100", "Qwen2.5-32B", "H100", 1, Role.BOTH),
    ("qwen32b-h100x2", "Qwen2.5-32B", "H100", 2, Role.BOTH),
    ("qwen32b-a100", "Qwen2.5-32B", "A100-80G", 1, Role.BOTH),
    ("qwen32b-a100x2", "Qwen2.5-32B", "A100-80G", 2, Role.BOTH),
    ("llama70b-h100x4", "Llama-3.1-70B", "H100", 4, Role.BOTH),
    ("llama70b-a100x4", "Llama-3.1-70B", "A100-80G", 4, Role.BOTH),
    ("llama70b-a100x8", "Llama-3.1-70B", "A100-80G", 8, Role.BOTH),
    ("llama70b-prefill-h100x4", "Llama-3.1-70B", "H100", 4, Role.PREFILL),
    ("llama70b-decode-a100x4", "Llama-3.1-70B", "A100-80G", 4, Role.DECODE),
]

# Request mix per model: (name, input tokens, output tokens, share), and requests per second.
WORKLOADS = {
    "Llama-3.1-8B": (12.0, [("chat", 300, 150, 0.5), ("rag", 2000, 200, 0.3),
                            ("summarize", 6000, 400, 0.1), ("generate", 500, 1000, 0.1)]),
    "Qwen2.5-32B": (5.0, [("code", 1500, 100, 0.4), ("chat", 400, 300, 0.4), ("document", 8000, 300, 0.2)]),
    "Llama-3.1-70B": (6.0, [("chat", 1000, 250, 0.5), ("rag", 4000, 300, 0.3), ("generate", 500, 800, 0.2)]),
}

# Latency targets at p90: small model interactive, large ones at reading speed (10 tokens/s).
SLOS = {
    "Llama-3.1-8B": SLO(model="Llama-3.1-8B", ttft_s=1.5, itl_s=0.1, percentile=90),
    "Qwen2.5-32B": SLO(model="Qwen2.5-32B", ttft_s=1.5, itl_s=0.075, percentile=90),
    "Llama-3.1-70B": SLO(model="Llama-3.1-70B", ttft_s=2.5, itl_s=0.1, percentile=90),
}


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def build() -> tuple[Problem, dict[str, str]]:
    """The Problem, and a one-line explanation per variant for the YAML comments."""
    accelerators = [
        DATASHEETS[name].accelerator(cost_per_hour=round(price / per, 3), available=count)
        for name, (_, price, per, count, _) in PRICES.items()
    ]
    acc_by_name = {a.name: a for a in accelerators}
    models = [MODEL_FACTS[m].model_spec() for m in MODELS]
    workloads = [
        Workload(model=m, arrival_rate_rps=rate,
                 buckets=[LengthBucket(name=n, input_tokens=i, output_tokens=o, share=s) for n, i, o, s in mix])
        for m, (rate, mix) in WORKLOADS.items()
    ]
    mean_tokens = {w.model: sum(b.share * (b.input_tokens + b.output_tokens) for b in w.buckets) for w in workloads}
    variants, notes = [], {}
    for name, model, acc, n, role in VARIANTS:
        facts = MODEL_FACTS[model]
        p = datasheet_profile(facts, DATASHEETS[acc], n)
        profile = p.model_copy(update={k: _round(v) for k, v in p.model_dump().items() if isinstance(v, float)})
        kv_tokens = kv_capacity_tokens(facts.model_spec(), acc_by_name[acc], n)
        max_batch = max(1, min(VLLM_MAX_NUM_SEQS, int(kv_tokens // mean_tokens[model])))
        variants.append(Variant(name=name, model=model, accelerator=acc, accelerators_per_replica=n,
                                max_batch=max_batch, role=role, profile=profile))
        notes[name] = (f"{n} x {acc} (TP {n}), role {role.value}: KV holds {kv_tokens / 1e3:.0f}k tokens; "
                       f"decode {1e3 * profile.decode_step_s(1, 0):.1f} ms at batch 1, "
                       f"prefill of 2000 tokens {1e3 * profile.prefill_s(2000):.0f} ms")
    problem = Problem(accelerators=accelerators, models=models, variants=variants, workloads=workloads,
                      slos=list(SLOS.values()))
    return problem, notes


def _dump(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=110)


def _item(doc: dict, comment: str | None = None) -> str:
    body = _dump([doc])
    return (f"  # {comment}\n" if comment else "") + "".join(f"  {line}\n" for line in body.splitlines())


def render() -> str:
    problem, notes = build()
    doc = problem.model_dump(mode="json", exclude_none=True)
    for w in doc["workloads"]:  # a length spread of 0 is the default: leave it out
        w["buckets"] = [{k: v for k, v in b.items() if not (k.endswith("_cv") and v == 0)} for b in w["buckets"]]
    doc["variants"] = [
        {k: v[k] for k in ("name", "model", "accelerator", "accelerators_per_replica", "role", "max_batch", "profile")}
        for v in doc["variants"]
    ]
    out = [
        "# Example fleet for `variant-autoscaler plan` (make plan-demo). GENERATED by examples/make_fleet.py:",
        "# edit that script and rerun it rather than editing numbers here.",
        "#",
        "# Profiles are roofline estimates from datasheet bandwidth/FLOPs divided by efficiencies",
        "# calibrated on measured Helix and Splitwise profiles (optimizer/datasheet.py, MAPE 8 % over",
        "# 2,881 measurements; see benchmarks/calibrate_profiles.py).",
        PRICE_SOURCE,
        "",
        "accelerators:",
    ]
    for a in doc["accelerators"]:
        instance, price, per, count, why = PRICES[a["name"]]
        out.append(_item(a, f"{a['name']}: ${price}/h {instance} / {per} GPUs; {count} available ({why})").rstrip())
    out += ["", "# Weights and KV bytes per token from config.json: KV = layers x kv_heads x head_dim x 2 (K,V) x 2 B.",
            "models:"]
    for m in doc["models"]:
        f = MODEL_FACTS[m["name"]]
        out.append(_item(m, f"{m['name']}: {f.params / 1e9:.2f}B parameters, bf16").rstrip())
    out += ["", "# One entry per way to serve a model; profile numbers from optimizer.datasheet.datasheet_profile.",
            "variants:"]
    for v in doc["variants"]:
        out.append(_item(v, notes[v["name"]]).rstrip())
    out += ["", "# Demand: requests per second and the request-length mix (shares sum to 1).", "workloads:"]
    for w in doc["workloads"]:
        out.append(_item(w).rstrip())
    out += ["", "# Latency targets per model, met by 90 % of requests.", "slos:"]
    for s in doc["slos"]:
        out.append(_item(s).rstrip())
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if fleet.yaml differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run examples/make_fleet.py", file=sys.stderr)
            return 1
        print(f"{OUTPUT} is up to date")
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
