"""Every rule of WAGI.md through a real server: what a guest is handed, what a client gets.

The request half is read back through the demo's `echo.wat` (body, `---`, then every
environment variable) and `argv.wat`; the response half through one-behaviour guests of
`tests/guests/`. Two behaviours no shared guest has (an explicit `Status` beside `Location`,
and an attempt to write into a volume) use small guests written out by this file.
"""

from __future__ import annotations

import shutil

import httpx
import pytest
from conftest import DEMO, printing_guest
from test_wagi import CGI_VARIABLES

TENANT_ENV_ONLY = {"GREETING"}
"""Variables of the tests' tenant `[env]` that no request sets."""


def echoed(response: httpx.Response) -> tuple[bytes, dict[str, str]]:
    """`echo.wat`'s output split into the body it read and the environment it was given."""
    assert response.status_code == 200, response.text
    body, separator, env_text = response.content.rpartition(b"\n---\n")
    assert separator, response.content
    env: dict[str, str] = {}
    for line in env_text.decode().splitlines():
        name, _, value = line.partition("=")
        assert name not in env, f"{name} given twice"
        env[name] = value
    return body, env


def argv_of(response: httpx.Response) -> list[str]:
    """`argv.wat` prints one argument a line."""
    assert response.status_code == 200, response.text
    return response.text.splitlines()


def add_guest(workspace, tenant: str, route: str, name: str, wat: str) -> None:
    """Write a guest of this file into a tenant made by `add_tenant` and route to it."""
    folder = workspace.tenants / tenant
    (folder / name).write_text(wat)
    with (folder / "modules.toml").open("a") as modules:
        modules.write(f'\n[[module]]\nroute = "{route}"\nmodule = "{name}"\n')


# Tries to create `new.txt` and to truncate `about.txt` in its first preopen (fd 3), and says
# for each whether path_open refused ("refused") or gave it a file ("opened").
VOLUME_WRITER_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "content-type: text/plain\\n\\n")  ;; 26 bytes
  (data (i32.const 128) "new.txt")                        ;; 7
  (data (i32.const 160) "about.txt")                      ;; 9
  (data (i32.const 192) "refused\\n")                     ;; 8
  (data (i32.const 208) "opened\\n")                      ;; 7
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  ;; oflags: 1 = creat, 8 = trunc; rights: 64 = fd_write.
  (func $try_open (param $path i32) (param $len i32) (param $oflags i32)
    (if (call $path_open (i32.const 3) (i32.const 0) (local.get $path) (local.get $len)
                         (local.get $oflags) (i64.const 64) (i64.const 0) (i32.const 0)
                         (i32.const 12))
      (then (call $print (i32.const 192) (i32.const 8)))
      (else (call $print (i32.const 208) (i32.const 7)))))
  (func (export "_start")
    (call $print (i32.const 64) (i32.const 26))
    (call $try_open (i32.const 128) (i32.const 7) (i32.const 1))
    (call $try_open (i32.const 160) (i32.const 9) (i32.const 8))))
"""


# Request → guest: the environment.


async def test_environment_holds_every_wagi_variable(workspace, start_supervisor):
    workspace.add_tenant(
        "t",
        {"/echo/...": "echo.wat", "/exact": "echo.wat"},
        policy='[env]\nGREETING = "hi"\n',
    )
    running = await start_supervisor()
    port = running.app.port
    response = await running.client.get(
        "/t/echo/a%20b/c?x=1&y=%20",
        headers=[
            ("x-custom", "custom value"),
            ("x-dup", "first"),
            ("x-dup", "last"),
            ("authorization", "Bearer secret-token"),
        ],
    )
    body, env = echoed(response)
    assert body == b""
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SCRIPT_NAME"] == "/t/echo"
    assert env["PATH_INFO"] == "/a b/c"
    assert env["X_RAW_PATH_INFO"] == "/a%20b/c"
    assert env["PATH_TRANSLATED"] == "/a b/c"
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["X_MATCHED_ROUTE"] == "/echo/..."
    assert env["X_FULL_URL"] == f"http://127.0.0.1:{port}/t/echo/a%20b/c?x=1&y=%20"
    assert env["X_BASE_PATH"] == "/t"
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("127.0.0.1", str(port))
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["SERVER_SOFTWARE"] == "WAGI/1"
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1"
    assert env["REMOTE_ADDR"] == env["REMOTE_HOST"] == "127.0.0.1"
    assert env["AUTH_TYPE"] == env["REMOTE_USER"] == ""
    assert env["CONTENT_LENGTH"] == "0"
    assert env["CONTENT_TYPE"] == ""
    assert env["HTTP_X_CUSTOM"] == "custom value"
    assert env["HTTP_X_DUP"] == "last"
    assert env["HTTP_HOST"] == f"127.0.0.1:{port}"
    assert env["GREETING"] == "hi"
    # Credentials and hop-by-hop headers stay with the gateway; nothing of the host's own
    # environment (PATH, HOME, ...) reaches the guest.
    assert "HTTP_AUTHORIZATION" not in env and "HTTP_CONNECTION" not in env
    assert "secret-token" not in response.text
    others = {name for name in env if not name.startswith("HTTP_")}
    assert others == CGI_VARIABLES | TENANT_ENV_ONLY

    _, exact = echoed(await running.client.get("/t/exact"))
    assert (exact["SCRIPT_NAME"], exact["PATH_INFO"], exact["X_RAW_PATH_INFO"]) == (
        "/t/exact",
        "",
        "",
    )
    assert exact["QUERY_STRING"] == ""
    assert exact["X_MATCHED_ROUTE"] == "/exact"


async def test_content_type_is_passed_on(workspace, start_supervisor):
    """**Choice**: WAGI and Spin send an empty CONTENT_TYPE; this project sends the value."""
    workspace.add_tenant("t", {"/echo": "echo.wat"})
    running = await start_supervisor()
    response = await running.client.post(
        "/t/echo", content=b"{}", headers={"content-type": "application/json"}
    )
    _, env = echoed(response)
    assert env["CONTENT_TYPE"] == "application/json"
    assert env["HTTP_CONTENT_TYPE"] == "application/json"
    assert env["REQUEST_METHOD"] == "POST"


async def test_tenant_env_is_given_but_builtins_win(workspace, start_supervisor):
    workspace.add_tenant(
        "t",
        {"/echo": "echo.wat"},
        policy="""
        [env]
        GREETING = "hi"
        SERVER_SOFTWARE = "spoofed"
        REQUEST_METHOD = "spoofed"
        HTTP_X_FROM = "tenant"
        """,
    )
    running = await start_supervisor()
    _, env = echoed(await running.client.get("/t/echo", headers={"x-from": "request"}))
    assert env["GREETING"] == "hi"
    assert env["SERVER_SOFTWARE"] == "WAGI/1"
    assert env["REQUEST_METHOD"] == "GET"
    assert env["HTTP_X_FROM"] == "request"


# Request → guest: argv and stdin.


async def test_argv_is_the_path_then_the_query_split_on_ampersands(workspace, start_supervisor):
    workspace.add_tenant(
        "t",
        {
            "/argv": "argv.wat",
            "/template": ("argv.wat", {"argv": "${SCRIPT_NAME} --flag ${ARGS}"}),
        },
    )
    running = await start_supervisor()
    client = running.client
    assert argv_of(await client.get("/t/argv")) == ["/t/argv"]
    assert argv_of(await client.get("/t/argv?a=1&b=%20c&d")) == ["/t/argv", "a=1", "b=%20c", "d"]
    assert argv_of(await client.get("/t/template?a=1&b=2")) == [
        "/t/template",
        "--flag",
        "a=1",
        "b=2",
    ]
    assert argv_of(await client.get("/t/template")) == ["/t/template", "--flag"]


async def test_stdin_is_the_whole_body(workspace, start_supervisor):
    workspace.add_tenant("t", {"/echo": "echo.wat"})
    running = await start_supervisor()
    binary = bytes(range(256)) * 4 + b"\r\n\r\n---\n"
    body, env = echoed(await running.client.post("/t/echo", content=binary))
    assert body == binary
    assert env["CONTENT_LENGTH"] == str(len(binary))

    large = bytes(range(251)) * 1000  # several of echo's 64 KiB reads
    body, env = echoed(await running.client.put("/t/echo", content=large))
    assert body == large
    assert (env["CONTENT_LENGTH"], env["REQUEST_METHOD"]) == (str(len(large)), "PUT")


async def test_chunked_body_reaches_stdin_whole(workspace, start_supervisor):
    workspace.add_tenant("t", {"/echo": "echo.wat"})
    running = await start_supervisor()
    pieces = [b"first,", b"", b"second," * 1000, b"third"]

    async def stream():
        for piece in pieces:
            yield piece

    response = await running.client.post("/t/echo", content=stream())
    assert response.request.headers["transfer-encoding"] == "chunked"
    body, env = echoed(response)
    assert body == b"".join(pieces)
    assert env["CONTENT_LENGTH"] == str(len(body))


# Routing.


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "OPTIONS"])
async def test_healthz_answers_any_method_and_cannot_be_overridden(
    workspace, start_supervisor, method
):
    workspace.add_tenant("acme", {"/...": "hello.wat"}, policy='hosts = ["acme.example.com"]\n')
    running = await start_supervisor()
    for headers in ({}, {"host": "acme.example.com"}):
        response = await running.client.request(method, "/healthz", headers=headers)
        assert (response.status_code, response.text) == (200, "OK\n")
    # The catch-all route does serve everything else on that host.
    other = await running.client.get("/healthz2", headers={"host": "acme.example.com"})
    assert other.text == "hello from wasm\n"


async def test_most_specific_route_wins_whatever_the_file_order(workspace, start_supervisor):
    workspace.add_tenant(
        "t",
        {
            "/api/exact": ("entry.wat", {"entrypoint": "alt"}),  # "from alt"
            "/api/...": "entry.wat",  # "from _start"
            "/...": "hello.wat",  # "hello from wasm"
        },
    )
    running = await start_supervisor()
    expected = {
        "/t/api/exact": "from alt\n",
        "/t/api/exact?q=1": "from alt\n",  # the query plays no part in routing
        "/t/api/exact/": "from _start\n",  # a trailing slash is another path
        "/t/api/exact/more": "from _start\n",
        "/t/api": "from _start\n",
        "/t/api/": "from _start\n",
        "/t/api/any/thing": "from _start\n",
        "/t/apix": "hello from wasm\n",  # `/api/...` is a path prefix, not a string prefix
        "/t/": "hello from wasm\n",
        "/t": "hello from wasm\n",
        "/t/elsewhere": "hello from wasm\n",
    }
    for path, text in expected.items():
        response = await running.client.get(path)
        assert (path, response.status_code, response.text) == (path, 200, text)


async def test_exact_route_trailing_slash_and_query(workspace, start_supervisor):
    workspace.add_tenant("t", {"/hello": "hello.wat"})
    running = await start_supervisor()
    assert (await running.client.get("/t/hello")).status_code == 200
    assert (await running.client.get("/t/hello?x=1&y=2")).status_code == 200
    assert (await running.client.get("/t/hello/")).status_code == 404
    assert (await running.client.get("/t/hello/x")).status_code == 404
    assert (await running.client.get("/t/hellox")).status_code == 404
    for method in ("POST", "PUT", "PATCH", "DELETE"):  # any method matches
        assert (await running.client.request(method, "/t/hello")).status_code == 200


async def test_routes_export_adds_routes_under_the_module_base(workspace, start_supervisor):
    workspace.add_tenant("t", {"/r": "routes.wat"})
    running = await start_supervisor()
    expected = {
        "/t/r": (200, "from _start\n"),
        "/t/r/a": (200, "from alt_a\n"),
        "/t/r/b": (200, "from alt_b\n"),
        "/t/r/b/deeper": (200, "from alt_b\n"),
        "/t/r/a/deeper": (404, None),  # `/a` is exact
        "/t/a": (404, None),  # joined onto the base, not the tenant root
    }
    for path, (status, text) in expected.items():
        response = await running.client.get(path)
        assert (path, response.status_code) == (path, status)
        if text is not None:
            assert response.text == text


async def test_routes_export_with_a_malformed_line_refuses_the_module(workspace, start_supervisor):
    workspace.add_tenant("t", {"/r": "bad_routes.wat"})
    running = await start_supervisor()
    # `_routes` runs after the pod is ready (here on the first request that needs a route).
    # The valid first line did not sneak in, nor did the module's own route.
    assert (await running.client.get("/t/r/a")).status_code == 404
    assert (await running.client.get("/t/r")).status_code == 404
    error = running.app.registry.state.errors["t"]
    assert "_routes" in error and "this-line-has-no-export" in error


async def test_route_entrypoint_picks_the_export(workspace, start_supervisor):
    workspace.add_tenant(
        "t", {"/default": "entry.wat", "/alt": ("entry.wat", {"entrypoint": "alt"})}
    )
    running = await start_supervisor()
    assert (await running.client.get("/t/default")).text == "from _start\n"
    assert (await running.client.get("/t/alt")).text == "from alt\n"


# Tenants by Host.


async def test_host_based_tenant_has_root_base_path(workspace, start_supervisor):
    workspace.add_tenant(
        "acme",
        {"/...": "echo.wat", "/app/...": "echo.wat"},
        policy='hosts = ["acme.example.com", "*.acme.example.net"]\n',
    )
    running = await start_supervisor()
    port = running.app.port

    _, root = echoed(await running.client.get("/x/y?q=1", headers={"host": "acme.example.com"}))
    assert root["X_BASE_PATH"] == "/"
    assert root["SCRIPT_NAME"] == "/"
    assert root["PATH_INFO"] == "/x/y"
    assert root["X_MATCHED_ROUTE"] == "/..."
    assert (root["SERVER_NAME"], root["SERVER_PORT"]) == ("acme.example.com", str(port))
    assert root["X_FULL_URL"] == f"http://acme.example.com:{port}/x/y?q=1"

    _, app = echoed(
        await running.client.get("/app/z", headers={"host": "www.acme.example.net:8443"})
    )
    assert app["SCRIPT_NAME"] == "/app"  # no tenant prefix
    assert app["PATH_INFO"] == "/z"
    assert app["X_BASE_PATH"] == "/"
    assert (app["SERVER_NAME"], app["SERVER_PORT"]) == ("www.acme.example.net", "8443")

    _, upper = echoed(await running.client.get("/app", headers={"host": "ACME.Example.COM"}))
    assert upper["SCRIPT_NAME"] == "/app"
    # `*.acme.example.net` covers subdomains only: the bare name falls back to path routing.
    bare = await running.client.get("/app", headers={"host": "acme.example.net"})
    assert bare.status_code == 404
    # By path, the same tenant is still reachable, with its name as the base path.
    _, by_path = echoed(await running.client.get("/acme/app/z"))
    assert (by_path["X_BASE_PATH"], by_path["SCRIPT_NAME"]) == ("/acme", "/acme/app")


# Guest → response.


async def test_repeated_set_cookie_headers_are_all_kept(workspace, start_supervisor):
    workspace.add_tenant("t", {"/": "cookies.wat"})
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert response.status_code == 200
    assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert response.text == "two cookies\n"


async def test_every_buffer_of_a_gather_write_is_written(workspace, start_supervisor):
    workspace.add_tenant("t", {"/": "gather.wat"})
    running = await start_supervisor()
    response = await running.client.get("/t/")
    assert (response.status_code, response.text) == (200, "gathered from three buffers\n")
    assert response.headers["content-type"] == "text/plain"


async def test_location_alone_redirects_and_status_beats_it(workspace, start_supervisor):
    workspace.add_tenant("t", {"/old": "redirect.wat"})
    add_guest(
        workspace,
        "t",
        "/created",
        "created.wat",
        printing_guest(
            b"Location: /t/thing\nStatus: 201 Created\ncontent-type: text/plain\n\nmade it\n"
        ),
    )
    running = await start_supervisor()
    redirect = await running.client.get("/t/old")
    assert redirect.status_code == 302
    assert redirect.headers["location"] == "/demo/hello"
    created = await running.client.get("/t/created")
    assert (created.status_code, created.reason_phrase) == (201, "Created")
    assert created.headers["location"] == "/t/thing"
    assert created.text == "made it\n"
    assert "status" not in created.headers  # consumed, not passed on


async def test_head_request_gets_headers_without_body(workspace, start_supervisor):
    workspace.add_tenant("t", {"/hello": "hello.wat"})
    running = await start_supervisor()
    response = await running.client.head("/t/hello")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-type"] == "text/plain"
    assert response.headers["content-length"] == str(len("hello from wasm\n"))
    # The connection is still in step: the next request gets its own response.
    assert (await running.client.get("/t/hello")).text == "hello from wasm\n"


# Volumes: read-only folders of the tenant.


async def test_volume_is_served_read_only(workspace, start_supervisor):
    folder = workspace.add_tenant(
        "t", {"/site/...": "site.wat"}, policy='[volumes]\n"/static" = "static"\n'
    )
    static = folder / "static"
    shutil.copytree(DEMO / "static", static)
    add_guest(workspace, "t", "/write", "writer.wat", VOLUME_WRITER_WAT)
    before = {path.name: path.read_bytes() for path in static.iterdir()}
    running = await start_supervisor()

    index = await running.client.get("/t/site/")
    assert index.status_code == 200
    assert index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.content == before["index.html"]
    about = await running.client.get("/t/site/about.txt")
    assert about.headers["content-type"] == "text/plain; charset=utf-8"
    assert about.content == before["about.txt"]
    assert (await running.client.get("/t/site/missing.txt")).status_code == 404

    written = await running.client.get("/t/write")
    assert (written.status_code, written.text) == (200, "refused\nrefused\n")
    assert {path.name: path.read_bytes() for path in static.iterdir()} == before
