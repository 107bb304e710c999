"""Serve an emulated vLLM model server: OpenAI-style /v1/completions timed by a performance profile,
vLLM metrics on /metrics (plain text format 0.0.4) and /health. The stand-in for vLLM in tests and
in the local live demo. Timing comes from --profile FILE (a ParametricProfile or TabulatedProfile
mapping, or any mapping with a `profile` key such as a variant entry of a plan file) or from the
datasheet roofline of --accelerator (optimizer.datasheet) for the model architecture given by
--architecture (default: --model).
"""

from __future__ import annotations

import argparse
import asyncio

from pydantic import TypeAdapter, ValidationError

from optimizer.datasheet import DATASHEETS, MODEL_FACTS, datasheet_profile
from optimizer.problem import InputError, format_validation_error, read_document
from optimizer.profile import PerformanceProfile
from variant_autoscaler_testbed.model_server import ModelServerConfig, serve_until_cancelled

NAME = "emulate-server"
HELP = "run an emulated vLLM server (completions timed by a profile, vLLM metrics)"

KV_MEMORY_SHARE = 0.9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="served model name (the model_name metric label)")
    timing = parser.add_mutually_exclusive_group(required=True)
    timing.add_argument("--profile", metavar="FILE", help="YAML/JSON performance profile")
    timing.add_argument("--accelerator", choices=sorted(DATASHEETS), help="use this accelerator's roofline profile")
    parser.add_argument("--architecture", choices=sorted(MODEL_FACTS),
                        help="model facts for --accelerator (default: --model)")
    parser.add_argument("--tp", type=int, default=1, help="accelerators per replica for --accelerator (default 1)")
    parser.add_argument("--max-batch", type=int, default=256, help="most running sequences (default 256)")
    parser.add_argument("--max-model-len", type=int, default=8192, help="most prompt+output tokens (default 8192)")
    parser.add_argument("--kv-cache-tokens", type=int,
                        help="KV-cache capacity in tokens (default: from the datasheet, else 262144)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="emulated seconds per real second")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-iteration-metrics", action="store_true",
                        help="do not export the emulator-only vllm_emulator:* iteration series")


def _profile_from_file(path: str) -> PerformanceProfile:
    data = read_document(path)
    doc = data.get("profile", data) if isinstance(data.get("profile"), dict) else data
    if "kind" not in doc:
        doc = {"kind": "tabulated" if "decode_points" in doc else "parametric", **doc}
    try:
        return TypeAdapter(PerformanceProfile).validate_python(doc)
    except ValidationError as err:
        field, reason = format_validation_error(err)[0]
        raise InputError(path, field, reason) from None


def build_config(args: argparse.Namespace) -> ModelServerConfig:
    """The server config the arguments describe; bad arguments become InputError."""
    kv_tokens = args.kv_cache_tokens
    if args.profile:
        profile = _profile_from_file(args.profile)
    else:
        arch = args.architecture or args.model
        if arch not in MODEL_FACTS:
            raise InputError("--architecture", "", f"no datasheet facts for {arch!r} (known: {sorted(MODEL_FACTS)})")
        if args.tp < 1:
            raise InputError("--tp", "", f"must be >= 1, got {args.tp}")
        facts, sheet = MODEL_FACTS[arch], DATASHEETS[args.accelerator]
        profile = datasheet_profile(facts, sheet, args.tp)
        if kv_tokens is None:
            free_gb = sheet.memory_gb * args.tp * KV_MEMORY_SHARE - facts.weight_gb
            if free_gb <= 0:
                raise InputError("--accelerator", "", f"{arch} ({facts.weight_gb:.1f} GB) does not fit in "
                                                      f"{args.tp} x {args.accelerator}")
            kv_tokens = int(free_gb * 1e9 / facts.kv_bytes_per_token)
    try:
        return ModelServerConfig(
            model=args.model, profile=profile, max_batch=args.max_batch, max_model_len=args.max_model_len,
            kv_cache_tokens=kv_tokens or 262144, time_scale=args.time_scale, host=args.host, port=args.port,
            iteration_metrics=not args.no_iteration_metrics,
        )
    except ValidationError as err:
        field, reason = format_validation_error(err)[0]
        raise InputError("arguments", f"--{field.replace('_', '-')}", reason) from None


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    try:
        asyncio.run(serve_until_cancelled(config, announce=lambda line: print(line, flush=True)))
    except OSError as exc:
        raise InputError("--port", "", f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0
