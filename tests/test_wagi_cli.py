"""`wasm-supervisor wagi`: WAGI 0.8.1's documented commands and its example modules.toml, run
unchanged in a subprocess from the folder holding them, over real HTTP (and HTTPS)."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import DEMO, GUESTS, REPO
from tests.test_lifecycle import child_environment
from tests.test_tls import make_certificate, trusting

STARTUP_TIMEOUT_S = 60.0
POLL_S = 0.02
SERVING = re.compile(r"serving on (?P<scheme>https?)://[^:/\s]+:(?P<port>\d+)")
OUTBOUND_GUEST = REPO / "tests" / "hostile" / "guests" / "outbound_call.wat"

# WAGI 0.8.1's examples/modules.toml, its keys unchanged; our WAT guests stand in for its
# wasm files, under examples/ as in WAGI's repository, run from the folder above.
WAGI_EXAMPLE = """\
default_host = "localhost:3000"

[[module]]
route = "/"
module = "examples/entry.wat"

[[module]]
route = "/hello/..."
module = "examples/entry.wat"

[[module]]
route = "/bar"
module = "examples/entry.wat"
entrypoint = "alt"

[[module]]
route = "/args"
module = "examples/argv.wat"
argv = "${SCRIPT_NAME} one two"

[[module]]
route = "/env"
module = "examples/echo.wat"
volumes = {"/" = "examples"}

[[module]]
route = "/http-example"
module = "examples/outbound_call.wat"
allowed_hosts = ["https://api.brigade.sh"]
http_max_concurrency = 2
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A WAGI app folder: modules.toml, .env and the modules under examples/."""
    examples = tmp_path / "app" / "examples"
    examples.mkdir(parents=True)
    for source in (GUESTS / "entry.wat", GUESTS / "argv.wat", DEMO / "echo.wat", OUTBOUND_GUEST):
        (examples / source.name).write_bytes(source.read_bytes())
    (tmp_path / "app" / "modules.toml").write_text(WAGI_EXAMPLE)
    (tmp_path / "app" / ".env").write_text("# from the file\nFROM_FILE=yes\nK=from-file\n")
    return tmp_path / "app"


def wagi_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli", "wagi", *args]


@asynccontextmanager
async def wagi(
    cwd: Path, args: Sequence[str], env: dict[str, str] | None = None
) -> AsyncIterator[tuple[str, Path]]:
    """Run `wagi ARGS` in `cwd` until it logs where it serves; yield (base URL, log file)."""
    log_path = cwd.parent / "wagi.log"
    with log_path.open("wb") as log_file:
        process = await trio.lowlevel.open_process(
            wagi_command(*args),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            cwd=cwd,
            env=child_environment(env, home=cwd.parent),
        )
    try:
        with trio.fail_after(STARTUP_TIMEOUT_S):
            while not (serving := SERVING.search(log_path.read_text())):
                assert process.poll() is None, log_path.read_text()
                await trio.sleep(POLL_S)
        yield f"{serving['scheme']}://127.0.0.1:{serving['port']}", log_path
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def variables(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.split("---\n", 1)[1].splitlines())


async def test_wagis_documented_command_serves_its_example_unchanged(app_dir: Path):
    args = ["-c", "modules.toml", "-l", "127.0.0.1:0", "-e", "K=V", "Q='quoted'"]
    async with (
        wagi(app_dir, [*args, "--env-file", ".env"]) as (url, log),
        httpx.AsyncClient(base_url=url) as client,
    ):
        for path, body in [
            ("/", "from _start\n"),
            ("/hello/there", "from _start\n"),
            ("/bar", "from alt\n"),
            ("/args", "/args\none\ntwo\n"),
        ]:
            response = await client.get(path)
            assert (path, response.status_code, response.text) == (path, 200, body)
        env = variables((await client.get("/env?x=1")).text)
        # -e wins over --env-file; quotes stripped; served at / (no tenant prefix).
        assert (env["K"], env["Q"], env["FROM_FILE"]) == ("V", "quoted", "yes")
        assert env["X_FULL_URL"] == f"{url}/env?x=1"
        assert env["SCRIPT_NAME"] == "/env"
        # HTTP/1.0 without a Host header: --hostname's default, as in WAGI.
        port = int(url.rsplit(":", 1)[1])
        raw = await raw_get(port, b"GET /env HTTP/1.0\r\n\r\n")
        assert "X_FULL_URL=http://localhost:3000/env\n" in raw
    text = log.read_text()
    assert text.count("default_host: WAGI never reads it; ignored") == 1


async def raw_get(port: int, request: bytes) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        chunks = []
        while chunk := await stream.receive_some(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


async def test_hostname_and_several_env_values_per_flag(app_dir: Path):
    args = ["--config", "modules.toml", "--listen", "127.0.0.1:0", "--hostname", "wagi.test:8080"]
    args += ["--env", "A=1", "B=2", "--env", 'C="3"']
    async with wagi(app_dir, args) as (url, _):
        raw = await raw_get(int(url.rsplit(":", 1)[1]), b"GET /env HTTP/1.0\r\n\r\n")
    assert "X_FULL_URL=http://wagi.test:8080/env\n" in raw
    assert all(line in raw for line in ("\nA=1\n", "\nB=2\n", "\nC=3\n"))


async def test_the_env_file_of_wagis_docs_sets_its_values(app_dir: Path):
    """configuring_and_running.md's env.txt, spaces around `=` and quotes as written there,
    given with `wagi --env-file env.txt`; `export NAME=...` lines as a shell would source."""
    text = 'TEST_NAME = "test value"\nANOTHER_NAME = "another value"\nexport SHELL_STYLE=\'yes\'\n'
    (app_dir / "env.txt").write_text(text)
    args = ["-c", "modules.toml", "-l", "127.0.0.1:0", "--env-file", "env.txt"]
    async with wagi(app_dir, args) as (url, _), httpx.AsyncClient(base_url=url) as client:
        env = variables((await client.get("/env")).text)
    seen = (env["TEST_NAME"], env["ANOTHER_NAME"], env["SHELL_STYLE"])
    assert seen == ("test value", "another value", "yes")


def upstream() -> Iterator[int]:
    """A plain HTTP upstream on 127.0.0.1 answering every GET with 200 `hi`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"hi")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(name="upstream_port")
def upstream_port_fixture() -> Iterator[int]:
    yield from upstream()


async def test_allowed_hosts_is_the_whole_outbound_rule(app_dir: Path, upstream_port: int):
    """No policy to intersect: the module's list lets the guest out, a loopback IP literal
    it names included (the SSRF guard's exact-name exception); others stay refused (7)."""
    allowed = f"http://127.0.0.1:{upstream_port}"
    text = WAGI_EXAMPLE.replace('["https://api.brigade.sh"]', f'["{allowed}"]')
    (app_dir / "modules.toml").write_text(text)
    async with (
        wagi(app_dir, ["-c", "modules.toml", "-l", "127.0.0.1:0"]) as (url, _),
        httpx.AsyncClient(base_url=url) as client,
    ):
        called = await client.post("/http-example", content=f"{allowed}/x\0GET\0\0".encode())
        assert called.text.startswith("req=0 status=200"), called.text
        other = f"http://127.0.0.2:{upstream_port}/x\0GET\0\0".encode()
        refused = await client.post("/http-example", content=other)
        assert refused.text.startswith("req=7"), refused.text


async def test_policy_file_sets_any_key(app_dir: Path):
    (app_dir.parent / "small.toml").write_text('max_request_bytes = 10\n[env]\nP = "p"\n')
    args = ["-c", "modules.toml", "-l", "127.0.0.1:0", "-e", "K=V", "--policy", "../small.toml"]
    async with wagi(app_dir, args) as (url, _), httpx.AsyncClient(base_url=url) as client:
        assert (await client.post("/env", content=b"x" * 11)).status_code == 413
        env = variables((await client.get("/env")).text)
        assert (env["K"], env["P"]) == ("V", "p")


async def test_tls_from_wagis_environment_variables(app_dir: Path):
    cert, key = make_certificate(app_dir.parent)
    env = {"WAGI_TLS_CERT": str(cert), "WAGI_TLS_KEY": str(key)}
    async with (
        wagi(app_dir, ["-c", "modules.toml", "-l", "127.0.0.1:0"], env) as (url, _),
        httpx.AsyncClient(base_url=url, verify=trusting(cert)) as client,
    ):
        assert url.startswith("https://")
        env_seen = variables((await client.get("/env")).text)
        assert env_seen["X_FULL_URL"] == f"{url}/env"


STDERR_GUEST = r"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "oops\tfrom the guest\n")
  (data (i32.const 96) "content-type: text/plain\n\nok\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 20))
    (drop (call $w (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 0) (i32.const 96))
    (i32.store (i32.const 4) (i32.const 29))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""
"""Writes `oops<TAB>from the guest<LF>` (20 bytes) to stderr, then answers `ok`."""


def module_stderr(log_dir: Path, route: str) -> Path:
    """Where WAGI 0.8.1 puts a route's guest stderr: a folder named by the hex SHA-256 of the
    route as written (`RoutingTableEntry::unique_key`), file `module.stderr`."""
    return log_dir / hashlib.sha256(route.encode()).hexdigest() / "module.stderr"


async def test_log_dir_holds_each_routes_guest_stderr_in_its_module_stderr(app_dir: Path):
    (app_dir / "examples" / "stderr.wat").write_text(STDERR_GUEST)
    routes = '[[module]]\nroute = "{}"\nmodule = "examples/stderr.wat"\n'
    (app_dir / "modules.toml").write_text(routes.format("/err") + routes.format("/api/..."))
    (app_dir.parent / "small.toml").write_text("max_stderr_bytes = 8\n")
    logs = app_dir.parent / "logs"
    args = ["-c", "modules.toml", "-l", "127.0.0.1:0", "--log-dir", str(logs)]
    async with wagi(app_dir, args) as (url, _), httpx.AsyncClient(base_url=url) as client:
        for path in ("/err", "/err", "/api/x/y"):
            response = await client.get(path)
            assert (response.status_code, response.text) == (200, "ok\n")
    # Appended per request, byte for byte (not escaped as a log line is), one file per route.
    assert module_stderr(logs, "/err").read_bytes() == b"oops\tfrom the guest\n" * 2
    assert module_stderr(logs, "/api/...").read_bytes() == b"oops\tfrom the guest\n"
    assert "serving on" in (logs / "wagi.log").read_text()  # the server's own log stays
    # Bounded as stderr is: at most the policy's max_stderr_bytes per request.
    args += ["--policy", "../small.toml"]
    async with wagi(app_dir, args) as (url, _), httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/api/")).status_code == 200
    assert module_stderr(logs, "/api/...").read_bytes() == b"oops\tfrom the guest\noops\tfro"


async def test_absolute_volumes_and_file_urls_name_the_operators_own_files(app_dir: Path):
    """As in WAGI: a module given as a `file:` URL (percent-encoded, or with `localhost`), a
    volume folder given as an absolute path or as a path from the working directory."""
    site = app_dir.parent / "elsewhere" / "my site"
    shutil.copytree(DEMO / "static", site / "static")
    shutil.copyfile(DEMO / "site.wat", site / "site guest.wat")
    file_url = (site / "site guest.wat").as_uri()
    assert "%20" in file_url
    localhost = file_url.replace("file:///", "file://localhost/")
    text = (
        WAGI_EXAMPLE
        + f"""
[[module]]
route = "/site/..."
module = "{file_url}"
volumes = {{"/static" = "{site / "static"}"}}

[[module]]
route = "/up/..."
module = "{localhost}"
volumes = {{"/static" = "../elsewhere/my site/static"}}
"""
    )
    (app_dir / "modules.toml").write_text(text)
    about = (site / "static" / "about.txt").read_bytes()
    async with (
        wagi(app_dir, ["-c", "modules.toml", "-l", "127.0.0.1:0"]) as (url, _),
        httpx.AsyncClient(base_url=url) as client,
    ):
        for path in ("/site/about.txt", "/up/about.txt"):
            response = await client.get(path)
            assert (path, response.status_code, response.content) == (path, 200, about)
        assert (await client.get("/bar")).text == "from alt\n"


def test_a_file_url_naming_a_host_stops_wagi(app_dir: Path):
    entry = '[[module]]\nroute = "/"\nmodule = "file://server/share/x.wasm"\n'
    (app_dir / "modules.toml").write_text(entry)
    result = run_wagi(app_dir, "-c", "modules.toml", "-l", "127.0.0.1:0")
    assert result.returncode == 2
    assert "module[0].module: the file: URL 'file://server/share/x.wasm' names the host" in (
        result.stderr
    )


def run_wagi(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wagi_command(*args),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_environment(home=cwd.parent),
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-b", "example.com/hello/1.0"], "--bindle is not supported: Bindle is gone"),
        (["--bindle-url", "http://b/v1"], "--bindle-url is not supported: Bindle is gone"),
        (["-c", "modules.toml", "--cache", "cache.toml"], "use --module-cache DIR"),
        (["-c", "modules.toml", "-e", "=v"], "-e/--env: '=v' is not NAME=VALUE"),
        (["-c", "modules.toml", "--tls-cert", "cert.pem"], "give both or neither"),
        (["-l", "127.0.0.1:0"], "-c/--config MODULES_TOML is required"),
    ],
)
def test_flags_this_host_cannot_honour_are_refused_saying_what_instead(app_dir, args, message):
    result = run_wagi(app_dir, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_typo_in_modules_toml_stops_wagi_naming_the_key(app_dir: Path):
    (app_dir / "modules.toml").write_text(WAGI_EXAMPLE.replace("entrypoint", "entrypiont"))
    result = run_wagi(app_dir, "-c", "modules.toml", "-l", "127.0.0.1:0")
    assert result.returncode == 2
    assert "module[2].entrypiont: unknown key (did you mean `entrypoint`?)" in result.stderr


def test_a_bindle_module_stops_wagi(app_dir: Path):
    (app_dir / "modules.toml").write_text('[[module]]\nroute = "/"\nmodule = "bindle:a/1"\n')
    result = run_wagi(app_dir, "-c", "modules.toml", "-l", "127.0.0.1:0")
    assert result.returncode == 2
    assert "module[0].module: Bindle is gone" in result.stderr
