"""`oci:` modules against a real registry (Debian's docker-registry on 127.0.0.1).

Each test pushes with the project's own RegistryClient (tests/oci_registry.py), then serves
or uploads what it pushed through a real supervisor, and reads the answer over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trio
from conftest import Running, Workspace
from oci_registry import (
    LAYOUTS,
    Registry,
    bcrypt_htpasswd_line,
    greeter_wasm,
    push,
    push_index,
    run_registry,
)
from oci_token_issuer import TokenIssuer
from test_admin import OPERATOR_TOKEN, admin_tenant, start_admin, wasm_supervisor

from supervisor import cli
from supervisor.oci import PullError, RegistryClient
from supervisor.oci.client import MAX_MANIFEST_BYTES
from supervisor.tenants import RegistryState


@pytest.fixture
def registry(tmp_path) -> Registry:
    with run_registry(tmp_path / "registry") as running:
        yield running


def client_for(registry_host: str, **kwargs) -> RegistryClient:
    return RegistryClient(insecure_registries=[registry_host], **kwargs)


def serve_module(workspace: Workspace, tenant: str, module: str, policy: str = "") -> None:
    """A tenant whose modules.toml serves `module` (an oci: reference) at /hello."""
    workspace.add_tenant(tenant, policy=policy)
    (workspace.tenants / tenant / "modules.toml").write_text(
        f'[[module]]\nroute = "/hello"\nmodule = "{module}"\n'
    )


async def start(start_supervisor, *hosts: str, **overrides) -> Running:
    return await start_supervisor(insecure_registries=frozenset(hosts), **overrides)


async def reload(running: Running) -> RegistryState:
    """What SIGHUP does: every tenant rebuilt now (a tag resolved again)."""
    return await trio.to_thread.run_sync(partial(running.app.registry.reload, force=True))


def load_error(running: Running, tenant: str) -> str:
    return running.app.registry.state.errors[tenant]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
async def test_a_tag_in_modules_toml_is_pulled_and_served_in_each_layout(
    workspace, start_supervisor, registry, caplog, layout
):
    reference = registry.reference(f"mods/{layout}")
    with client_for(registry.host) as client:
        digest = push(client, reference, greeter_wasm(f"hello {layout}"), layout)
    serve_module(workspace, "acme", str(reference))
    caplog.set_level(logging.INFO, logger="supervisor.oci")

    running = await start(start_supervisor, registry.host)

    response = await running.client.get("/acme/hello")
    assert (response.status_code, response.text) == (200, f"hello {layout}\n")
    assert f"{reference} resolved to {digest}" in caplog.text


async def test_wagis_url_form_with_the_registry_first(workspace, start_supervisor, registry):
    with client_for(registry.host) as client:
        push(client, registry.reference("greeter", "1.0.0"), greeter_wasm("url form"), "wagi")
    serve_module(workspace, "acme", f"oci://{registry.host}/greeter:1.0.0")

    running = await start(start_supervisor, registry.host)

    assert (await running.client.get("/acme/hello")).text == "url form\n"


async def test_an_image_index_serves_its_wasm_entry_and_pins_the_index(
    workspace, start_supervisor, registry, caplog
):
    with client_for(registry.host) as client:
        wasm = push(client, registry.reference("mods/multi", "wasm"), greeter_wasm("from wasm"))
        other = push(client, registry.reference("mods/multi", "other"), greeter_wasm("other"))
        reference = registry.reference("mods/multi", "v1")
        index = push_index(
            client,
            reference,
            {
                other: {"architecture": "amd64", "os": "linux"},
                wasm: {"architecture": "wasm", "os": "wasip1"},
            },
        )
        ambiguous = registry.reference("mods/multi", "two")
        push_index(
            client,
            ambiguous,
            {
                other: {"os": "wasi", "architecture": "wasm"},
                wasm: {"os": "wasip1", "architecture": "wasm"},
            },
        )
    workspace.add_tenant("acme")
    (workspace.tenants / "acme" / "modules.toml").write_text(
        f'[[module]]\nroute = "/hello"\nmodule = "{reference}"\n\n'
        f'[[module]]\nroute = "/pinned"\nmodule = "oci:{registry.host}/mods/multi@{index}"\n'
    )
    serve_module(workspace, "other", str(ambiguous))
    caplog.set_level(logging.INFO, logger="supervisor.oci")

    running = await start(start_supervisor, registry.host)

    assert (await running.client.get("/acme/hello")).text == "from wasm\n"
    assert (await running.client.get("/acme/pinned")).text == "from wasm\n"
    assert f"{reference} resolved to {index}" in caplog.text
    assert "an image index of 2 manifests, 2 of them for wasm; name one manifest by digest" in (
        load_error(running, "other")
    )


async def test_a_registry_not_named_insecure_is_spoken_to_over_https(
    workspace, start_supervisor, registry
):
    reference = registry.reference("mods/greeter")
    with client_for(registry.host) as client:
        push(client, reference, greeter_wasm("hello"))
    serve_module(workspace, "acme", str(reference))

    running = await start(start_supervisor)  # no --insecure-registry

    assert (await running.client.get("/acme/hello")).status_code == 404
    assert f"https://{registry.host}/v2/mods/greeter/manifests/v1" in load_error(running, "acme")


async def test_a_moved_tag_stays_pinned_until_a_reload_resolves_it_again(
    workspace, start_supervisor, registry, caplog
):
    reference = registry.reference("mods/greeter", "stable")
    with client_for(registry.host) as client:
        push(client, reference, greeter_wasm("one"))
    serve_module(workspace, "acme", str(reference))
    caplog.set_level(logging.INFO, logger="supervisor.oci")
    running = await start(start_supervisor, registry.host)
    assert (await running.client.get("/acme/hello")).text == "one\n"

    with client_for(registry.host) as client:
        moved_to = push(client, reference, greeter_wasm("two"))
    # What the file watcher does every round: nothing changed on disk, so the pin holds.
    await trio.to_thread.run_sync(running.app.registry.reload)
    assert (await running.client.get("/acme/hello")).text == "one\n"

    await reload(running)
    assert (await running.client.get("/acme/hello")).text == "two\n"
    assert f"{reference} resolved to {moved_to}" in caplog.text


async def test_a_digest_reference_is_served_from_the_disk_cache_once_pulled(
    workspace, start_supervisor, tmp_path
):
    with run_registry(tmp_path / "short-lived") as registry:
        with client_for(registry.host) as client:
            digest = push(client, registry.reference("mods/greeter"), greeter_wasm("pinned"))
        host = registry.host
        serve_module(workspace, "acme", f"oci:{host}/mods/greeter@{digest}")
        running = await start(start_supervisor, host)
        assert (await running.client.get("/acme/hello")).text == "pinned\n"

    # The registry is gone: the manifest and the layer come from the pod's disk, on a reload
    # and on a restart (a new supervisor on the same cache folder).
    assert "acme" not in (await reload(running)).errors
    restarted = await start(start_supervisor, host)
    assert (await restarted.client.get("/acme/hello")).text == "pinned\n"


async def test_an_unreachable_registry_keeps_the_digest_a_tag_last_resolved_to(
    workspace, start_supervisor, tmp_path, caplog
):
    with run_registry(tmp_path / "short-lived") as registry:
        reference = registry.reference("mods/greeter", "stable")
        with client_for(registry.host) as client:
            digest = push(client, reference, greeter_wasm("kept"))
        serve_module(workspace, "acme", str(reference))
        running = await start(start_supervisor, registry.host)
        assert (await running.client.get("/acme/hello")).text == "kept\n"
    caplog.set_level(logging.WARNING, logger="supervisor.oci")

    # No answer at all (not a refusal): the reload and a restart keep the last digest.
    assert "acme" not in (await reload(running)).errors
    assert f"{reference}: registry unreachable; serving {digest}" in caplog.text
    restarted = await start(start_supervisor, registry.host)
    assert (await restarted.client.get("/acme/hello")).text == "kept\n"


async def test_a_refusal_is_not_masked_by_the_digest_last_resolved_to(
    workspace, start_supervisor, tmp_path, monkeypatch
):
    docker = tmp_path / "docker"
    docker.mkdir()
    htpasswd = bcrypt_htpasswd_line("alice", "s3cret")
    with run_registry(tmp_path / "registry", htpasswd=htpasswd) as registry:
        auth = {"auths": {registry.host: {"username": "alice", "password": "s3cret"}}}
        (docker / "config.json").write_text(json.dumps(auth))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        reference = registry.reference("mods/greeter", "stable")
        with client_for(registry.host) as client:
            push(client, reference, greeter_wasm("hello"))
        serve_module(workspace, "acme", str(reference))
        running = await start(start_supervisor, registry.host)
        assert (await running.client.get("/acme/hello")).text == "hello\n"

        (docker / "config.json").write_text("{}")  # the credentials are withdrawn
        state = await reload(running)

    assert "manifest: 401 UNAUTHORIZED" in state.errors["acme"]


async def test_a_corrupted_layer_is_refused(workspace, start_supervisor, registry):
    reference = registry.reference("mods/greeter")
    wasm = greeter_wasm("hello")
    with client_for(registry.host) as client:
        push(client, reference, wasm)
        layer = client.manifest(reference).wasm_layer(reference)["digest"]
    stored = registry.blob_file(layer)
    stored.write_bytes(stored.read_bytes().replace(b"hello", b"jello"))  # same size
    serve_module(workspace, "acme", str(reference))

    running = await start(start_supervisor, registry.host)

    assert (await running.client.get("/acme/hello")).status_code == 404
    assert f"layer {layer} does not match its content" in load_error(running, "acme")


async def test_a_manifest_that_does_not_hash_to_the_digest_asked_for_is_refused(
    workspace, start_supervisor, registry
):
    reference = registry.reference("mods/greeter")
    with client_for(registry.host) as client:
        digest = push(client, reference, greeter_wasm("hello"))
    stored = registry.blob_file(digest)
    manifest = json.loads(stored.read_bytes())
    manifest["annotations"] = {"tampered": "yes"}
    stored.write_bytes(json.dumps(manifest).encode())
    serve_module(workspace, "acme", f"oci:{registry.host}/mods/greeter@{digest}")

    running = await start(start_supervisor, registry.host)

    assert (await running.client.get("/acme/hello")).status_code == 404
    assert "the manifest's content has digest sha256:" in load_error(running, "acme")


async def test_two_wasm_layers_are_refused_as_not_one_module(workspace, start_supervisor, registry):
    reference = registry.reference("mods/app")
    with client_for(registry.host) as client:
        push(client, reference, greeter_wasm("hello"), "spin", extra_wasm_layers=1)
    serve_module(workspace, "acme", str(reference))

    running = await start(start_supervisor, registry.host)

    assert "2 wasm layers; a module reference must name exactly one module" in load_error(
        running, "acme"
    )


async def test_a_layer_over_max_module_bytes_is_refused_before_it_is_read(
    workspace, start_supervisor, registry
):
    reference = registry.reference("mods/big")
    big = greeter_wasm("x" * 2048)
    with client_for(registry.host) as client:
        push(client, reference, big)
    serve_module(workspace, "acme", str(reference), policy='max_module_bytes = "1KiB"\n')

    running = await start(start_supervisor, registry.host)

    assert f"is {len(big)} bytes, over max_module_bytes (1024)" in load_error(running, "acme")


@pytest.mark.parametrize("source", ["auths", "credsStore"])
async def test_basic_auth_with_docker_config_credentials(
    workspace, start_supervisor, tmp_path, monkeypatch, source
):
    htpasswd = bcrypt_htpasswd_line("alice", "s3cret")
    with run_registry(tmp_path / "registry", htpasswd=htpasswd) as registry:
        reference = registry.reference("mods/private")
        docker = tmp_path / "docker"
        docker.mkdir()
        if source == "auths":
            config = {"auths": {registry.host: {"auth": "YWxpY2U6czNjcmV0"}}}  # alice:s3cret
        else:  # a credential helper, a real executable on PATH, as Docker runs it
            helper = docker / "docker-credential-oci-tests"
            answer = json.dumps({"Username": "alice", "Secret": "s3cret"})
            helper.write_text(
                f"#!/bin/sh\nread server\n[ \"$server\" = {registry.host} ] && echo '{answer}'\n"
            )
            helper.chmod(0o755)
            monkeypatch.setenv("PATH", f"{docker}{os.pathsep}{os.environ['PATH']}")
            config = {"credsStore": "oci-tests"}
        (docker / "config.json").write_text(json.dumps(config))
        environ = {"DOCKER_CONFIG": str(docker)}
        with client_for(registry.host, environ=environ) as client:
            push(client, reference, greeter_wasm("private"))
        anonymous = client_for(registry.host, environ={"DOCKER_CONFIG": str(tmp_path)})
        with anonymous, pytest.raises(PullError, match="401 UNAUTHORIZED"):
            anonymous.pull_module(reference, max_bytes=1 << 20)
        serve_module(workspace, "acme", str(reference))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))

        running = await start(start_supervisor, registry.host)

        assert (await running.client.get("/acme/hello")).text == "private\n"


async def test_the_registry_token_flow_with_the_tests_own_issuer(
    workspace, start_supervisor, tmp_path, monkeypatch
):
    docker = tmp_path / "docker"
    docker.mkdir()
    with (
        TokenIssuer(tmp_path, "bob", "hunter2") as issuer,
        run_registry(tmp_path / "registry", auth=issuer.registry_auth()) as registry,
    ):
        auth = {"auths": {registry.host: {"username": "bob", "password": "hunter2"}}}
        (docker / "config.json").write_text(json.dumps(auth))
        reference = registry.reference("mods/tokened")
        with client_for(registry.host, environ={"DOCKER_CONFIG": str(docker)}) as client:
            push(client, reference, greeter_wasm("tokened"))
        anonymous = client_for(registry.host, environ={"DOCKER_CONFIG": str(tmp_path)})
        with anonymous, pytest.raises(PullError, match=r"token realm http://.*/token answered 401"):
            anonymous.pull_module(reference, max_bytes=1 << 20)
        serve_module(workspace, "acme", str(reference))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        issuer.log.clear()

        running = await start(start_supervisor, registry.host)

        assert (await running.client.get("/acme/hello")).text == "tokened\n"
        # The registry's 401 named the realm and scope; one token (asked for with the basic
        # credentials) served the manifest and the layer.
        assert issuer.log == [("repository:mods/tokened:pull", "Basic")]


async def test_upload_pulls_an_oci_reference_on_the_client_and_uploads_its_bytes(
    workspace, start_supervisor, registry, monkeypatch, capsys
):
    reference = registry.reference("mods/greeter")
    with client_for(registry.host) as client:
        digest = push(client, reference, greeter_wasm("uploaded"), "wagi")
    admin_tenant(workspace, "acme")
    running = await start_admin(start_supervisor)  # the server is told of no registry
    monkeypatch.setenv("SUPERVISOR_SERVER", running.url)
    monkeypatch.setenv("SUPERVISOR_ADMIN_TOKEN", OPERATOR_TOKEN)

    argv = ["upload", "acme", "greeter", str(reference), "--route", "/greet"]
    assert await wasm_supervisor(*argv) == 1
    assert f"https://{registry.host}/v2/" in capsys.readouterr().err  # not insecure: https
    assert await wasm_supervisor(*argv, "--insecure-registry", registry.host) == 0

    out, err = capsys.readouterr()
    assert err == f"pulled {reference} ({digest})\n"
    assert out.startswith("uploaded acme/greeter sha256:")
    assert (await running.client.get("/acme/greet")).text == "uploaded\n"


class OversizeManifest(BaseHTTPRequestHandler):
    """A registry that answers every manifest with 5 MiB of JSON, declared or chunked; or,
    for repository `refusal`, a 404 whose body goes on for REFUSAL_SIZE (bytes sent counted)."""

    SIZE = 5 * 1024 * 1024
    REFUSAL_SIZE = 256 * 1024 * 1024
    refusal_bytes_sent = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if "/refusal/" in self.path:
            return self._endless_refusal()
        chunked = "chunked" in self.path
        self.send_response(200)
        self.send_header("content-type", "application/vnd.oci.image.manifest.v1+json")
        if chunked:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("content-length", str(self.SIZE))
        self.end_headers()
        piece = b" " * 65536
        with contextlib.suppress(OSError):  # the client hangs up once it has seen enough
            for _ in range(self.SIZE // len(piece)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")

    def _endless_refusal(self) -> None:
        self.send_response(404)
        self.send_header("content-length", str(self.REFUSAL_SIZE))
        self.end_headers()
        piece = b'{"errors": [' + b" " * 65524
        with contextlib.suppress(OSError):
            for _ in range(self.REFUSAL_SIZE // len(piece)):
                self.wfile.write(piece)
                type(self).refusal_bytes_sent += len(piece)


@pytest.mark.parametrize("repository", ["declared", "chunked"])
def test_a_manifest_over_4_mib_is_refused_while_it_streams(repository):
    server = ThreadingHTTPServer(("127.0.0.1", 0), OversizeManifest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        with client_for(host) as client, pytest.raises(PullError) as raised:
            client.pull_module(f"oci:{host}/{repository}:v1", max_bytes=1 << 20)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    limit = MAX_MANIFEST_BYTES
    expected = (
        f"is {OversizeManifest.SIZE} bytes, over {limit}"
        if repository == "declared"
        else f"is over {limit} bytes"
    )
    assert f"manifest {expected}" in str(raised.value)


def test_a_refusal_is_read_only_as_far_as_its_error_code_needs():
    server = ThreadingHTTPServer(("127.0.0.1", 0), OversizeManifest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        with client_for(host) as client, pytest.raises(PullError, match="manifest: 404 Not Found"):
            client.pull_module(f"oci:{host}/refusal:v1", max_bytes=1 << 20)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    # What the socket buffers took before the client hung up, not the 256 MiB offered.
    assert OversizeManifest.refusal_bytes_sent < 32 * 1024 * 1024


def test_insecure_registry_flags_reach_the_app_config(monkeypatch):
    monkeypatch.setenv("SUPERVISOR_INSECURE_REGISTRY", "registry.internal:5000")
    args = cli.build_parser().parse_args(["serve", "--insecure-registry", "127.0.0.1:5001"])
    assert cli._app_config(args).insecure_registries == {"registry.internal:5000", "127.0.0.1:5001"}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--insecure-registry", "http://x"])
    monkeypatch.setenv("SUPERVISOR_INSECURE_REGISTRY", "ok:1,not a host")
    with pytest.raises(SystemExit, match=r"SUPERVISOR_INSECURE_REGISTRY: 'not a host' is not a"):
        cli.build_parser()
