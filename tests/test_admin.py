"""The admin API as its users see it: each endpoint, each refusal, auth, concurrency, restarts.

Every test starts the production assembly over a temp tenants folder and talks HTTP to it.
A tenant is made with `admin_tenant`; its token is `token_of(name)`, the operator's is
`OPERATOR_TOKEN`. The helpers here are shared with the other test_admin_*.py files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import httpx
import pytest
import trio
from conftest import GUESTS, Running, Workspace

from supervisor import cli, store
from supervisor.admin import MAX_UPLOADS_IN_PROGRESS, UPLOAD_RETRY_AFTER_S
from supervisor.auth import token_sha256
from supervisor.client import AdminClient, Progress

OPERATOR_TOKEN = "operator-token-for-the-tests"
API = "/_admin/v1"
MiB = 1024 * 1024


def token_of(tenant: str) -> str:
    return f"{tenant}-admin-token-for-tests"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


OPERATOR = bearer(OPERATOR_TOKEN)


def module_url(tenant: str, name: str) -> str:
    return f"{API}/tenants/{tenant}/modules/{name}"


def admin_tenant(workspace: Workspace, name: str, policy: str = "", routes=None) -> Path:
    """A tenant whose policy carries the sha256 of `token_of(name)`."""
    text = f'admin_token_sha256 = "{token_sha256(token_of(name))}"\n{policy}'
    return workspace.add_tenant(name, routes, text)


def greeter(text: str, *, functions: int = 0) -> bytes:
    """WAT of a guest answering `text` (one line); `functions` more add compile time."""
    out = f"content-type: text/plain\n\n{text}\n"
    data = out.replace("\n", "\\n")  # WAT string escape
    body = " ".join(
        f"(local.set $a (i32.add (i32.mul (local.get $a) (i32.const {i * 7 + 3}))"
        f" (i32.xor (local.get $b) (i32.const {i}))))"
        for i in range(40)
    )
    extra = "\n".join(
        f'(func (export "f{i}") (param $a i32) (param $b i32) (result i32) {body} (local.get $a))'
        for i in range(functions)
    )
    return f"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{data}")
  {extra}
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {len(out)}))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
""".encode()


async def start_admin(start_supervisor, **overrides) -> Running:
    return await start_supervisor(admin_token_sha256=token_sha256(OPERATOR_TOKEN), **overrides)


async def upload(
    client: httpx.AsyncClient,
    tenant: str,
    name: str,
    source: bytes,
    *,
    token: str = OPERATOR_TOKEN,
    **params: str,
) -> httpx.Response:
    return await client.put(
        module_url(tenant, name), content=source, params=params, headers=bearer(token)
    )


def error_of(response: httpx.Response) -> str:
    document = response.json()
    assert document["status"] == response.status_code
    return document["error"]


# Upload, list, show: the happy path.


async def test_upload_answers_201_with_the_record_and_the_next_request_serves_it(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    source = greeter("hi from upload")
    response = await upload(running.client, "acme", "hello", source, route="/hello")
    assert response.status_code == 201, response.text
    record = response.json()
    binary = (workspace.tenants / "acme" / "modules" / f"{record['sha256']}.wasm").read_bytes()
    assert record["sha256"] == hashlib.sha256(binary).hexdigest()
    assert record["size"] == len(binary)
    assert (record["name"], record["route"], record["entrypoint"]) == ("hello", "/hello", "_start")
    assert record["routes"] == ["/hello"] and record["previous"] is None
    assert record["compile_s"] > 0 and record["uploaded_at"].endswith("Z")
    assert response.headers["location"] == module_url("acme", "hello")
    served = await running.client.get("/acme/hello")
    assert (served.status_code, served.text) == (200, "hi from upload\n")


async def test_list_and_show_give_each_modules_record(workspace, start_supervisor):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    for name in ("b-mod", "a.mod"):
        assert (
            await upload(running.client, "acme", name, greeter(name), route=f"/{name}")
        ).is_success
    listing = await running.client.get(f"{API}/tenants/acme/modules", headers=OPERATOR)
    assert listing.status_code == 200
    modules = listing.json()["modules"]
    assert [module["name"] for module in modules] == ["a.mod", "b-mod"]
    assert {"sha256", "size", "routes", "uploaded_at", "compile_s"} <= set(modules[0])
    shown = await running.client.get(module_url("acme", "b-mod"), headers=OPERATOR)
    assert shown.json() == modules[1]
    missing = await running.client.get(module_url("acme", "nope"), headers=OPERATOR)
    assert missing.status_code == 404 and "nope" in error_of(missing)


async def test_a_module_with_routes_export_lists_and_serves_every_route(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    source = (GUESTS / "routes.wat").read_bytes()
    response = await upload(running.client, "acme", "multi", source, route="/r")
    assert sorted(response.json()["routes"]) == ["/r", "/r/a", "/r/b/..."]
    assert (await running.client.get("/acme/r/b/x")).text == "from alt_b\n"


async def test_argv_entrypoint_and_volumes_come_from_the_query(workspace, start_supervisor):
    folder = admin_tenant(workspace, "acme")
    (folder / "static").mkdir()
    running = await start_admin(start_supervisor)
    entry = await upload(
        running.client,
        "acme",
        "entry",
        (GUESTS / "entry.wat").read_bytes(),
        route="/entry",
        entrypoint="alt",
    )
    assert entry.json()["entrypoint"] == "alt"
    assert (await running.client.get("/acme/entry")).text == "from alt\n"
    argv = await running.client.put(
        module_url("acme", "argv"),
        content=(GUESTS / "argv.wat").read_bytes(),
        params=[("route", "/argv"), ("argv", "x ${ARGS}"), ("volume", "/data=static")],
        headers=OPERATOR,
    )
    assert argv.status_code == 201, argv.text
    assert argv.json()["volumes"] == {"/data": "static"}
    assert (await running.client.get("/acme/argv?a&b")).text.splitlines()[-3:] == ["x", "a", "b"]


# Versions: replace, rollback, delete.


async def test_a_new_version_keeps_the_previous_one_and_rollback_swaps_them(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    first = (await upload(running.client, "acme", "m", greeter("one"), route="/m")).json()
    # No query: the new version keeps the settings of the one it replaces.
    second = (await upload(running.client, "acme", "m", greeter("two"))).json()
    assert second["route"] == "/m" and second["previous"]["sha256"] == first["sha256"]
    assert (await running.client.get("/acme/m")).text == "two\n"

    back = await running.client.post(module_url("acme", "m") + "/rollback", headers=OPERATOR)
    assert back.status_code == 200
    assert (back.json()["sha256"], back.json()["previous"]["sha256"]) == (
        first["sha256"],
        second["sha256"],
    )
    assert (await running.client.get("/acme/m")).text == "one\n"
    # A second rollback undoes the first.
    await running.client.post(module_url("acme", "m") + "/rollback", headers=OPERATOR)
    assert (await running.client.get("/acme/m")).text == "two\n"


async def test_the_same_upload_twice_makes_no_new_version(workspace, start_supervisor):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    await upload(running.client, "acme", "m", greeter("one"), route="/m")
    second = await upload(running.client, "acme", "m", greeter("two"), route="/m")
    again = await upload(running.client, "acme", "m", greeter("two"), route="/m")
    assert again.status_code == 200
    assert again.json()["previous"] == second.json()["previous"]


async def test_rollback_without_a_previous_version_is_409(workspace, start_supervisor):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    await upload(running.client, "acme", "m", greeter("one"), route="/m")
    response = await running.client.post(module_url("acme", "m") + "/rollback", headers=OPERATOR)
    assert response.status_code == 409 and "no previous version" in error_of(response)
    never = await running.client.post(module_url("acme", "x") + "/rollback", headers=OPERATOR)
    assert never.status_code == 404


async def test_delete_stops_serving_and_rollback_brings_the_module_back(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    sha = (await upload(running.client, "acme", "m", greeter("one"), route="/m")).json()["sha256"]
    deleted = await running.client.delete(module_url("acme", "m"), headers=OPERATOR)
    assert (deleted.status_code, deleted.json()["sha256"]) == (200, sha)
    assert (await running.client.get("/acme/m")).status_code == 404
    assert (await running.client.get(module_url("acme", "m"), headers=OPERATOR)).status_code == 404
    listing = await running.client.get(f"{API}/tenants/acme/modules", headers=OPERATOR)
    assert listing.json()["modules"] == []

    back = await running.client.post(module_url("acme", "m") + "/rollback", headers=OPERATOR)
    assert (back.status_code, back.json()["sha256"]) == (200, sha)
    assert (await running.client.get("/acme/m")).text == "one\n"
    again = await running.client.delete(module_url("acme", "nope"), headers=OPERATOR)
    assert again.status_code == 404


async def test_a_rollback_that_would_take_another_modules_route_is_409(workspace, start_supervisor):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    await upload(running.client, "acme", "a", greeter("a"), route="/x")
    await running.client.delete(module_url("acme", "a"), headers=OPERATOR)
    await upload(running.client, "acme", "b", greeter("b"), route="/x")
    response = await running.client.post(module_url("acme", "a") + "/rollback", headers=OPERATOR)
    assert response.status_code == 409 and "module 'b'" in error_of(response)
    assert (await running.client.get("/acme/x")).text == "b\n"


async def test_module_files_no_version_names_are_removed(workspace, start_supervisor):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    shas = [
        (await upload(running.client, "acme", "m", greeter(text), route="/m")).json()["sha256"]
        for text in ("one", "two", "three")
    ]
    files = {path.name for path in (workspace.tenants / "acme" / "modules").iterdir()}
    assert files == {f"{sha}.wasm" for sha in shas[1:]}  # current and previous only


# The tenant: policy in force and usage.


async def test_tenant_shows_the_policy_in_force_and_its_usage(workspace, start_supervisor):
    admin_tenant(workspace, "acme", "timeout_ms = 1234\n")
    running = await start_admin(start_supervisor)
    await upload(running.client, "acme", "m", greeter("one"), route="/m")
    for _ in range(3):
        assert (await running.client.get("/acme/m")).status_code == 200
    response = await running.client.get(f"{API}/tenants/acme", headers=bearer(token_of("acme")))
    document = response.json()
    assert document["policy"]["timeout_ms"] == 1234
    assert document["policy"]["admin_token_set"] is True
    usage = document["usage"]
    assert (usage["requests"], usage["modules"], usage["in_flight"]) == (3, 1, 0)
    assert usage["fuel_used"] > 0
    assert token_sha256(token_of("acme")) not in response.text
    assert document["load_error"] is None


# Validation: each refusal is a 4xx whose message names the problem.

NOT_WASI = b'(module (import "env" "host_call" (func)) (func (export "_start")))'
INVALID = b'(module (memory (export "memory") 1) (func (export "_start") (i32.add) (drop)))'
COMPONENT = b"\0asm\x0d\x00\x01\x00"
HELLO = greeter("hello")


@pytest.mark.parametrize(
    ("source", "params", "status", "message"),
    [
        (b"hello, world", {}, 422, "not a WebAssembly module"),
        (b"", {}, 422, "not a WebAssembly module"),
        (b"(module (func", {}, 422, "invalid WebAssembly text"),
        (INVALID, {}, 422, "invalid WebAssembly module"),
        (COMPONENT, {}, 422, "component, not a core module"),
        (NOT_WASI, {}, 422, "env.host_call"),
        (HELLO, {"entrypoint": "nope"}, 422, "exports no function 'nope'"),
        ((GUESTS / "big_initial_memory.wat").read_bytes(), {}, 422, "initial memory"),
        ((GUESTS / "bad_routes.wat").read_bytes(), {}, 422, "_routes line 2"),
        (HELLO, {"route": "no-slash"}, 400, "must start with '/'"),
        (HELLO, {"route": "/a b"}, 400, "whitespace"),
        (HELLO, {"colour": "red"}, 400, "unknown query parameter 'colour'"),
        (HELLO, {"volume": "/data"}, 400, "GUEST_PATH=FOLDER"),
        (HELLO, {"volume": "/data=../up"}, 400, '".."'),
        (HELLO, {"volume": "/data=missing"}, 422, "'missing' is not a folder"),
        (HELLO, {"argv": "  "}, 400, "argv must not be empty"),
    ],
)
async def test_upload_refusals_name_the_problem(
    workspace, start_supervisor, source, params, status, message
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    response = await upload(running.client, "acme", "m", source, **{"route": "/m", **params})
    assert response.status_code == status, response.text
    assert message in error_of(response)
    listing = await running.client.get(f"{API}/tenants/acme/modules", headers=OPERATOR)
    assert listing.json()["modules"] == []


@pytest.mark.parametrize("name", ["Upper", "-dash", ".dot", "a" * 65, "sp%20ace", "a/b"])
async def test_a_name_outside_the_pattern_is_400(workspace, start_supervisor, name):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    response = await upload(running.client, "acme", name, HELLO, route="/m")
    assert response.status_code in (400, 404)
    if response.status_code == 400:
        assert "invalid module name" in error_of(response)
    else:  # a "/" in the name makes another path, which no endpoint has
        assert name == "a/b"


async def test_a_route_modules_toml_serves_is_409(workspace, start_supervisor):
    admin_tenant(workspace, "acme", routes={"/hello": "hello.wat"})
    running = await start_admin(start_supervisor)
    response = await upload(running.client, "acme", "m", greeter("x"), route="/hello")
    assert response.status_code == 409 and "modules.toml" in error_of(response)
    assert (await running.client.get("/acme/hello")).text == "hello from wasm\n"


async def test_a_route_another_module_serves_is_409_also_through_routes_export(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    await upload(running.client, "acme", "a", greeter("a"), route="/q/a")
    taken = await upload(running.client, "acme", "b", greeter("b"), route="/q/a")
    assert taken.status_code == 409 and "module 'a'" in error_of(taken)
    # `_routes` of this module adds /q/a: only the dry run before the commit can see it.
    routes = await upload(
        running.client, "acme", "r", (GUESTS / "routes.wat").read_bytes(), route="/q"
    )
    assert routes.status_code == 409 and "'/q/a'" in error_of(routes)
    assert (await running.client.get("/acme/q/a")).text == "a\n"


async def test_over_max_modules_is_409_but_a_new_version_is_not_a_new_module(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme", "max_modules = 1\n")
    running = await start_admin(start_supervisor)
    assert (await upload(running.client, "acme", "a", greeter("a"), route="/a")).status_code == 201
    second = await upload(running.client, "acme", "b", greeter("b"), route="/b")
    assert second.status_code == 409 and "max_modules (1)" in error_of(second)
    assert (await upload(running.client, "acme", "a", greeter("a2"))).status_code == 201


async def test_a_missing_route_for_a_new_module_is_400(workspace, start_supervisor):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    response = await upload(running.client, "acme", "m", HELLO)
    assert response.status_code == 400 and "'route' is required" in error_of(response)


async def test_a_body_over_max_module_bytes_is_refused_while_it_streams(
    workspace, start_supervisor
):
    """A chunked body has no length up front: the server counts as it reads and answers 413
    once past the limit, long before the client is done (it never buffers the whole)."""
    admin_tenant(workspace, "acme", 'max_module_bytes = "64KiB"\n')
    running = await start_admin(start_supervisor)
    total = 256 * MiB
    chunk = 64 * 1024
    stream = await trio.open_tcp_stream("127.0.0.1", running.app.port)
    head = (
        f"PUT {module_url('acme', 'big')}?route=/big HTTP/1.1\r\nhost: x\r\n"
        f"authorization: Bearer {OPERATOR_TOKEN}\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    sent = 0

    async def send_body() -> None:
        nonlocal sent
        frame = b"%x\r\n%s\r\n" % (chunk, b"\0" * chunk)
        try:
            while sent < total:
                await stream.send_all(frame)
                sent += chunk
        except trio.BrokenResourceError:
            pass

    async with stream:
        await stream.send_all(head.encode())
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_body)
                answer = await stream.receive_some(65536)
                nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"65536 bytes" in answer
    assert sent < total // 8


async def test_a_content_length_over_max_module_bytes_is_refused_before_the_body(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme", 'max_module_bytes = "64KiB"\n')
    running = await start_admin(start_supervisor)
    head = (
        f"PUT {module_url('acme', 'big')}?route=/big HTTP/1.1\r\nhost: x\r\n"
        f"authorization: Bearer {OPERATOR_TOKEN}\r\ncontent-length: {100 * MiB}\r\n"
        "expect: 100-continue\r\n\r\n"
    )
    async with await trio.open_tcp_stream("127.0.0.1", running.app.port) as stream:
        await stream.send_all(head.encode())
        with trio.fail_after(10):
            answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 413 ")  # no "100 Continue": the body never comes


async def test_uploads_waiting_for_their_body_are_bounded_then_503_with_retry_after(
    workspace, start_supervisor
):
    """Bodies are held in memory until compiled, so only MAX_UPLOADS_IN_PROGRESS uploads are
    taken at once; here slow clients hold every place by never finishing their body."""
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    head = (
        f"PUT {module_url('acme', 'slow')}?route=/slow HTTP/1.1\r\nhost: x\r\n"
        f"authorization: Bearer {OPERATOR_TOKEN}\r\ntransfer-encoding: chunked\r\n\r\n"
        "4\r\n\0asm\r\n"
    )
    slow: list[trio.SocketStream] = []

    async def hold_a_place() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", running.app.port)
        slow.append(stream)
        await stream.send_all(head.encode())

    try:
        for _ in range(MAX_UPLOADS_IN_PROGRESS):
            await hold_a_place()
        with trio.fail_after(10):
            while True:  # until the server has taken all the slow ones in
                busy = await upload(running.client, "acme", "quick", HELLO, route="/quick")
                if busy.status_code == 503:
                    break
                assert busy.status_code in (200, 201)
                # That upload held a place for a moment: a slow one whose head the server
                # read meanwhile was turned away, so send one more.
                await hold_a_place()
        assert busy.headers["retry-after"] == str(UPLOAD_RETRY_AFTER_S)
        assert "uploads are in progress" in error_of(busy)
    finally:
        for stream in slow:
            await stream.aclose()
    with trio.fail_after(10):
        while (
            await upload(running.client, "acme", "after", HELLO, route="/after")
        ).status_code == 503:
            await trio.sleep(0.01)


# Auth: operator, own tenant, other tenant, no token, wrong token.


@pytest.mark.parametrize(
    ("headers", "tenant", "status"),
    [
        (OPERATOR, "acme", 200),
        (OPERATOR, "beta", 200),
        (bearer(token_of("acme")), "acme", 200),
        (bearer(token_of("acme")), "beta", 403),
        (bearer(token_of("beta")), "acme", 403),
        ({}, "acme", 401),
        (bearer("not-a-token-of-anyone"), "acme", 401),
        ({"authorization": f"Basic {OPERATOR_TOKEN}"}, "acme", 401),
        (bearer(token_of("acme")), "nobody", 403),
        (OPERATOR, "nobody", 404),
    ],
)
async def test_who_may_do_what(workspace, start_supervisor, headers, tenant, status):
    admin_tenant(workspace, "acme")
    admin_tenant(workspace, "beta")
    running = await start_admin(start_supervisor)
    for method, path in (
        ("GET", f"{API}/tenants/{tenant}"),
        ("GET", f"{API}/tenants/{tenant}/modules"),
        ("PUT", module_url(tenant, "m") + "?route=/m"),
    ):
        response = await running.client.request(method, path, headers=headers, content=HELLO)
        expected = 201 if (method, status) == ("PUT", 200) else status
        assert response.status_code == expected, (method, path, response.text)
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_tokens_never_appear_in_the_logs(workspace, start_supervisor, caplog):
    caplog.set_level(logging.DEBUG)
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    secrets = [OPERATOR_TOKEN, token_of("acme"), "a-wrong-token-0123456789"]
    for token in secrets:
        await upload(running.client, "acme", "m", greeter(token[:4]), route="/m", token=token)
        await running.client.get(f"{API}/tenants/acme", headers=bearer(token))
    admin_lines = [record for record in caplog.records if record.name == "supervisor.admin"]
    assert len(admin_lines) == 6
    for record in caplog.records:
        text = record.getMessage() + json.dumps(vars(record), default=str)
        assert not any(secret in text for secret in secrets), text


async def test_openapi_needs_no_token_and_other_paths_and_methods_answer_json(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    document = await running.client.get(f"{API}/openapi.json")
    assert document.status_code == 200 and document.json()["openapi"].startswith("3.")
    unknown = await running.client.get("/_admin/v2/anything", headers=OPERATOR)
    assert unknown.status_code == 404 and "no admin endpoint" in error_of(unknown)
    patch = await running.client.patch(module_url("acme", "m"), headers=OPERATOR)
    assert patch.status_code == 405 and patch.headers["allow"] == "GET, PUT, DELETE"


async def test_admin_paths_are_never_a_tenants_even_by_host(workspace, start_supervisor):
    admin_tenant(workspace, "acme", 'hosts = ["acme.example"]\n', routes={"/...": "echo.wat"})
    running = await start_admin(start_supervisor)
    response = await running.client.get(
        f"{API}/tenants/acme", headers={"host": "acme.example", **OPERATOR}
    )
    assert response.json()["name"] == "acme"


# Concurrency and restarts.


async def test_concurrent_uploads_to_one_tenant_leave_a_consistent_manifest(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    answers: dict[str, httpx.Response] = {}
    versions = 3
    distinct = MAX_UPLOADS_IN_PROGRESS - versions  # all of them in progress at once

    async def send(name: str, text: str) -> None:
        route = f"/{name}"
        answers[text] = await upload(running.client, "acme", name, greeter(text), route=route)

    async with trio.open_nursery() as nursery:
        for index in range(distinct):
            nursery.start_soon(send, f"m{index}", f"text {index}")
        for index in range(versions):  # versions of one module at once
            nursery.start_soon(send, "same", f"same {index}")
    assert {answer.status_code for answer in answers.values()} == {201}
    manifest = store.read_manifest(workspace.tenants / "acme")
    assert set(manifest.modules) == {f"m{index}" for index in range(distinct)} | {"same"}
    for index in range(distinct):
        assert (await running.client.get(f"/acme/m{index}")).text == f"text {index}\n"
    # The versions of "same" form one history: the last one served, the one before it kept.
    same = manifest.modules["same"]
    served = (await running.client.get("/acme/same")).text.strip()
    assert answers[served].json()["sha256"] == same.current.sha256
    assert same.previous is not None and same.previous.sha256 != same.current.sha256
    on_disk = {path.name for path in (workspace.tenants / "acme" / "modules").iterdir()}
    assert on_disk == {f"{sha}.wasm" for sha in manifest.referenced()}


async def test_uploads_compile_once_and_a_restart_loads_the_artifact(workspace, start_supervisor):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    cache = running.app.registry.cache
    source = greeter("warm", functions=40)
    response = await upload(running.client, "acme", "m", source, route="/m")
    assert response.status_code == 201
    # Compiled once by the upload; its first request loaded the artifact.
    assert (await running.client.get("/acme/m")).text == "warm\n"
    assert (cache.misses, cache.hits) == (1, 1)
    running.app.shutdown.set()

    restarted = await start_admin(start_supervisor)
    restarted_cache = restarted.app.registry.cache
    assert (restarted_cache.misses, restarted_cache.hits) == (0, 0)  # nothing loads at start
    assert (await restarted.client.get("/acme/m")).text == "warm\n"
    assert (restarted_cache.misses, restarted_cache.hits) == (0, 1)


async def test_a_restart_loads_a_stored_modules_artifact_without_reading_the_module(
    workspace, start_supervisor
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    source = greeter("warm", functions=40)
    assert (await upload(running.client, "acme", "m", source, route="/m")).status_code == 201
    running.app.shutdown.set()
    # The store file is named by its verified digest: the restart finds the artifact by that
    # name and never opens the file, so even a damaged copy cannot change what is served.
    (stored,) = (workspace.tenants / "acme" / "modules").glob("*.wasm")
    stored.write_bytes(b"\0asm not what the name says")

    restarted = await start_admin(start_supervisor)
    cache = restarted.app.registry.cache
    assert (await restarted.client.get("/acme/m")).text == "warm\n"
    assert (cache.misses, cache.hits) == (0, 1)


# The command-line client.


class Terminal(io.StringIO):
    """A stream that says it is a terminal, so the progress bar draws into it."""

    def isatty(self) -> bool:
        return True


async def wasm_supervisor(*argv: str) -> int:
    """`wasm-supervisor ARGV` in a worker thread (its httpx client blocks)."""
    return await trio.to_thread.run_sync(cli.main, list(argv))


async def test_the_cli_uploads_lists_shows_rolls_back_and_deletes(
    workspace, start_supervisor, monkeypatch, capsys, tmp_path
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    monkeypatch.setenv("SUPERVISOR_SERVER", running.url)
    monkeypatch.setenv("SUPERVISOR_ADMIN_TOKEN", token_of("acme"))
    first, second = tmp_path / "one.wat", tmp_path / "two.wat"
    first.write_bytes(greeter("one"))
    second.write_bytes(greeter("two"))

    assert await wasm_supervisor("upload", "acme", "hello", str(first), "--route", "/hello") == 0
    assert capsys.readouterr().out.startswith("uploaded acme/hello sha256:")
    assert await wasm_supervisor("upload", "acme", "hello", str(second)) == 0
    assert capsys.readouterr().out.startswith("uploaded acme/hello")
    assert (await running.client.get("/acme/hello")).text == "two\n"

    assert await wasm_supervisor("modules", "list", "acme") == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:2] == ["NAME", "SHA256"] and listing[1].endswith("/hello")
    assert await wasm_supervisor("modules", "show", "acme", "hello") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["previous"]["sha256"] != shown["sha256"]

    assert await wasm_supervisor("modules", "rollback", "acme", "hello") == 0
    assert (await running.client.get("/acme/hello")).text == "one\n"
    assert await wasm_supervisor("modules", "delete", "acme", "hello") == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("deleted acme/hello")
    assert (await running.client.get("/acme/hello")).status_code == 404


async def test_the_cli_says_why_it_failed_and_exits_1(
    workspace, start_supervisor, monkeypatch, capsys
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    monkeypatch.setenv("SUPERVISOR_SERVER", running.url)
    monkeypatch.delenv("SUPERVISOR_ADMIN_TOKEN", raising=False)
    assert await wasm_supervisor("modules", "list", "acme", "--token", "wrong-token") == 1
    assert capsys.readouterr().err == "error: 401: the admin token is not valid\n"
    assert await wasm_supervisor("modules", "show", "acme", "x", "--token", OPERATOR_TOKEN) == 1
    assert "error: 404: tenant 'acme' has no module 'x'" in capsys.readouterr().err
    closed = "http://127.0.0.1:9"  # discard port: nothing listens there
    assert await wasm_supervisor("modules", "list", "acme", "--server", closed) == 1
    assert capsys.readouterr().err.startswith(f"error: {closed}:")


async def test_the_upload_progress_bar_fills_then_counts_compile_seconds(
    workspace, start_supervisor, tmp_path
):
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)
    path = tmp_path / "big.wat"
    path.write_bytes(greeter("big", functions=200))  # several 256 KiB writes
    terminal = Terminal()

    def send() -> dict:
        with AdminClient(running.url, OPERATOR_TOKEN) as client:
            record, _ = client.upload("acme", "big", path, route="/big", progress_stream=terminal)
        return record

    record = await trio.to_thread.run_sync(send)
    assert record["name"] == "big"
    frames = terminal.getvalue().split("\r\x1b[K")
    bars = [frame for frame in frames if frame.startswith("uploading [")]
    assert len(bars) >= 3 and "[" + "#" * 30 + "]" in bars[-1]
    assert "validating and compiling" in bars[-1]
    assert frames[-1] == ""  # the line is cleared once the answer is in
    assert not Progress(1, io.StringIO()).enabled  # not a terminal: nothing drawn
