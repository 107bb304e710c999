"""One optimization problem: the fleet, the demand and the SLOs, checked for consistency.

This is the input file format of `variant-autoscaler plan` and the object the operator builds
from custom resources each cycle. Every reference (variant -> model, variant -> accelerator,
workload -> model) is checked here, so the engine never sees a dangling name.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from optimizer import input_limits as lim
from optimizer.fleet import Accelerator, ModelSpec, Variant
from optimizer.workload import SLO, Workload


class AllocationOptions(BaseModel):
    model_config = lim.STRICT

    change_penalty_per_replica: float = Field(
        default=0.0, ge=0, le=lim.MAX_PRICE_PER_HOUR,
        description="Cost per hour charged for each replica added or removed vs current."
    )
    change_penalty_share: float = Field(
        default=0.0, ge=0, le=10,
        description="Also charged per replica added or removed: this share of that variant's own $/h. A flat "
                    "penalty sized for large replicas keeps small ones forever (a $1/h L4 never pays a $5/h "
                    "penalty back); a share of each replica's price weighs every change against its own saving.",
    )
    removal_penalty_weight: float = Field(
        default=1.0, ge=0, le=1,
        description="Share of the change penalty charged for a replica removed (1: as for one added). An added "
                    "replica pays a cold start before it serves; a removed one saves its price at once, and "
                    "scale-down delays already keep a fleet from shrinking on a dip. Charging removals as well "
                    "doubled the price of every swap, so a fleet kept an H100 PD replica plus two A100 ones "
                    "for a 70B rise where a P/D pair cost $20/h less.",
    )
    power_cap_w: float | None = Field(
        default=None, gt=0, le=lim.MAX_FLEET_POWER_W, description="Upper bound on total accelerator power."
    )
    kv_transfer_gb_s: float = Field(
        default=25.0, gt=0, le=lim.MAX_BANDWIDTH_GB_S,
        description="Bandwidth of the P->D KV-cache link per transfer, GB/s."
    )
    service_level: float = Field(
        default=1.0, gt=0, le=1.0,
        description="Fraction of each replica's SLO capacity to plan for; < 1 buys latency headroom.",
    )
    prefill_queue: bool = Field(
        default=False,
        description="Capacity model: a prefill server under a token budget (chunked prefill) works through its "
                    "prompts first come first served (an M/G/1 queue, the exact residual of the prompt in service, "
                    "the next prompts' chunks in a prompt's last iteration), instead of one batch of the waiting "
                    "prompts as a server without a budget runs; and a spread prompt's own prefill is read "
                    "geometrically between the length nodes. Against the replica simulator the batch model rated "
                    "the 70B H100 prefill server +10 % high on 8k prompts (cv 0.5) and +91 % on the long-context "
                    "benchmark's prompts; this one -2 % and -26 %. Off by default: with it the simulator's "
                    "decisions cost more (longctx70b $39.72 -> $46.96, code8b $10.69 -> $11.10, held-out seeds-a "
                    "$58.43 -> $59.68) at the same attainment, since the other errors of the plan (a planned rate "
                    "~50 % over the true one at 0.2 req/s, every bucket held to the model-wide percentile) were "
                    "hidden by the optimistic prefill capacity.",
    )
    shared_tail: bool = Field(
        default=False,
        description="Capacity model: the SLO's tail (1 - percentile) is shared across a model's length buckets "
                    "(the SLO counts all of its requests) instead of each bucket held to the percentile; each "
                    "bucket's percentile is chosen at the least cost per request/s "
                    "(optimizer.capacity.bucket_percentiles). Costs 13 capacity solves per case (simulate ~6x slower). "
                    "Off by default because it loses the SLO elsewhere (measured at 3dd3651: default demo $47.28 -> "
                    "$43.64, longctx70b $38.72 -> $35.59, seeds-a $54.68 -> $49.35, but code8b 98.88 %, azure70b "
                    "96.36 %, mixed-shapes 32B 93.84 %): the per-bucket p99's slack absorbs misses the capacity "
                    "model does not model (bursts, rises).",
    )
    time_limit_s: float = Field(default=2.0, gt=0, le=lim.MAX_TIME_LIMIT_S, description="Solver wall-clock limit.")
    relative_gap: float = Field(
        default=0.01, ge=0, le=1, description="Stop when the proven optimality gap is below this."
    )


class Problem(BaseModel):
    model_config = lim.STRICT

    accelerators: list[Accelerator] = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    variants: list[Variant] = Field(min_length=1)
    workloads: list[Workload] = Field(default_factory=list)
    slos: list[SLO] = Field(default_factory=list)
    options: AllocationOptions = Field(default_factory=AllocationOptions)

    @model_validator(mode="after")
    def _references(self) -> Problem:
        for field, names in (
            ("accelerators", [a.name for a in self.accelerators]),
            ("models", [m.name for m in self.models]),
            ("variants", [v.name for v in self.variants]),
            ("workloads", [w.model for w in self.workloads]),
            ("slos", [s.model for s in self.slos]),
        ):
            dupes = sorted(n for n, count in Counter(names).items() if count > 1)  # linear: 1,000 variants per cycle
            if dupes:
                raise ValueError(f"{field}: duplicate name(s) {dupes}")
        accs = {a.name: a for a in self.accelerators}
        models = {m.name: m for m in self.models}
        for i, v in enumerate(self.variants):
            if v.accelerator not in accs:
                raise ValueError(
                    f"variants[{i}].accelerator: unknown accelerator {v.accelerator!r} (known: {sorted(accs)})"
                )
            if v.model not in models:
                raise ValueError(f"variants[{i}].model: unknown model {v.model!r} (known: {sorted(models)})")
            mem = accs[v.accelerator].memory_gb * v.accelerators_per_replica
            weight = models[v.model].weight_gb
            if weight >= mem:
                raise ValueError(
                    f"variants[{i}] ({v.name}): weights of {v.model} ({weight:g} GB) do not fit in "
                    f"{v.accelerators_per_replica} x {v.accelerator} ({mem:g} GB)"
                )
        for field, items in (("workloads", self.workloads), ("slos", self.slos)):
            for i, item in enumerate(items):
                if item.model not in models:
                    raise ValueError(f"{field}[{i}].model: unknown model {item.model!r} (known: {sorted(models)})")
        with_slo = {s.model for s in self.slos}
        for i, w in enumerate(self.workloads):
            if w.model not in with_slo:
                raise ValueError(f"workloads[{i}]: model {w.model!r} has demand but no entry in slos")
        return self

    def accelerator(self, name: str) -> Accelerator:
        return next(a for a in self.accelerators if a.name == name)

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def slo(self, model: str) -> SLO:
        return next(s for s in self.slos if s.model == model)

    def workload(self, model: str) -> Workload | None:
        return next((w for w in self.workloads if w.model == model), None)

    def variant_cost_per_hour(self, variant: Variant) -> float:
        """$/h of one replica: the variant's own price when it has one, else its accelerators' price."""
        if variant.cost_per_replica_per_hour is not None:
            return variant.cost_per_replica_per_hour
        return self.accelerator(variant.accelerator).cost_per_hour * variant.accelerators_per_replica


class InputError(Exception):
    """A bad input file, with the file, the field and the reason, ready to show a human."""

    def __init__(self, source: str, field: str, reason: str):
        self.source, self.field, self.reason = source, field, reason
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {reason}")


def format_validation_error(err: ValidationError) -> list[tuple[str, str]]:
    """(field path, reason) per error, with list indices as `[i]` and union tags dropped."""
    out = []
    for e in err.errors():
        path = ""
        for part in e["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part in ("parametric", "tabulated"):
                continue
            else:
                path += f".{part}" if path else str(part)
        msg = e["msg"].removeprefix("Value error, ")
        out.append((path, msg))
    return out


def read_text(path: str | Path) -> str:
    """The file's text as UTF-8, or InputError naming the file: unreadable, or the first byte that is not UTF-8.

    Every input reader goes through here, so a binary or Latin-1 file is one line, never a traceback.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(str(p), "", f"cannot read file ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(str(p), "", f"not UTF-8 text (byte {exc.start})") from None


def read_document(path: str | Path) -> dict:
    """Read a YAML or JSON mapping, or raise InputError naming the file."""
    p = Path(path)
    text = read_text(p)
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise InputError(str(p), "", f"not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {detail}") from None
    if not isinstance(data, dict):
        raise InputError(str(p), "", f"expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_problem(path: str | Path) -> Problem:
    """Load a plan input file (YAML or JSON); any problem becomes one InputError."""
    data = read_document(path)
    try:
        return Problem.model_validate(data)
    except ValidationError as err:
        field, reason = format_validation_error(err)[0]
        more = len(err.errors()) - 1
        if more:
            reason += f" (and {more} more error{'s' if more > 1 else ''})"
        raise InputError(str(path), field, reason) from None
