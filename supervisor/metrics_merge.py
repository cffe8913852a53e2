"""One `/metrics` for a pod of worker processes: the workers' expositions, merged.

Each worker keeps its own registry (metrics.py) and serves it on a private socket; the
supervisor scrapes them all when it is scraped, parses the text format and adds them up.
prometheus_client's multiprocess mode is not used: it breaks custom collectors (admission
and registry state are read by one) and leaves the files of dead workers behind.

How series combine, by metric family:

- Counters and histograms (buckets, count, sum) add up, series by series (same name, same
  labels). When a worker exits, the last values scraped from it are kept and added to every
  later answer, so a pod-level counter never goes down when a worker is replaced (whatever
  the worker counted after its last scrape is lost; the sum still never decreases).
- Gauges add up: requests in flight, busy and total execution slots, queues, memory, open
  files; a dead worker's gauges are dropped.
- Gauges that are each worker's copy of the same state (tenants served, modules, config
  errors, compile seconds), high-water marks and `*_info` take the largest value;
  `process_start_time_seconds` the smallest (when the pod's oldest process started).

Every worker exposes the same bucket boundaries and label names (same code), so merging is
by plain keys, without any knowledge of what a series means beyond the tables below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .metrics import PREFIX

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
"""A series: sample name and its labels, in the order the exposition gave them."""

CUMULATIVE_TYPES = frozenset({"counter", "histogram", "summary"})
"""Families whose samples only grow while their process lives: kept after it exits."""

LARGEST_OF_COPIES = frozenset(
    {
        f"{PREFIX}_tenants",
        f"{PREFIX}_modules",
        f"{PREFIX}_module_compile_seconds",
        f"{PREFIX}_config_errors",
        f"{PREFIX}_guest_memory_high_water_bytes",
        "process_max_fds",
    }
)
SMALLEST = frozenset({"process_start_time_seconds"})


@dataclass
class Family:
    name: str
    type: str
    documentation: str
    samples: dict[SampleKey, float] = field(default_factory=dict)

    @classmethod
    def of(cls, metric: Metric) -> Family:
        samples = {(s.name, tuple(s.labels.items())): s.value for s in metric.samples}
        return cls(metric.name, metric.type, metric.documentation, samples)

    def to_metric(self) -> Metric:
        metric = Metric(self.name, self.documentation, self.type)
        for (name, labels), value in self.samples.items():
            metric.add_sample(name, dict(labels), value)
        return metric


Families = dict[str, Family]


def parse(text: str) -> Families:
    """The families of one text exposition (raises ValueError if it is not one)."""
    return {metric.name: Family.of(metric) for metric in text_string_to_metric_families(text)}


def families_of(metrics: Iterable[Metric]) -> Families:
    """The families a collector or registry yields (the supervisor's own metrics)."""
    return {metric.name: Family.of(metric) for metric in metrics}


def _combine(family: Family) -> Callable[[float, float], float]:
    if family.name in SMALLEST:
        return min
    if family.name in LARGEST_OF_COPIES or family.name.endswith("_info"):
        return max
    return _add


def _add(a: float, b: float) -> float:
    return a + b


class Merger:
    """Adds up the expositions of live workers and what exited ones had counted."""

    def __init__(self) -> None:
        self._retired: Families = {}

    def retire(self, families: Families) -> None:
        """Keep the cumulative series of a worker that exited (its last scrape)."""
        for family in families.values():
            if family.type not in CUMULATIVE_TYPES:
                continue
            kept = self._retired.get(family.name)
            if kept is None:
                kept = self._retired[family.name] = Family(
                    family.name, family.type, family.documentation
                )
            for key, value in family.samples.items():
                kept.samples[key] = kept.samples.get(key, 0.0) + value

    def merge(self, sources: Iterable[Families]) -> list[Metric]:
        """One family per name over `sources` and the retired workers, ready to render."""
        merged: Families = {}
        for families in [*sources, self._retired]:
            for family in families.values():
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Family(
                        family.name, family.type, family.documentation
                    )
                combine = _combine(family)
                for key, value in family.samples.items():
                    seen = into.samples.get(key)
                    into.samples[key] = value if seen is None else combine(seen, value)
        return [family.to_metric() for family in merged.values()]


class Snapshot:
    """Merged metrics in the shape prometheus_client's encoders read (`collect`)."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)
