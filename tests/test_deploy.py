"""The operator artifacts of `deploy/` and `metrics/`, checked offline.

- Core kinds (and the pod spec inside each Knative Service) against Kubernetes' own schemas,
  strictly (`kubernetes-validate`): an unknown or misspelt field fails.
- Knative, KEDA and Prometheus Operator resources against their CRD schemas, from
  `../shared/schemas/k8s-crds/` (skipped, saying so, when that folder is absent).
- What no schema checks: Knative's autoscaling annotations, and that the pieces agree with
  each other and with the code (slots = containerConcurrency, the metrics port, the custom
  metric's name, the revision KEDA targets, every metric name a query uses).
- Recording rules and alerts with `promtool check rules` and `promtool test rules`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from supervisor import artifacts, cli, metrics
from supervisor.admission import Admission
from supervisor.errors import Outcome
from supervisor.gateway import HEALTH_PATH
from supervisor.modules import ArtifactCache
from supervisor.sandbox import Sandbox
from supervisor.tenants import TenantRegistry

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
METRICS = REPO / "metrics"
CRD_SCHEMAS = REPO.parent / "shared" / "schemas" / "k8s-crds"
PROMTOOL = shutil.which(
    "promtool", path=os.pathsep.join([str(REPO / ".cache/prometheus/usr/bin"), os.defpath])
)
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: `make test` installs it"
)

KUBERNETES_VERSION = "1.30.0"
"""The oldest Kubernetes the manifests claim to support (Knative 1.16 needs 1.29 or later)."""

CRD_SCHEMA_FILES = {
    ("serving.knative.dev", "Service"): "serving.knative.dev/service_v1.json",
    ("keda.sh", "ScaledObject"): "keda.sh/scaledobject_v1alpha1.json",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com/servicemonitor_v1.json",
    ("monitoring.coreos.com", "PodMonitor"): "monitoring.coreos.com/podmonitor_v1.json",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com/prometheusrule_v1.json",
}
KNATIVE_RESERVED_PORTS = frozenset({8008, 8012, 8013, 8022, 9090, 9091})
KNATIVE_ONLY_POD_FIELDS = frozenset(
    {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
)
PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
AUTOSCALING = "autoscaling.knative.dev/"
KPA = "kpa.autoscaling.knative.dev"
HPA = "hpa.autoscaling.knative.dev"
WINDOW_RANGE_S = (6, 3600)
"""Knative's bounds on the stable window, `autoscaling.knative.dev/window`."""


def documents() -> list[tuple[str, dict]]:
    """Every YAML document under deploy/, with the file it came from."""
    return [
        (path.name, doc)
        for path in sorted(DEPLOY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc is not None
    ]


def group_of(doc: dict) -> str:
    api_version = doc["apiVersion"]
    return api_version.partition("/")[0] if "/" in api_version else ""


def knative_services() -> list[tuple[str, dict]]:
    return [
        (name, doc)
        for name, doc in documents()
        if (group_of(doc), doc["kind"]) == ("serving.knative.dev", "Service")
    ]


def the_document(kind: str) -> dict:
    (doc,) = [doc for _, doc in documents() if doc["kind"] == kind]
    return doc


def container_of(ksvc: dict) -> dict:
    (container,) = ksvc["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def annotations_of(ksvc: dict) -> dict:
    return ksvc["spec"]["template"]["metadata"].get("annotations", {})


# Schemas.


def test_core_kinds_validate_strictly_against_kubernetes():
    validated = 0
    for name, doc in documents():
        if (group_of(doc), doc["kind"]) in CRD_SCHEMA_FILES:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']}: {exc.message} at {list(exc.path)}")
        validated += 1
    assert validated >= 1


def test_knative_pod_specs_validate_strictly_as_core_pod_specs():
    """A Knative revision's spec is a core PodSpec plus a few fields of its own: checking it
    as a Pod catches a misspelt container field that only a cluster would otherwise find.
    Knative fills in a probe's port with the serving port; a Pod needs it written."""
    for name, ksvc in knative_services():
        spec = {
            key: value
            for key, value in copy.deepcopy(ksvc["spec"]["template"]["spec"]).items()
            if key not in KNATIVE_ONLY_POD_FIELDS
        }
        for container in spec["containers"]:
            for probe in PROBES:
                for action in ("httpGet", "tcpSocket"):
                    if action in container.get(probe, {}):
                        container[probe][action].setdefault(
                            "port", container["ports"][0]["containerPort"]
                        )
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}
        try:
            kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: pod spec: {exc.message} at {list(exc.path)}")


@pytest.mark.skipif(
    not CRD_SCHEMAS.is_dir(), reason=f"CRD schemas not found at {CRD_SCHEMAS} (../shared)"
)
def test_custom_resources_validate_against_their_crd_schemas():
    kinds = set()
    for name, doc in documents():
        key = (group_of(doc), doc["kind"])
        if key not in CRD_SCHEMA_FILES:
            continue
        schema = json.loads((CRD_SCHEMAS / CRD_SCHEMA_FILES[key]).read_text())
        validator = jsonschema.validators.validator_for(schema)(schema)
        errors = [f"{e.message} at {list(e.absolute_path)}" for e in validator.iter_errors(doc)]
        assert not errors, f"{name}: {doc['kind']}: {errors}"
        kinds.add(doc["kind"])
    assert kinds == {"Service", "ScaledObject", "ServiceMonitor", "PrometheusRule"}


def test_every_document_is_a_kind_some_check_knows():
    for name, doc in documents():
        key = (group_of(doc), doc["kind"])
        if key in CRD_SCHEMA_FILES:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{name}: {doc['apiVersion']} {doc['kind']} is checked by no schema")


# Knative: what no schema checks.


def test_autoscaling_annotation_values_are_strings_knative_accepts():
    classes = set()
    for name, ksvc in knative_services():
        annotations = annotations_of(ksvc)
        for key, raw in annotations.items():
            assert isinstance(raw, str), f"{name}: {key} must be a quoted string, got {raw!r}"
        autoscaling = {
            key.removeprefix(AUTOSCALING): value
            for key, value in annotations.items()
            if key.startswith(AUTOSCALING)
        }
        cls = autoscaling["class"]
        classes.add(cls)
        assert cls in {KPA, HPA}, name
        min_scale = int(autoscaling.get("min-scale", "0"))
        max_scale = int(autoscaling.get("max-scale", "0"))
        assert 0 <= min_scale <= max_scale, name
        assert "minScale" not in autoscaling and "maxScale" not in autoscaling, "old spelling"
        if cls == KPA:
            assert autoscaling["metric"] in {"concurrency", "rps"}, name
            assert 1 <= int(autoscaling["target-utilization-percentage"]) <= 100, name
            window = re.fullmatch(r"(\d+)(s|m|h)", autoscaling["window"])
            assert window, f"{name}: window {autoscaling['window']!r}"
            seconds = int(window[1]) * {"s": 1, "m": 60, "h": 3600}[window[2]]
            assert WINDOW_RANGE_S[0] <= seconds <= WINDOW_RANGE_S[1], name
        else:
            assert min_scale >= 1, f"{name}: the HPA class cannot scale to zero"
            assert "window" not in autoscaling, f"{name}: HPA ignores the KPA window"
            if "metric" in autoscaling:  # absent: KEDA's ScaledObject carries the signal
                assert autoscaling["metric"] == published_custom_metric(), name
                assert re.fullmatch(r"[1-9]\d*", autoscaling["target"]), (
                    f"{name}: an HPA target is an integer, got {autoscaling['target']!r}"
                )
    assert classes == {KPA, HPA}


def test_each_pod_is_sized_and_served_as_the_supervisor_expects():
    metrics_service = next(
        doc for _, doc in documents() if doc["kind"] == "Service" and doc["apiVersion"] == "v1"
    )
    (metrics_port,) = metrics_service["spec"]["ports"]
    for name, ksvc in knative_services():
        spec = ksvc["spec"]["template"]["spec"]
        container = container_of(ksvc)
        env = env_of(container)
        assert spec["containerConcurrency"] == int(env["SUPERVISOR_SLOTS"]), name
        (port,) = container["ports"]  # Knative allows one; the app listens on $PORT
        assert port["name"] in {"http1", "h2c"}
        assert port["containerPort"] not in KNATIVE_RESERVED_PORTS
        assert container["readinessProbe"]["httpGet"]["path"] == HEALTH_PATH
        host, _, listen_port = env["SUPERVISOR_METRICS_LISTEN"].rpartition(":")
        assert host == "0.0.0.0", f"{name}: Prometheus scrapes the pod's address"
        assert int(listen_port) == metrics_port["targetPort"], name
        assert int(listen_port) not in KNATIVE_RESERVED_PORTS | {port["containerPort"]}
        assert float(env["SUPERVISOR_GRACE_PERIOD"]) <= spec["timeoutSeconds"], name
        metrics.TenantLabels(env["SUPERVISOR_METRICS_TENANTS"].replace(",", " ").split())
        # The metrics Service selects this service's pods by the label Knative gives them.
        assert metrics_service["spec"]["selector"] == {
            "serving.knative.dev/service": ksvc["metadata"]["name"]
        }
        assert container["securityContext"]["runAsUser"] == containerfile_uid()


def test_the_service_monitor_scrapes_the_metrics_service_as_the_alerts_expect():
    service = next(
        doc for _, doc in documents() if doc["kind"] == "Service" and doc["apiVersion"] == "v1"
    )
    monitor = the_document("ServiceMonitor")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == metrics.METRICS_PATH
    # Prometheus names the job after the Service; the scrape-down alert selects it.
    alerts = "\n".join(rule.get("expr", "") for rule in rules_of(METRICS / "alerts.yml"))
    assert f'up{{job="{service["metadata"]["name"]}"}}' in alerts
    # The revision label the rules and KEDA select on comes from the pods' labels.
    assert "serving.knative.dev/revision" in monitor["spec"]["podTargetLabels"]


def test_keda_scales_the_named_revision_on_its_summed_concurrency():
    scaled = the_document("ScaledObject")
    ksvc = next(doc for name, doc in knative_services() if name == "knative-keda.yaml")
    revision = ksvc["spec"]["template"]["metadata"]["name"]
    assert revision.startswith(ksvc["metadata"]["name"] + "-")
    assert annotations_of(ksvc)[AUTOSCALING + "scaled-object-auto-create"] == "false"
    assert scaled["metadata"]["name"] == revision
    assert scaled["metadata"]["annotations"][AUTOSCALING + "class"] == HPA
    assert scaled["spec"]["scaleTargetRef"]["name"] == f"{revision}-deployment"
    assert scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"] == revision
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"].strip()
    assert query.startswith("sum(") and query.endswith(")"), "KEDA needs the revision's sum"
    assert f'serving_knative_dev_revision="{revision}"' in query
    assert "wasm_supervisor_request_concurrency_seconds_total" in query
    assert re.fullmatch(r"[1-9]\d*", trigger["metadata"]["threshold"])
    assert scaled["spec"]["minReplicaCount"] >= 1


# prometheus-adapter.


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load((METRICS / "prometheus-adapter.yaml").read_text())["rules"]
    return rule


def published_custom_metric() -> str:
    """The custom metric's name as prometheus-adapter publishes it (its `name` rule)."""
    rule = adapter_rule()
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"].strip("'"))[0]
    pattern = rule["name"]["matches"]
    return re.sub(pattern, rule["name"]["as"].replace("${1}", r"\1"), series)


def rendered_adapter_query() -> str:
    """The adapter's metricsQuery as it would send it for two pods of one namespace."""
    rule = adapter_rule()
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])[0]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"a|b"')
        .replace("<<.GroupBy>>", "pod")
    )


def test_the_adapter_publishes_the_metric_the_hpa_service_names():
    assert published_custom_metric() == "wasm_supervisor_request_concurrency"
    rule = adapter_rule()
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    assert "rate(" in rule["metricsQuery"], "a counter of request-seconds is read as a rate"


# Rules, alerts and every query: valid PromQL over metrics that exist.


def rules_of(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def test_the_prometheus_rule_carries_exactly_the_rules_of_metrics():
    rule = the_document("PrometheusRule")
    groups = [
        *yaml.safe_load((METRICS / "recording_rules.yml").read_text())["groups"],
        *yaml.safe_load((METRICS / "alerts.yml").read_text())["groups"],
    ]
    assert rule["spec"]["groups"] == groups


@needs_promtool
def test_promtool_checks_the_rules():
    result = subprocess.run(
        [PROMTOOL, "check", "rules", "recording_rules.yml", "alerts.yml"],
        cwd=METRICS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_rules_pass():
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "tests/rules_test.yml"],
        cwd=METRICS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, with its variables filled in."""
    dashboard = json.loads((METRICS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [
        re.sub(r"label_values\((.*), \w+\)$", r"\1", var["query"]["query"])
        for var in dashboard["templating"]["list"]
        if var["type"] == "query"
    ]
    return [
        re.sub(r"\$\w+", "x", expr.replace("$__rate_interval", "1m")).replace('=~"x"', '=~".*"')
        for expr in exprs
    ]


def all_queries() -> dict[str, str]:
    """Where each query an operator artifact sends to Prometheus comes from -> the query."""
    queries = {f"dashboard #{i}": q for i, q in enumerate(dashboard_queries())}
    queries["prometheus-adapter metricsQuery"] = rendered_adapter_query()
    (trigger,) = the_document("ScaledObject")["spec"]["triggers"]
    queries["KEDA trigger"] = trigger["metadata"]["query"]
    for path in (METRICS / "recording_rules.yml", METRICS / "alerts.yml"):
        for rule in rules_of(path):
            queries[rule.get("record") or rule["alert"]] = rule["expr"]
    return queries


@needs_promtool
def test_every_query_is_valid_promql(tmp_path):
    names = list(all_queries())
    rules = {
        "groups": [
            {
                "name": "queries",
                "rules": [
                    {"record": f"check:query_{i}", "expr": expr}
                    for i, expr in enumerate(all_queries().values())
                ],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, (result.stdout + result.stderr, names)


def exposed_names(tmp_path: Path) -> set[str]:
    """Sample names a supervisor exposes once it has served a request."""
    (tmp_path / "tenants").mkdir()
    (tmp_path / "policies").mkdir()
    with Sandbox() as sandbox:
        registry = TenantRegistry(
            tmp_path / "tenants",
            tmp_path / "policies",
            sandbox,
            ArtifactCache(tmp_path / "cache", sandbox.engine, sandbox.settings),
        )
        m = metrics.Metrics(Admission(slots=1, global_queue=1), registry)
        m.observe_request("t", 200, Outcome.OK, 0.001, 10, 65536)
        return {sample.name for family in m.registry.collect() for sample in family.samples}


def test_every_metric_a_query_uses_exists(tmp_path):
    known = exposed_names(tmp_path) | {"up"}
    known |= {rule["record"] for rule in rules_of(METRICS / "recording_rules.yml")}
    referenced = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
    for origin, query in all_queries().items():
        for name in referenced.findall(query):
            if "wasm_supervisor_" in name or name.startswith("process_"):
                assert name in known, f"{origin}: {name} is not a metric the supervisor exposes"


# The image.


def containerfile_uid() -> int:
    (user,) = re.findall(r"^USER (\d+)$", (DEPLOY / "Containerfile").read_text(), re.M)
    return int(user)


def test_the_containerfile_copies_what_exists_and_runs_unprivileged():
    text = (DEPLOY / "Containerfile").read_text()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for source in sources.split():
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    assert containerfile_uid() != 0
    exposed = {int(port) for port in re.findall(r"^EXPOSE (.+)$", text, re.M)[0].split()}
    assert {8080, metrics.DEFAULT_METRICS_PORT} <= exposed
    assert f"SUPERVISOR_METRICS_LISTEN=0.0.0.0:{metrics.DEFAULT_METRICS_PORT}" in text


def test_every_pod_mounts_the_store_secret_its_environment_names():
    """The artifact key and NATS credentials come from deploy/store-secret.yaml, mounted
    read-only; the placeholder key is refused by the server, so no pod runs with a key
    published here."""
    secret = the_document("Secret")
    data = secret["stringData"]
    assert set(data) == {"artifact-keys", "nats.creds"}
    with pytest.raises(ValueError, match="at least 32"):
        artifacts.ArtifactKeys.parse(data["artifact-keys"], source="store-secret.yaml")
    for name, ksvc in knative_services():
        spec = ksvc["spec"]["template"]["spec"]
        container = container_of(ksvc)
        env = env_of(container)
        (volume,) = [v for v in spec["volumes"] if v.get("secret")]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"], name
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert mount["readOnly"] is True, name
        folder = Path(mount["mountPath"])
        key_file = Path(env["SUPERVISOR_ARTIFACT_KEY_FILE"])
        assert key_file.parent == folder and key_file.name in data, name
        credentials = Path(env["SUPERVISOR_STORE_CREDENTIALS"])
        assert credentials.parent == folder and credentials.name in data, name
        assert env["SUPERVISOR_STORE"].startswith(("nats://", "tls://")), name
        assert env["SUPERVISOR_STORE_REPLICAS"] == "3", f"{name}: production buckets replicate"
        args = cli.build_parser().parse_args(["serve", "--artifact-key-file", str(key_file)])
        assert args.artifact_key_file == key_file
