"""The metrics an emulated vLLM server exports, rendered in the plain text exposition format.

Why not `prometheus_client`: vLLM metric names contain colons (`vllm:num_requests_running`).
Prometheus 2.42 negotiates OpenMetrics with `prometheus_client`'s exporters and the colons then
arrive mangled (`vllm_num_requests_running`), so queries written for real vLLM find nothing. This
module renders `text/plain; version=0.0.4` itself, which keeps names byte for byte. It also lets a
histogram take one observation *with a count* (`observe(v, n)`): a decode iteration hands the same
inter-token latency to every sequence of the batch, and observing it once per sequence would cost
the emulator more CPU than the emulated GPU work.

Names, labels and bucket boundaries follow vLLM (v0.8-0.10 `vllm/engine/metrics.py` and
`vllm/v1/metrics/loggers.py`). Series under the `vllm_emulator:` prefix are an extension of the
emulator only (real vLLM has no such series): per-iteration timings grouped by batch size and by
prefill tokens, which make online profile fitting exact. Consumers must work without them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                  7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def one_two_five_buckets(maximum: float) -> tuple[float, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `maximum`."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > maximum:
                return tuple(out)
            out.append(float(value))
        exponent += 1


def batch_group(batch: int) -> int:
    """Power-of-two group a decode batch size falls in (1, 2, 4, 8, ...): bounded label cardinality."""
    return 1 << (max(1, batch).bit_length() - 1)


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _labels_text(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Family:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...]):
        self.name, self.help_text, self.label_names = name, help_text, label_names

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]

    def lines(self) -> list[str]:
        raise NotImplementedError


class Counter(_Family):
    """Monotone count; `name` ends in `_total` as vLLM's do (text format 0.0.4 types the full name)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...]):
        if not name.endswith("_total"):
            raise ValueError(f"counter name must end in _total: {name}")
        super().__init__(name, help_text, label_names)
        self._values: dict[tuple[str, ...], float] = {}

    def touch(self, labels: tuple[str, ...]) -> None:
        """Export a zero for `labels` now, so `rate()` sees the first increment (as vLLM does)."""
        self._values.setdefault(labels, 0.0)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, labels: tuple[str, ...]) -> float:
        return self._values.get(labels, 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels_text(self.label_names, k)} {_format_value(v)}"
                for k, v in sorted(self._values.items())]


class Gauge(_Family):
    """A value read when scraped, from a callback (queue lengths live in the scheduler)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...],
                 read: Callable[[], Iterable[tuple[tuple[str, ...], float]]]):
        super().__init__(name, help_text, label_names)
        self._read = read

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels_text(self.label_names, k)} {_format_value(v)}" for k, v in self._read()]


class Histogram(_Family):
    """Cumulative-bucket histogram whose `observe` takes a multiplicity."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...], buckets: Iterable[float]):
        super().__init__(name, help_text, label_names)
        self.upper_bounds = tuple(sorted(float(b) for b in buckets))
        if not self.upper_bounds:
            raise ValueError(f"histogram {name} needs at least one bucket")
        self._counts: dict[tuple[str, ...], list[float]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def touch(self, labels: tuple[str, ...]) -> None:
        """Export zeros for `labels` now, so `rate()` sees the first observation."""
        self._counts.setdefault(labels, [0.0] * (len(self.upper_bounds) + 1))
        self._sums.setdefault(labels, 0.0)

    def observe(self, labels: tuple[str, ...], value: float, count: float = 1.0) -> None:
        counts = self._counts.setdefault(labels, [0.0] * (len(self.upper_bounds) + 1))
        counts[bisect.bisect_left(self.upper_bounds, value)] += count
        self._sums[labels] = self._sums.get(labels, 0.0) + value * count

    def count(self, labels: tuple[str, ...]) -> float:
        return sum(self._counts.get(labels, ()))

    def sum(self, labels: tuple[str, ...]) -> float:
        return self._sums.get(labels, 0.0)

    def lines(self) -> list[str]:
        out = []
        for labels, counts in sorted(self._counts.items()):
            running = 0.0
            for bound, c in zip((*self.upper_bounds, math.inf), counts, strict=True):
                running += c
                le = 'le="' + _format_value(bound) + '"'
                out.append(f"{self.name}_bucket{_labels_text(self.label_names, labels, le)} {_format_value(running)}")
            lt = _labels_text(self.label_names, labels)
            out.append(f"{self.name}_sum{lt} {_format_value(self._sums[labels])}")
            out.append(f"{self.name}_count{lt} {_format_value(running)}")
        return out


class Registry:
    """An ordered set of families rendered together; one per emulated server."""

    def __init__(self) -> None:
        self._families: list[_Family] = []

    def add(self, family: _Family) -> _Family:
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"metric {family.name} registered twice")
        self._families.append(family)
        return family

    def render(self) -> str:
        out: list[str] = []
        for family in self._families:
            lines = family.lines()
            if lines:
                out.extend(family.header())
                out.extend(lines)
        return "\n".join(out) + "\n"
