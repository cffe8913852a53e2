"""The OpenAPI document matches what is served: schemathesis (from PyPI) fuzzes the live server.

schemathesis runs as its own process (`python -m schemathesis.cli run`) against a server in
this test's event loop; its examples, coverage, fuzzing and stateful phases (uploads linked to
reads, deletes and rollbacks) must find no 5xx and no response that contradicts the document:
status codes, content types, headers and bodies. `positive_data_acceptance` is left out: the
document can say a body is binary, not that random bytes are a valid module. The run is bounded
by `--max-examples` (about 20 s on a 2-core machine).
"""

from __future__ import annotations

import json
import sys

import trio
from conftest import REPO
from test_admin import API, OPERATOR, OPERATOR_TOKEN, admin_tenant, greeter, start_admin, upload

from supervisor.policies import DEFAULT_POLICY

MAX_EXAMPLES = 15
RUN_TIMEOUT_S = 180
SEED = 1


async def test_schemathesis_finds_no_server_error_and_no_contradiction(
    workspace, start_supervisor, tmp_path
):
    admin_tenant(workspace, "demo")
    running = await start_admin(start_supervisor)
    config = tmp_path / "schemathesis.toml"
    # Every operation on a tenant that exists, or all it would see is 404.
    config.write_text('[parameters]\ntenant = "demo"\n')
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{running.url}{API}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--header",
        f"Authorization: Bearer {OPERATOR_TOKEN}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--no-color",
    ]
    with trio.fail_after(RUN_TIMEOUT_S):
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output[-8000:]
    assert "passed" in output and "Stateful" in output


async def test_every_operation_of_the_document_is_served(workspace, start_supervisor):
    admin_tenant(workspace, "demo")
    running = await start_admin(start_supervisor)
    document = (await running.client.get(f"{API}/openapi.json")).json()
    await upload(running.client, "demo", "hello", greeter("hi"), route="/hello")
    seen = set()
    for template, item in document["paths"].items():
        path = template.format(tenant="demo", name="hello")
        for method in ("get", "put", "post", "delete"):
            if method not in item:
                continue
            response = await running.client.request(
                method, path, headers=OPERATOR, content=greeter("hi")
            )
            documented = set(item[method]["responses"])
            assert str(response.status_code) in documented, (method, path, response.text)
            seen.add((method, template))
    assert len(seen) == 7


def test_the_policy_schema_names_every_key_the_api_shows():
    """The document's Policy is what `Policy.to_dict` returns: a new policy key must be in it."""
    document = json.loads((REPO / "supervisor" / "openapi.json").read_text())
    schema = document["components"]["schemas"]["Policy"]
    shown = list(DEFAULT_POLICY.to_dict())
    assert list(schema["properties"]) == shown
    assert schema["required"] == shown
