"""Prometheus metrics: the registry, the instruments the gateway feeds, and `/metrics`.

Two kinds of series, all under `wasm_supervisor_` and in base units:

- Pod-level signals, with no tenant label, for autoscaling and capacity: requests in flight,
  `request_concurrency_seconds_total` (whose `rate()` is the time-weighted average
  concurrency, the signal Knative's queue-proxy measures), execution slots and busy slots,
  queue depth, admission rejections by reason, artifact-cache and reload counters.
- Per-tenant series: requests by outcome and status class, latency, fuel, guest memory
  high-water mark, compile seconds, modules by cache result, configuration errors. Their
  `tenant` label is bounded (`TenantLabels`): a configured set of tenants gets its own value,
  every other tenant is `other`, a request that matched no tenant is `-`; so the number of
  series cannot grow with the number of tenants.

State owned elsewhere (admission, the tenant registry, the artifact cache) is read when
scraped, by a collector; nothing here keeps a copy of it. Everything is read and rendered on
the event loop, the thread that changes admission state, so a scrape sees one consistent
moment. Guests run in worker threads, so `/metrics` answers while every slot is busy.

`/metrics` is served by `server.serve` on its own listener (`--metrics-listen`), in the
Prometheus text format, or OpenMetrics when the scraper's `Accept` asks for it.
"""

from __future__ import annotations

import bisect
import importlib.metadata
import itertools
import math
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from . import __version__
from .admission import Admission
from .errors import Outcome
from .outbound.client import DURATION_BUCKETS
from .policies import is_valid_tenant_name
from .server import Request, RequestBody, Response
from .tenants import TenantRegistry

PREFIX = "wasm_supervisor"
METRICS_PATH = "/metrics"
DEFAULT_METRICS_PORT = 9464
"""Prometheus exporters' customary port; not one Knative reserves (8008, 8012, 8013, 8022,
9090, 9091), and not the serving port, so a scrape never competes with tenant traffic for it."""

OTHER_TENANT = "other"
"""The label value shared by every tenant outside the configured set."""
NO_TENANT = "-"
"""The label value of a request that matched no tenant (the access log's placeholder too)."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
"""Seconds. A trivial guest answers in about a millisecond; `timeout_ms` allows up to ten
minutes, but past a minute the exact figure no longer changes a decision."""

_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_LATENCY_LE = tuple(floatToGoString(bound) for bound in (*LATENCY_BUCKETS, math.inf))
"""The `le` label of each latency bucket, as prometheus_client writes it."""
_OUTBOUND_LE = tuple(floatToGoString(bound) for bound in (*DURATION_BUCKETS, math.inf))


class ConcurrencyTracker:
    """Requests in flight and their integral over time, exact at any instant.

    The integral (request-seconds) advances by `inflight * elapsed` at every change and is
    completed up to `now` when read, so its rate over any window is the time-weighted average
    concurrency, also while long requests are still running (a counter bumped only when a
    request ends would show nothing for a request longer than the window). Thread-safe.
    """

    __slots__ = ("_accumulated", "_clock", "_inflight", "_last_change", "_lock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight = 0
        self._accumulated = 0.0
        self._last_change = clock()

    def enter(self) -> None:
        with self._lock:
            self._advance()
            self._inflight += 1

    def exit(self) -> None:
        with self._lock:
            self._advance()
            self._inflight -= 1

    def read(self) -> tuple[int, float]:
        """(requests in flight now, request-seconds since start)."""
        with self._lock:
            self._advance()
            return self._inflight, self._accumulated

    def _advance(self) -> None:
        now = self._clock()
        self._accumulated += self._inflight * (now - self._last_change)
        self._last_change = now


class _TenantSeries:
    """One tenant label's latency histogram (per bucket, not cumulative) and fuel."""

    __slots__ = ("buckets", "duration_sum", "fuel")

    def __init__(self) -> None:
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is `+Inf`
        self.duration_sum = 0.0
        self.fuel = 0.0


class _RequestSeries:
    """The series every request feeds: requests, latency and fuel, by tenant label.

    Plain numbers, where prometheus_client's Counter and Histogram children take a lock on
    every `inc` and `observe`: both the gateway and a scrape run on the event loop, so there
    is nothing to lock against (`observe_request`: 2.3 -> 1.2 µs). The series and their
    values are those the prometheus_client instruments exposed: a series appears at its first
    request (fuel too, at 0), sums add up in floats.
    """

    def __init__(self) -> None:
        # (tenant label, outcome, status // 100): strings only when scraped.
        self._requests: dict[tuple[str, Outcome, int], int] = {}
        self._tenants: dict[str, _TenantSeries] = {}

    def observe(
        self, label: str, outcome: Outcome, status: int, duration_s: float, fuel_used: int
    ) -> None:
        key = (label, outcome, status // 100)
        self._requests[key] = self._requests.get(key, 0) + 1
        series = self._tenants.get(label)
        if series is None:
            series = self._tenants[label] = _TenantSeries()
        # The first bucket whose bound is >= the duration (`le`: less than or equal).
        series.buckets[bisect.bisect_left(LATENCY_BUCKETS, duration_s)] += 1
        series.duration_sum += duration_s
        series.fuel += fuel_used

    def describe(self) -> list[Metric]:
        return self._families()

    def collect(self) -> list[Metric]:
        requests, duration, fuel = families = self._families()
        for (label, outcome, status_class), count in self._requests.items():
            requests.add_metric([label, str(outcome), f"{status_class}xx"], count)
        for label, series in self._tenants.items():
            cumulative = zip(_LATENCY_LE, itertools.accumulate(series.buckets), strict=True)
            duration.add_metric([label], list(cumulative), series.duration_sum)
            fuel.add_metric([label], series.fuel)
        return families

    @staticmethod
    def _families() -> list[Metric]:
        return [
            CounterMetricFamily(
                f"{PREFIX}_requests",
                "Requests finished, by tenant, outcome and status class.",
                labels=["tenant", "outcome", "status_class"],
            ),
            HistogramMetricFamily(
                f"{PREFIX}_request_duration_seconds",
                "Time from the request head to the response, by tenant.",
                labels=["tenant"],
            ),
            CounterMetricFamily(
                f"{PREFIX}_guest_fuel_consumed",
                "WebAssembly fuel consumed by guests (about one unit per instruction), by tenant.",
                labels=["tenant"],
            ),
        ]


class TenantLabels:
    """Maps a tenant name to its bounded `tenant` label value."""

    def __init__(self, tenants: Iterable[str]) -> None:
        names = frozenset(tenants)
        for name in names:
            if not is_valid_tenant_name(name):
                raise ValueError(f"metrics tenant {name!r} is not a valid tenant name")
        if OTHER_TENANT in names:
            # Its series would merge with everyone else's, and nobody could tell them apart.
            raise ValueError(f"{OTHER_TENANT!r} is the label of unlisted tenants; rename it")
        self.tenants = names

    def __call__(self, tenant: str) -> str:
        if tenant in self.tenants:
            return tenant
        return NO_TENANT if tenant == NO_TENANT else OTHER_TENANT

    def values(self) -> list[str]:
        """The label values of tenants: the configured ones and `other` (never `-`)."""
        return [*sorted(self.tenants), OTHER_TENANT]

    def of_key(self, key: str) -> str:
        """The label of a registry error key: `acme`, `acme.toml`, `acme.hosts`, or a file
        that belongs to no tenant (`_defaults.toml`, which is `-`)."""
        tenant = key.partition(".")[0]
        return self(tenant) if is_valid_tenant_name(tenant) else NO_TENANT


class Metrics:
    """The process's metrics: instruments fed by the gateway, collectors over shared state."""

    def __init__(
        self,
        admission: Admission,
        registry: TenantRegistry,
        *,
        tenants: Iterable[str] = (),
    ) -> None:
        # `_created` series double the series count and Prometheus 2.x ignores them in the
        # text format. The switch is process-wide; this is the process's only registry.
        disable_created_metrics()
        self.tenant_label = TenantLabels(tenants)
        self.concurrency = ConcurrencyTracker()
        self.registry = CollectorRegistry(auto_describe=True)
        self._memory_high_water: dict[str, int] = {}
        self._requests = _RequestSeries()
        self.registry.register(self._requests)
        Info(f"{PREFIX}_build", "Versions this process runs.", registry=self.registry).info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "wasmtime": importlib.metadata.version("wasmtime"),
            }
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(_StateCollector(self, admission, registry))

    def request_started(self) -> None:
        self.concurrency.enter()

    def request_finished(self) -> None:
        self.concurrency.exit()

    def observe_request(
        self,
        tenant: str,
        status: int,
        outcome: Outcome,
        duration_s: float,
        fuel_used: int,
        memory_bytes: int,
    ) -> None:
        """Count one finished request (`tenant` is `NO_TENANT` when none matched)."""
        label = self.tenant_label(tenant)
        self._requests.observe(label, outcome, status, duration_s, fuel_used)
        if memory_bytes > self._memory_high_water.get(label, 0):
            self._memory_high_water[label] = memory_bytes

    def memory_high_water(self) -> dict[str, int]:
        """Largest guest memory seen, in bytes, by tenant label."""
        return dict(self._memory_high_water)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics if `accept` asks for it."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    async def handle(self, request: Request, body: RequestBody) -> Response:
        """The metrics listener's handler: `GET /metrics`, nothing else."""
        if request.path != METRICS_PATH:
            return Response(404, list(_TEXT), b"only /metrics is served here\n")
        if request.method not in ("GET", "HEAD"):
            return Response(405, [*_TEXT, (b"allow", b"GET, HEAD")], b"use GET\n")
        accept = next((value for name, value in request.headers if name == "accept"), "")
        data, content_type = self.render(accept)
        return Response(200, [(b"content-type", content_type.encode("latin-1"))], data)


class _StateCollector:
    """Reads, at scrape time, the state that the gateway, admission and registry own."""

    def __init__(self, metrics: Metrics, admission: Admission, registry: TenantRegistry) -> None:
        self._metrics = metrics
        self._admission = admission
        self._registry = registry

    def describe(self) -> list[Metric]:
        # Names only, so the registry can refuse a clash without reading any state.
        return list(self._families().values())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        labels = self._metrics.tenant_label
        inflight, request_seconds = self._metrics.concurrency.read()
        families["inflight"].add_metric([], inflight)
        families["concurrency"].add_metric([], request_seconds)

        stats = self._admission.statistics()
        families["slots"].add_metric([], stats.slots)
        families["busy"].add_metric([], stats.busy_slots)
        families["queued"].add_metric([], stats.waiting)
        families["queue_capacity"].add_metric([], stats.global_queue)
        for reason, count in sorted(stats.rejections.items()):
            families["rejections"].add_metric([reason], count)

        cache = self._registry.cache
        families["cache_hits"].add_metric([], cache.hits)
        families["cache_misses"].add_metric([], cache.misses)
        families["cache_rebuilt"].add_metric([], cache.rebuilt)
        families["cache_collected"].add_metric([], cache.collected)
        families["compiled"].add_metric([], cache.compiled)
        shared = cache.shared
        families["shared_downloaded"].add_metric([], shared.downloaded if shared else 0)
        families["shared_refused"].add_metric([], shared.refused if shared else 0)
        families["shared_published"].add_metric([], shared.published if shared else 0)
        families["shared_swept"].add_metric([], shared.swept if shared else 0)
        families["reload_errors"].add_metric([], self._registry.reload_errors)
        loaded = self._registry.loaded
        families["loads"].add_metric([], loaded.loads)
        families["load_failures"].add_metric([], loaded.load_failures)
        families["load_seconds"].add_metric([], loaded.load_seconds)
        families["evictions"].add_metric([], loaded.evictions)
        families["loaded"].add_metric([], len(loaded))
        families["loaded_bytes"].add_metric([], loaded.bytes)

        state = self._registry.state
        families["tenants"].add_metric([], len(state.tenants))
        compile_s = dict.fromkeys(labels.values(), 0.0)
        modules = {(label, hit): 0 for label in labels.values() for hit in ("hit", "miss")}
        for name, tenant in state.tenants.items():
            label = labels(name)
            for ref in tenant.modules.values():
                module = loaded.peek(ref.sha256)
                if module is not None:  # loaded in this process
                    compile_s[label] += module.load_s
                    modules[label, "miss" if module.compiled else "hit"] += 1
        errors = dict.fromkeys([*labels.values(), NO_TENANT], 0)
        for key in state.errors:
            errors[labels.of_key(key)] += 1
        for label in labels.values():
            families["compile"].add_metric([label], compile_s[label])
            for hit in ("hit", "miss"):
                families["modules"].add_metric([label, hit], modules[label, hit])
        for label, count in errors.items():
            families["errors"].add_metric([label], count)
        for label, high_water in sorted(self._metrics.memory_high_water().items()):
            families["memory"].add_metric([label], high_water)
        self._collect_outbound(families, labels)
        return iter(families.values())

    def _collect_outbound(self, families: dict[str, Metric], labels: TenantLabels) -> None:
        """Guests' outbound calls, summed by tenant label (kept by the registry's clients)."""
        outcomes: dict[tuple[str, str], int] = {}
        durations: dict[str, tuple[list[int], float]] = {}
        for tenant, (counts, buckets, total_s) in self._registry.outbound.stats().items():
            label = labels(tenant)
            for outcome, count in counts.items():
                outcomes[label, outcome] = outcomes.get((label, outcome), 0) + count
            summed, summed_s = durations.get(label, ([0] * len(buckets), 0.0))
            durations[label] = (
                [a + b for a, b in zip(summed, buckets, strict=True)],
                summed_s + total_s,
            )
        for (label, outcome), count in sorted(outcomes.items()):
            families["outbound"].add_metric([label, outcome], count)
        for label, (buckets, total_s) in sorted(durations.items()):
            cumulative = zip(_OUTBOUND_LE, itertools.accumulate(buckets), strict=True)
            families["outbound_duration"].add_metric([label], list(cumulative), total_s)

    @staticmethod
    def _families() -> dict[str, Metric]:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))

        return {
            "inflight": gauge(
                "inflight_requests", "Requests being served now (waiting or running)."
            ),
            "concurrency": counter(
                "request_concurrency_seconds",
                "Request-seconds served; its rate is the time-weighted average concurrency.",
            ),
            "slots": gauge("execution_slots", "Guests that can run at once: the capacity."),
            "busy": gauge("busy_slots", "Execution slots running a guest now."),
            "queued": gauge("queued_requests", "Requests waiting for an execution slot."),
            "queue_capacity": gauge(
                "queue_capacity", "Requests that may wait for a slot, all tenants together."
            ),
            "rejections": counter(
                "admission_rejections", "Requests refused by admission, by reason.", ("reason",)
            ),
            "cache_hits": counter(
                "artifact_cache_hits", "Modules loaded from a verified compiled artifact."
            ),
            "cache_misses": counter(
                "artifact_cache_misses", "Modules compiled because no artifact was stored."
            ),
            "cache_rebuilt": counter(
                "artifact_cache_rebuilt", "Stored artifacts that failed verification, rebuilt."
            ),
            "cache_collected": counter(
                "artifact_cache_collected",
                "Artifacts deleted: unused for the cache's minimum age, or evicted over its bound.",
            ),
            "compiled": counter(
                "modules_compiled", "Modules compiled here: in neither cache nor the store."
            ),
            "shared_downloaded": counter(
                "shared_artifacts_downloaded",
                "Compiled artifacts taken from the store, authenticated, instead of compiling.",
            ),
            "shared_refused": counter(
                "shared_artifacts_refused",
                "Store artifacts that failed authentication (no seal, wrong MAC, truncated,"
                " unknown key): never loaded, rebuilt.",
            ),
            "shared_published": counter(
                "shared_artifacts_published", "Artifacts compiled here and sealed into the store."
            ),
            "shared_swept": counter(
                "shared_artifacts_swept", "Store artifacts swept: no module names them."
            ),
            "reload_errors": counter(
                "policy_reload_errors",
                "Policy or module loads that failed; the last good state stayed in force.",
            ),
            "loads": counter(
                "module_loads",
                "Modules loaded on a route's first request (or after an eviction).",
            ),
            "load_failures": counter(
                "module_load_failures", "Module loads that failed; their requests answered 503."
            ),
            "load_seconds": counter(
                "module_load_seconds",
                "Seconds spent loading modules: fetched, verified, deserialized or compiled.",
            ),
            "evictions": counter(
                "module_evictions",
                "Loaded modules dropped from memory over --module-cache-bytes.",
            ),
            "loaded": gauge("loaded_modules", "Modules loaded in memory now."),
            "loaded_bytes": gauge(
                "loaded_module_bytes",
                "Bytes of the modules loaded in memory (their artifacts), within"
                " --module-cache-bytes per worker.",
            ),
            "tenants": gauge("tenants", "Tenants served."),
            "compile": gauge(
                "module_compile_seconds",
                "Seconds it took to compile (or load) the tenant's modules loaded now.",
                ("tenant",),
            ),
            "modules": gauge(
                "modules",
                "The tenant's modules loaded now, by whether they came from the artifact cache.",
                ("tenant", "cache"),
            ),
            "errors": gauge(
                "config_errors",
                "Policy or module files failing validation now, by tenant.",
                ("tenant",),
            ),
            "memory": gauge(
                "guest_memory_high_water_bytes",
                "Largest linear memory a guest of the tenant reached.",
                ("tenant",),
            ),
            "outbound": counter(
                "outbound_requests",
                "Guests' outbound HTTP requests (wasi_experimental_http), by tenant and outcome.",
                ("tenant", "outcome"),
            ),
            "outbound_duration": HistogramMetricFamily(
                f"{PREFIX}_outbound_request_duration_seconds",
                "Time guests' outbound HTTP requests took, redirects included, by tenant.",
                labels=["tenant"],
            ),
        }
