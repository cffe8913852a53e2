"""A real Prometheus scrapes a supervisor under a known load; the autoscalers' queries must read
that load back.

N clients each send `sleep_1s.wat` requests back to back, so N requests are in flight at every
moment. Prometheus (Debian's 2.42, unpacked by `make test` under .cache/prometheus) scrapes
/metrics every second and evaluates metrics/recording_rules.yml. After the rate window has
filled, the script asks Prometheus what prometheus-adapter (metrics/prometheus-adapter.yaml),
KEDA (deploy/knative-keda.yaml) and the recording rules would ask, and compares each answer
with N. Everything listens on 127.0.0.1; the load stops by itself.

    python bench/prometheus_scrape.py [--clients 6] [--seconds 75]

Exits 1 if an answer is off by more than 10 %.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, free_port, server

PROMETHEUS = REPO / ".cache/prometheus/usr/bin/prometheus"
SCRAPE_INTERVAL_S = 1
RATE_WINDOW_S = 60
"""The `[1m]` of the adapter's and KEDA's queries: the load must cover it before asking."""
TOLERANCE = 0.10
# The labels a ServiceMonitor would give the target in a cluster (deploy/metrics-service.yaml).
TARGET_LABELS = {
    "namespace": "bench",
    "pod": "wasm-supervisor-bench-0",
    "serving_knative_dev_service": "wasm-supervisor",
    "serving_knative_dev_revision": "wasm-supervisor-v1",
}


def workspace(root: Path, clients: int) -> tuple[Path, Path]:
    tenants, policies = root / "tenants", root / "policies"
    (tenants / "slow").mkdir(parents=True)
    policies.mkdir()
    shutil.copyfile(REPO / "tests/guests/sleep_1s.wat", tenants / "slow/sleep_1s.wat")
    (tenants / "slow/modules.toml").write_text('[[module]]\nroute = "/"\nmodule = "sleep_1s.wat"\n')
    (policies / "slow.toml").write_text(f"timeout_ms = 5000\nmax_concurrency = {clients}\n")
    return tenants, policies


def prometheus_config(root: Path, metrics_port: int) -> Path:
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "rule_files": [str(REPO / "metrics/recording_rules.yml")],
        "scrape_configs": [
            {
                "job_name": "wasm-supervisor-metrics",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{metrics_port}"], "labels": TARGET_LABELS}
                ],
            }
        ],
    }
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def adapter_query() -> str:
    """prometheus-adapter's metricsQuery as it sends it for the pods of one namespace."""
    (rule,) = yaml.safe_load((REPO / "metrics/prometheus-adapter.yaml").read_text())["rules"]
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])[0]
    matchers = f'namespace="{TARGET_LABELS["namespace"]}",pod=~"{TARGET_LABELS["pod"]}"'
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", "pod")
    )


def keda_query() -> str:
    """The ScaledObject's query, with the namespace it would be deployed to."""
    docs = yaml.safe_load_all((REPO / "deploy/knative-keda.yaml").read_text())
    (scaled,) = [doc for doc in docs if doc["kind"] == "ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    return trigger["metadata"]["query"].replace(
        'namespace="default"', f'namespace="{TARGET_LABELS["namespace"]}"'
    )


async def load(url: str, clients: int, seconds: float) -> int:
    """`clients` loops of back-to-back requests for `seconds`; returns how many were not 200."""
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while trio.current_time() < deadline:
            response = await http.get(url)
            failures += response.status_code != 200

    deadline = trio.current_time() + seconds
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http, trio.open_nursery() as n:
        for _ in range(clients):
            n.start_soon(client, http)
    return failures


async def query(prometheus_url: str, promql: str) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{prometheus_url}/api/v1/query", params={"query": promql})
    response.raise_for_status()
    result = response.json()["data"]["result"]
    if len(result) != 1:
        raise RuntimeError(f"{promql}: expected one series, got {result}")
    return float(result[0]["value"][1])


async def measure(app_url: str, prometheus_url: str, clients: int, seconds: float) -> bool:
    queries = {
        "prometheus-adapter (HPA custom metric)": adapter_query(),
        "KEDA trigger (revision sum)": keda_query(),
        "recording rule, per pod": "pod:wasm_supervisor_request_concurrency:rate1m",
        "recording rule, per revision": "revision:wasm_supervisor_request_concurrency:sum_rate1m",
        "in-flight gauge, averaged over samples": "avg_over_time("
        "wasm_supervisor_inflight_requests[1m])",
    }
    answers: dict[str, float] = {}
    async with trio.open_nursery() as nursery:

        async def run_load() -> None:
            answers["failures"] = await load(app_url, clients, seconds)

        nursery.start_soon(run_load)
        # Ask while the load still runs, once the window holds nothing but load.
        await trio.sleep(seconds - 3)
        for name, promql in queries.items():
            answers[name] = await query(prometheus_url, promql)
    print(f"\n{clients} clients, {seconds:.0f} s of 1 s requests; expected concurrency {clients}")
    print("\n| query | answer | error |\n|---|---:|---:|")
    ok = True
    for name in queries:
        error = answers[name] / clients - 1
        ok &= abs(error) <= TOLERANCE
        print(f"| {name} | {answers[name]:.3f} | {error:+.1%} |")
    print("\nqueries:")
    for name, promql in queries.items():
        print(f"  {name}: {' '.join(promql.split())}")
    print(f"\nrequests that were not 200: {answers['failures']:.0f}")
    return ok and answers["failures"] == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=RATE_WINDOW_S + 15)
    args = parser.parse_args()
    if args.seconds < RATE_WINDOW_S + 5:
        parser.error(f"--seconds must cover the {RATE_WINDOW_S} s rate window, plus a margin")
    if not PROMETHEUS.exists():
        sys.exit(f"{PROMETHEUS} is missing: `make test` (or `make bench-prometheus`) unpacks it")
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        tenants, policies = workspace(root, args.clients)
        app_port, metrics_port, prometheus_port = free_port(), free_port(), free_port()
        supervisor = [
            sys.executable, "-m", "supervisor.cli", "serve",
            "--listen", f"127.0.0.1:{app_port}",
            "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--tenants", str(tenants), "--policies", str(policies), "--cache", str(root / "cache"),
            "--slots", str(max(args.clients, 2)), "--log-level", "warning",
        ]  # fmt: skip
        prometheus = [
            str(PROMETHEUS),
            f"--config.file={prometheus_config(root, metrics_port)}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            "--log.level=warn",
        ]
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        started = time.monotonic()
        with (
            server(supervisor, f"http://127.0.0.1:{app_port}/healthz", cpus="0,1"),
            server(prometheus, f"{prometheus_url}/-/ready", cpus="0,1"),
        ):
            ok = trio.run(
                measure, f"http://127.0.0.1:{app_port}/slow/", prometheus_url, args.clients,
                args.seconds,
            )  # fmt: skip
        print(f"took {time.monotonic() - started:.0f} s")
    print("PASS" if ok else f"FAIL: an answer is off by more than {TOLERANCE:.0%}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
