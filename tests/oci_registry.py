"""A real OCI registry for the `oci:` tests, and what the tests push to it.

`run_registry` starts Debian's `docker-registry` (CNCF distribution 2.8.2, unpacked by
`make test` into .cache/docker-registry) on a free 127.0.0.1 port with a temporary root, and
stops it afterwards. `push` writes a module in one of the layouts the client reads, with the
project's own `RegistryClient` (its auth and URLs): wasm-supervisor has no push command, so the
push lives here, next to the tests that need it. The token flow's issuer is oci_token_issuer.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import wasmtime
from conftest import REPO, printing_guest, unpacked_binary

from supervisor.oci import Reference, RegistryClient, parse_reference

REGISTRY_BINARY = REPO / ".cache" / "docker-registry" / "usr" / "bin" / "docker-registry"
READY_S = 20.0
"""The registry answers /v2/ within ~0.1 s; a loaded CI machine gets far longer."""
BCRYPT_COST = 5
"""htpasswd's lowest cost the registry accepts; tests need speed, not a strong hash."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYOUTS = {
    # the CNCF wasm artifact (wkg, wash): one application/wasm layer
    "cncf": ("application/vnd.wasm.config.v0+json", ["application/wasm"]),
    # WAGI's (wasm-to-oci): one layer of the pre-standard wasm type
    "wagi": ("application/vnd.wasm.config.v1+json", ["application/vnd.wasm.content.layer.v1+wasm"]),
    # a one-component Spin app: image config, locked app, the component, a data layer
    "spin": (
        "application/vnd.oci.image.config.v1+json",
        [
            "application/vnd.fermyon.spin.application.v1+config",
            "application/vnd.wasm.content.layer.v1+wasm",
            "application/vnd.wasm.content.layer.v1+data",
        ],
    ),
}
WASM_TYPES = {"application/wasm", "application/vnd.wasm.content.layer.v1+wasm"}


def greeter_wasm(text: str) -> bytes:
    """A WAGI guest that answers `text` as text/plain: a module per version in the tests."""
    body = f"content-type: text/plain\n\n{text}\n".encode()
    return bytes(wasmtime.wat2wasm(printing_guest(body)))


def bcrypt_htpasswd_line(user: str, password: str) -> str:
    """`user:$2b$...`, hashed by the system's libcrypt (libxcrypt, Debian's libcrypt1, which
    every Debian system has): no htpasswd binary, no Python package, no deprecated `crypt`."""
    libcrypt = ctypes.CDLL("libcrypt.so.1")
    libcrypt.crypt_gensalt.restype = ctypes.c_char_p
    libcrypt.crypt_gensalt.argtypes = [
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    libcrypt.crypt.restype = ctypes.c_char_p
    libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    setting = libcrypt.crypt_gensalt(b"$2b$", BCRYPT_COST, None, 0)
    hashed = libcrypt.crypt(password.encode(), setting)
    assert setting and hashed and hashed.startswith(b"$2b$"), "libcrypt has no bcrypt"
    return f"{user}:{hashed.decode()}"


@dataclass
class Registry:
    """A running registry: its host:port, its storage root, and a client that talks to it."""

    host: str
    root: Path
    process: subprocess.Popen

    def reference(self, repository: str, tag: str = "v1") -> Reference:
        return parse_reference(f"oci:{self.host}/{repository}:{tag}")

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob (distribution's storage layout)."""
        hex_digest = digest.removeprefix("sha256:")
        return self.root / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def run_registry(
    folder: Path, *, htpasswd: str | None = None, auth: str = ""
) -> Iterator[Registry]:
    """docker-registry on 127.0.0.1, storing under `folder`; `htpasswd`: basic auth lines;
    `auth`: another `auth:` section (TokenIssuer.registry_auth)."""
    binary = unpacked_binary(REGISTRY_BINARY, "docker-registry")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    root = folder / "storage"
    if htpasswd is not None:
        (folder / "htpasswd").write_text(htpasswd + "\n")
        auth = f"auth:\n  htpasswd:\n    realm: oci-tests\n    path: {folder / 'htpasswd'}\n"
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: {secrets.token_hex(16)}\n" + auth
    )
    log_file = (folder / "registry.log").open("wb")
    process = subprocess.Popen(
        [str(binary), "serve", str(config)], stdout=log_file, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + READY_S
        while True:  # ready when /v2/ answers (200, or 401 with auth)
            try:
                httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1.0)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"docker-registry did not start: {(folder / 'registry.log').read_text()}"
                    ) from None
                time.sleep(0.02)  # polling a process we started for its port; no event to wait on
        yield Registry(f"127.0.0.1:{port}", root, process)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log_file.close()


def push(
    client: RegistryClient,
    reference: Reference,
    wasm: bytes,
    layout: str = "cncf",
    *,
    extra_wasm_layers: int = 0,
) -> str:
    """Push `wasm` as `layout` (LAYOUTS) under `reference`'s tag; the manifest's digest.

    `extra_wasm_layers` adds more wasm layers (a multi-component app) for the refusal test.
    """
    config_type, layer_types = LAYOUTS[layout]
    layer_types = layer_types + [next(iter(sorted(WASM_TYPES)))] * extra_wasm_layers
    layers = []
    for index, media_type in enumerate(layer_types):
        if media_type in WASM_TYPES:
            content = wasm if index == layer_types.index(media_type) else wasm + b"\0" * index
        else:
            content = json.dumps({"layer": media_type}).encode()
        layers.append(_upload_blob(client, reference, media_type, content))
    config = {"architecture": "wasm", "os": "wasip1"}
    if layout == "cncf":
        config["layerDigests"] = [layer["digest"] for layer in layers]
    config_descriptor = _upload_blob(client, reference, config_type, json.dumps(config).encode())
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_descriptor,
            "layers": layers,
        }
    ).encode()
    return _put_manifest(client, reference, manifest, OCI_MANIFEST)


def _put_manifest(
    client: RegistryClient, reference: Reference, content: bytes, media_type: str
) -> str:
    """PUT a manifest or an index under `reference`'s tag; the digest it is stored by."""
    response = client.request(
        "PUT",
        reference,
        f"manifests/{reference.tag}",
        content=content,
        headers={"content-type": media_type},
    )
    assert response.status_code == 201, response.text
    return "sha256:" + hashlib.sha256(content).hexdigest()


def _upload_blob(
    client: RegistryClient, reference: Reference, media_type: str, content: bytes
) -> dict:
    """A monolithic blob upload: POST for a location, then PUT the bytes with their digest."""
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    started = client.request("POST", reference, "blobs/uploads/")
    assert started.status_code == 202, started.text
    location = httpx.URL(client.base_url(reference)).join(started.headers["location"])
    done = client.request(
        "PUT",
        reference,
        str(location.copy_merge_params({"digest": digest})),
        content=content,
        headers={"content-type": "application/octet-stream"},
    )
    assert done.status_code == 201, done.text
    return {"mediaType": media_type, "digest": digest, "size": len(content)}


def push_index(
    client: RegistryClient, reference: Reference, platforms: dict[str, dict[str, str]]
) -> str:
    """Push an OCI image index under `reference`'s tag whose entries are the manifests
    `platforms` maps (digest -> platform), all in the same repository; the index's digest."""
    entries = []
    for digest, platform in platforms.items():
        manifest = client.manifest(replace(reference, digest=digest))
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(manifest.raw),
                "platform": platform,
            }
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    return _put_manifest(client, reference, index, OCI_INDEX)
