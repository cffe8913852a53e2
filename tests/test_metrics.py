"""`/metrics` as Prometheus sees it: a real server on 127.0.0.1, scraped over HTTP.

The signals autoscaling reads are checked against a known load: N requests of
`sleep_1s.wat` in flight are N in `wasm_supervisor_inflight_requests`, and the rate of
`wasm_supervisor_request_concurrency_seconds_total` over a window inside that second is N.
The tenant label is checked to stay bounded whatever the number of tenants, and the live
output is linted by `promtool check metrics` (installed by `make test`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from supervisor import cli, metrics
from supervisor.admission import Admission
from supervisor.errors import Outcome
from supervisor.modules import ArtifactCache
from supervisor.sandbox import Sandbox
from supervisor.tenants import TenantRegistry

REPO = Path(__file__).resolve().parent.parent
PROMTOOL = shutil.which(
    "promtool", path=os.pathsep.join([str(REPO / ".cache/prometheus/usr/bin"), os.defpath])
)
WAIT_S = 5
"""Bound on waiting for a server-side state; a server that never gets there fails the test."""
POLL_S = 0.005
WINDOW_S = 0.4
"""The rate window: inside the second every `sleep_1s.wat` request is in flight."""
SCRAPE_BUDGET_S = 0.1
"""A scrape must answer within this while every slot runs a CPU-bound guest."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(text: str) -> Samples:
    """Every sample of a text exposition, keyed by name and label set."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


@pytest.fixture
async def start_scraped(start_supervisor):
    """`await start_scraped(**AppConfig overrides)` -> (Running, a client of its /metrics).

    One client per server, kept open: a new httpx client costs tens of ms of CPU (it loads
    the CA bundle), which would be measured as scrape time."""
    scrapers: list[httpx.AsyncClient] = []

    async def start(**overrides: object) -> tuple[object, httpx.AsyncClient]:
        running = await start_supervisor(metrics_port=0, **overrides)
        scraper = httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.app.metrics_port}")
        scrapers.append(scraper)
        return running, scraper

    yield start
    for scraper in scrapers:
        await scraper.aclose()


async def scrape_text(scraper: httpx.AsyncClient, **headers: str) -> httpx.Response:
    response = await scraper.get("/metrics", headers=headers)
    assert response.status_code == 200
    return response


async def scrape(scraper: httpx.AsyncClient) -> Samples:
    return samples_of((await scrape_text(scraper)).text)


async def scrape_until(scraper: httpx.AsyncClient, predicate: Callable[[Samples], bool]) -> Samples:
    """Scrape until the server shows the awaited state, failing after `WAIT_S`."""
    with trio.fail_after(WAIT_S):
        while not predicate(samples := await scrape(scraper)):
            await trio.sleep(POLL_S)
    return samples


def inflight(samples: Samples) -> float:
    return value(samples, "wasm_supervisor_inflight_requests")


def request_seconds(samples: Samples) -> float:
    return value(samples, "wasm_supervisor_request_concurrency_seconds_total")


# The request-seconds integral.


def test_request_seconds_integrate_inflight_requests_over_time():
    now = [100.0]
    tracker = metrics.ConcurrencyTracker(clock=lambda: now[0])
    tracker.enter()  # 1 in flight from t=100
    now[0] = 102.0
    tracker.enter()  # 2 from t=102
    now[0] = 103.0
    assert tracker.read() == (2, 4.0)  # 1 * 2 s + 2 * 1 s: counted while still running
    tracker.exit()
    now[0] = 105.0
    tracker.exit()
    now[0] = 110.0
    assert tracker.read() == (0, 6.0)  # + 1 * 2 s; nothing after the last exit


async def test_inflight_and_rate_of_request_seconds_equal_concurrent_slow_requests(
    workspace, start_scraped
):
    workspace.add_tenant("slow", {"/": "sleep_1s.wat"}, policy="timeout_ms = 5000\n")
    running, scraper = await start_scraped()
    concurrency = 4
    await running.client.get("/slow/")  # its module loads on its first request: not measured
    before = request_seconds(await scrape(scraper))
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(running.client.get, "/slow/")
        first = await scrape_until(scraper, lambda s: inflight(s) == concurrency)
        first_at = trio.current_time()
        await trio.sleep(WINDOW_S)  # the measurement window, not a wait for an event
        second = await scrape(scraper)
        second_at = trio.current_time()
    assert inflight(second) == concurrency, "a request ended inside the window"
    rate = (request_seconds(second) - request_seconds(first)) / (second_at - first_at)
    assert rate == pytest.approx(concurrency, rel=0.10)
    # Once all are done, nothing is in flight and the integral holds each second exactly once.
    after = await scrape(scraper)
    assert inflight(after) == 0
    assert concurrency * 1.0 <= request_seconds(after) - before <= concurrency * 1.25


# The tenant label is bounded.


def _registry(root: Path, sandbox: Sandbox, tenants: list[str]) -> TenantRegistry:
    (root / "tenants").mkdir(parents=True)
    (root / "policies").mkdir()
    for name in tenants:
        (root / "policies" / f"{name}.toml").write_text("")
    (root / "policies" / "broken.toml").write_text("max_queue = -1\n")
    registry = TenantRegistry(
        root / "tenants",
        root / "policies",
        sandbox,
        ArtifactCache(root / "cache", sandbox.engine, sandbox.settings),
    )
    registry.reload()
    return registry


def _tenant_series(tenants: list[str], served: int, root: Path, sandbox: Sandbox) -> set:
    """Every `wasm_supervisor_` series after two requests of each tenant (and of none), with
    the first `served` tenants loaded in the registry (each costs the registry ~1 ms)."""
    m = metrics.Metrics(
        Admission(slots=4, global_queue=4),
        _registry(root, sandbox, tenants[:served]),
        tenants={"t00000", "t00001"},
    )
    for name in [*tenants, metrics.NO_TENANT]:
        for status, outcome in ((200, Outcome.OK), (503, Outcome.FUEL)):
            m.observe_request(name, status, outcome, 0.01, 1000, 65536)
    return {
        (sample.name, frozenset(sample.labels.items()))
        for family in m.registry.collect()
        if family.name.startswith("wasm_supervisor_")
        for sample in family.samples
    }


def test_five_thousand_tenants_make_no_more_series_than_the_bounded_set(tmp_path):
    with Sandbox() as sandbox:
        few = _tenant_series(["t00000", "t00001", "t00002"], 3, tmp_path / "few", sandbox)
        many = _tenant_series([f"t{i:05}" for i in range(5000)], 300, tmp_path / "many", sandbox)
    assert many == few
    tenant_values = {dict(labels).get("tenant") for _, labels in many} - {None}
    assert tenant_values == {"t00000", "t00001", metrics.OTHER_TENANT, metrics.NO_TENANT}


def test_request_series_are_those_of_prometheus_clients_own_instruments(tmp_path):
    # The gateway's series are plain numbers (no lock per update); they must read as the
    # Counter and Histogram they replace: same series, same values, bucket bounds inclusive.
    reference = CollectorRegistry()
    requests = Counter(
        "wasm_supervisor_requests", "", ["tenant", "outcome", "status_class"], registry=reference
    )
    duration = Histogram(
        "wasm_supervisor_request_duration_seconds",
        "",
        ["tenant"],
        buckets=metrics.LATENCY_BUCKETS,
        registry=reference,
    )
    fuel = Counter("wasm_supervisor_guest_fuel_consumed", "", ["tenant"], registry=reference)
    with Sandbox() as sandbox:
        m = metrics.Metrics(
            Admission(slots=1, global_queue=1), _registry(tmp_path, sandbox, []), tenants={"a"}
        )
    observed = [
        ("a", 200, Outcome.OK, 0.0025, 0),  # exactly a bound: counted in it
        ("b", 503, Outcome.FUEL, 0.0, 2**60 + 1),
        ("a", 404, Outcome.NOT_FOUND, 61.0, 7),  # past the last bound: +Inf only
        ("-", 429, Outcome.REJECTED, 1e-7, 0),
        ("a", 200, Outcome.OK, 0.1, 12),
    ]
    for tenant, status, outcome, duration_s, fuel_used in observed:
        m.observe_request(tenant, status, outcome, duration_s, fuel_used, 0)
        label = m.tenant_label(tenant)
        requests.labels(label, str(outcome), f"{status // 100}xx").inc()
        duration.labels(label).observe(duration_s)
        fuel.labels(label).inc(fuel_used)

    def series(registry: CollectorRegistry) -> dict[str, list[Sample]]:
        names = {family.name for family in reference.collect()}
        return {f.name: f.samples for f in registry.collect() if f.name in names}

    assert series(m.registry) == series(reference)


def test_a_configured_tenant_named_other_is_refused():
    with pytest.raises(ValueError, match="other"):
        metrics.TenantLabels({"acme", "other"})


async def test_per_tenant_series_through_the_server(workspace, start_scraped):
    workspace.add_tenant("listed", {"/": "hello.wat"}, policy="timeout_ms = 1000\n")
    workspace.add_tenant("quiet", {"/": "hello.wat"})
    workspace.add_tenant("burner", {"/": "fuel_burn.wat"}, policy="fuel_per_request = 1_000_000\n")
    workspace.write_policy("broken", "max_queue = -1\n")
    running, scraper = await start_scraped(metrics_tenants=frozenset({"listed"}))
    for path in ("/listed/", "/quiet/", "/burner/", "/nobody/"):
        await running.client.get(path)
    samples = await scrape(scraper)

    tenants = {dict(labels)["tenant"] for _, labels in samples if "tenant" in dict(labels)}
    assert tenants == {"listed", "other", "-"}
    requests = "wasm_supervisor_requests_total"
    assert value(samples, requests, tenant="listed", outcome="ok", status_class="2xx") == 1
    assert value(samples, requests, tenant="other", outcome="ok", status_class="2xx") == 1
    assert value(samples, requests, tenant="other", outcome="fuel", status_class="5xx") == 1
    assert value(samples, requests, tenant="-", outcome="not_found", status_class="4xx") == 1
    assert value(samples, "wasm_supervisor_request_duration_seconds_count", tenant="other") == 2
    assert value(samples, "wasm_supervisor_guest_fuel_consumed_total", tenant="other") >= 1e6
    assert value(samples, "wasm_supervisor_guest_memory_high_water_bytes", tenant="listed") > 0
    modules = "wasm_supervisor_modules"
    # quiet's hello.wat has the bytes of listed's: loaded once in the process (compiled, a
    # cache miss), it counts for both tenants; burner's module was compiled too.
    assert value(samples, modules, tenant="other", cache="hit") == 0
    assert value(samples, modules, tenant="other", cache="miss") == 2
    assert value(samples, "wasm_supervisor_module_loads_total") == 2
    assert value(samples, "wasm_supervisor_loaded_modules") == 2
    assert value(samples, "wasm_supervisor_loaded_module_bytes") > 0
    assert value(samples, "wasm_supervisor_module_load_seconds_total") > 0
    assert value(samples, "wasm_supervisor_module_evictions_total") == 0
    assert value(samples, "wasm_supervisor_module_load_failures_total") == 0
    assert value(samples, "wasm_supervisor_module_compile_seconds", tenant="other") > 0
    assert value(samples, "wasm_supervisor_config_errors", tenant="other") == 1
    assert value(samples, "wasm_supervisor_policy_reload_errors_total") >= 1
    assert value(samples, "wasm_supervisor_tenants") == 3
    build = [labels for name, labels in samples if name == "wasm_supervisor_build_info"]
    assert dict(build[0])["version"]
    assert value(samples, "process_open_fds") > 0


# /metrics keeps answering when every slot is busy, and says so.


async def test_scrape_answers_fast_while_every_slot_runs_a_cpu_bound_guest(
    workspace, start_scraped
):
    workspace.add_tenant(
        "spin",
        {"/": "loop.wat"},
        policy="fuel_per_request = 10_000_000_000_000\ntimeout_ms = 1500\n",
    )
    slots = 2
    running, scraper = await start_scraped(slots=slots)
    async with trio.open_nursery() as nursery:
        for _ in range(slots + 1):  # one more than there are slots: it waits, then times out
            nursery.start_soon(running.client.get, "/spin/")
        busy = await scrape_until(
            scraper,
            lambda s: (
                value(s, "wasm_supervisor_busy_slots") == slots
                and value(s, "wasm_supervisor_queued_requests") == 1
            ),
        )
        assert value(busy, "wasm_supervisor_execution_slots") == slots
        assert inflight(busy) == slots + 1
        durations = []
        for _ in range(5):
            started = time.perf_counter()
            await scrape(scraper)
            durations.append(time.perf_counter() - started)
        assert max(durations) < SCRAPE_BUDGET_S, durations
    done = await scrape(scraper)
    rejections = "wasm_supervisor_admission_rejections_total"
    assert value(done, rejections, reason="queue_timeout") == 1
    assert value(done, rejections, reason="pod_saturated") == 0
    requests = "wasm_supervisor_requests_total"
    assert value(done, requests, tenant="other", outcome="timeout", status_class="5xx") == 2
    assert value(done, requests, tenant="other", outcome="rejected", status_class="4xx") == 1


# The exposition formats and the listener.


async def test_openmetrics_when_the_scraper_asks_for_it(workspace, start_scraped):
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    running, scraper = await start_scraped()
    await running.client.get("/demo/hello")

    plain = await scrape_text(scraper)
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")

    prometheus_accept = (
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
        "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    )
    om = await scrape_text(scraper, accept=prometheus_accept)
    assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.text.endswith("# EOF\n")
    families = {family.name: family for family in parse_om(om.text)}
    concurrency = families["wasm_supervisor_request_concurrency_seconds"]
    assert concurrency.type == "counter"
    assert concurrency.samples[0].value > 0


async def test_the_metrics_listener_serves_only_metrics(workspace, start_scraped):
    running, scraper = await start_scraped()
    assert (await scraper.get("/demo/hello")).status_code == 404
    assert (await scraper.post("/metrics")).status_code == 405
    assert (await scraper.get("/healthz")).status_code == 404
    # ...and the serving port does not serve metrics.
    assert (await running.client.get("/metrics")).status_code == 404


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not found: `make test` installs it")
async def test_promtool_finds_nothing_wrong_in_the_live_output_under_load(workspace, start_scraped):
    workspace.add_tenant("demo", {"/hello": "hello.wat"})
    workspace.add_tenant("slow", {"/": "sleep_1s.wat"})
    running, scraper = await start_scraped(metrics_tenants=frozenset({"demo"}))
    await running.client.get("/demo/hello")  # loaded (on its first request) and observed

    async def hammer() -> None:
        for _ in range(50):
            await running.client.get("/demo/hello")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(running.client.get, "/slow/")
        for _ in range(4):
            nursery.start_soon(hammer)
        await scrape_until(scraper, lambda s: inflight(s) >= 1)
        text = (await scrape_text(scraper)).text
    assert "wasm_supervisor_request_duration_seconds_bucket" in text
    lint = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert (lint.returncode, lint.stdout, lint.stderr) == (0, "", "")


# The command line.


def test_metrics_flags_and_their_environment_variables(monkeypatch):
    args = cli.build_parser().parse_args(["serve"])
    assert args.metrics_listen == ("0.0.0.0", metrics.DEFAULT_METRICS_PORT)
    assert args.metrics_tenants == frozenset()
    monkeypatch.setenv("SUPERVISOR_METRICS_LISTEN", "127.0.0.1:0")
    monkeypatch.setenv("SUPERVISOR_METRICS_TENANTS", "acme, shop")
    args = cli.build_parser().parse_args(["serve"])
    assert args.metrics_listen == ("127.0.0.1", 0)
    assert args.metrics_tenants == frozenset({"acme", "shop"})
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--metrics-tenants", "Not_A_Tenant"])
