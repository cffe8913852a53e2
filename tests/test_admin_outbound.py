"""An upload's outbound settings through the real admin API: `allowed_host=` and
`http_max_concurrency=` are stored with the version, shown in its records, and honoured by
the guest's `wasi_experimental_http` calls (against a real upstream on 127.0.0.1)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from test_admin import OPERATOR, admin_tenant, error_of, module_url, start_admin, upload
from test_wagi_cli import upstream

LOOP_GUEST = REPO / "tests" / "hostile" / "guests" / "outbound_loop.wat"
"""Calls `req` until it fails; stdin `URL\\0k` keeps every response open."""


@pytest.fixture(name="origin")
def origin_fixture() -> Iterator[str]:
    for port in upstream():
        yield f"http://127.0.0.1:{port}"


async def test_an_uploads_http_max_concurrency_is_shown_stored_and_caps_held_responses(
    workspace, start_supervisor, origin: str
):
    admin_tenant(workspace, "t", f'outbound_hosts = ["{origin}"]\n')
    running = await start_admin(start_supervisor)
    params = [("route", "/call"), ("allowed_host", origin), ("http_max_concurrency", "2")]
    uploaded = await running.client.put(
        module_url("t", "loop"), content=LOOP_GUEST.read_bytes(), params=params, headers=OPERATOR
    )
    assert uploaded.status_code == 201, uploaded.text
    shown = (uploaded.json()["allowed_hosts"], uploaded.json()["http_max_concurrency"])
    assert shown == ([origin], 2)
    one = (await running.client.get(module_url("t", "loop"), headers=OPERATOR)).json()
    listed = (await running.client.get("/_admin/v1/tenants/t/modules", headers=OPERATOR)).json()
    assert (one["allowed_hosts"], one["http_max_concurrency"]) == ([origin], 2)
    assert listed["modules"][0]["http_max_concurrency"] == 2
    manifest = json.loads((workspace.tenants / "t" / "manifest.json").read_text())
    assert manifest["modules"]["loop"]["http_max_concurrency"] == 2
    # Two responses held, the third `req` refused with too_many_sessions (13).
    held = await running.client.post("/t/call", content=f"{origin}/x\0k".encode())
    assert held.text == "calls=3 last=13\n", held.text


async def test_without_http_max_concurrency_the_record_shows_null_and_the_policy_caps(
    workspace, start_supervisor, origin: str
):
    admin_tenant(workspace, "t", f'outbound_hosts = ["{origin}"]\nmax_outbound_requests = 5\n')
    running = await start_admin(start_supervisor)
    params = {"route": "/call", "allowed_host": origin}
    uploaded = await upload(running.client, "t", "loop", LOOP_GUEST.read_bytes(), **params)
    assert uploaded.status_code == 201, uploaded.text
    record = uploaded.json()
    assert (record["allowed_hosts"], record["http_max_concurrency"]) == ([origin], None)
    manifest = json.loads((workspace.tenants / "t" / "manifest.json").read_text())
    assert "http_max_concurrency" not in manifest["modules"]["loop"]
    held = await running.client.post("/t/call", content=f"{origin}/x\0k".encode())
    assert held.text == "calls=6 last=13\n", held.text  # the policy's 5 requests, then 13
    plain = await upload(running.client, "t", "plain", LOOP_GUEST.read_bytes(), route="/p")
    assert (plain.json()["allowed_hosts"], plain.json()["http_max_concurrency"]) == (None, None)


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", " 2", "4294967296", ""])
async def test_a_bad_http_max_concurrency_is_refused_naming_it(
    workspace, start_supervisor, value: str
):
    admin_tenant(workspace, "t")
    running = await start_admin(start_supervisor)
    params = {"route": "/call", "http_max_concurrency": value}
    refused = await upload(running.client, "t", "loop", LOOP_GUEST.read_bytes(), **params)
    assert refused.status_code == 400
    assert error_of(refused).startswith("http_max_concurrency must be an integer from 1 to")
    assert not Path(workspace.tenants / "t" / "manifest.json").exists()
