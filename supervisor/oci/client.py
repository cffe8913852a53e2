"""Pulling one wasm module over the OCI distribution API.

The API over httpx (already a dependency), not oras-py: a pull is two requests
(GET /v2/<name>/manifests/<ref>, GET /v2/<name>/blobs/<digest>) plus the token flow, and
oras-py is synchronous, pulls in requests and jsonschema, and writes the layers to files where
we want bytes, bounded and verified while they stream.

A manifest may carry the module in any of these layouts; exactly one wasm layer is read:

- the CNCF wasm artifact: config `application/vnd.wasm.config.v0+json`, one `application/wasm`
  layer (wkg, wash, oci-wasm);
- WAGI's `application/vnd.wasm.content.layer.v1+wasm` layer (wasm-to-oci);
- a Spin app of one component: an image manifest whose one wasm layer has that same type
  (its locked-app config and data layers are other types, and are not read).

A tag may also name an image index (several platforms, as runwasi images are): its one entry
for wasm (`architecture: wasm`, or `os: wasi`/`wasip1`/`wasip2`) is pulled by digest, or its
only entry if it has just one. The reference is pinned to the index's digest.

Every byte is verified: a manifest pulled by digest must hash to it, a blob must hash to its
descriptor's digest and have its size. Sizes are bounded before and while reading.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import httpx

from .auth import AuthError, RegistryAuth, load_docker_credentials
from .reference import InvalidReference, Reference, parse_reference

__all__ = [
    "MAX_MANIFEST_BYTES",
    "PLAIN_HTTP_REGISTRIES",
    "Manifest",
    "PullError",
    "PulledModule",
    "RegistryClient",
    "RegistryUnreachable",
    "parse_manifest",
    "sha256_digest",
]

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""distribution's own limit for a manifest PUT (4 MiB); one wasm manifest is ~1 KiB."""
PLAIN_HTTP_REGISTRIES = frozenset({"localhost:5000", "127.0.0.1:5000"})
"""Spoken to over plain HTTP without being named insecure, as WAGI does."""
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
"""Between two reads of a response, not for the whole blob."""
CHUNK_BYTES = 256 * 1024
ERROR_BODY_BYTES = 64 * 1024
"""A registry's error document (`{"errors": [...]}`) is a few hundred bytes."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
WASM_CONFIG = "application/vnd.wasm.config.v0+json"
CNCF_WASM_LAYER = "application/wasm"
WAGI_WASM_LAYER = "application/vnd.wasm.content.layer.v1+wasm"
WASM_LAYER_TYPES = frozenset({CNCF_WASM_LAYER, WAGI_WASM_LAYER})
WASM_OS = frozenset({"wasi", "wasip1", "wasip2"})
DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
"""The only digest read: a layer's digest goes into a URL and a file name, so it is checked."""


class PullError(Exception):
    """A module that cannot be pulled; the message names the reference and what failed."""


class RegistryUnreachable(PullError):
    """No answer from the registry (connection, TLS or timeout): what it holds is unknown,
    unlike a refusal or content that fails verification."""


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: str
    raw: bytes  # as the registry sent it: what the digest is of
    document: dict[str, Any]

    @property
    def is_index(self) -> bool:
        return self.document.get("mediaType") in INDEX_TYPES

    def wasm_layer(self, reference: Reference) -> dict[str, Any]:
        """The descriptor of the one wasm layer; PullError if there is none or several."""
        return _wasm_layer(reference, self.document)

    def wasm_entry(self, reference: Reference) -> Reference:
        """An index's manifest for wasm, as a reference by digest; PullError if it has none
        or several (and more than one entry)."""
        entries = self.document.get("manifests")
        if not isinstance(entries, list) or not all(_is_descriptor(entry) for entry in entries):
            raise PullError(f"{reference}: the index's manifests are not a list of descriptors")
        wasm = [entry for entry in entries if _is_wasm_platform(entry.get("platform"))]
        if len(wasm) != 1 and len(entries) == 1:
            wasm = entries
        if len(wasm) != 1:
            raise PullError(
                f"{reference}: an image index of {len(entries)} manifests, {len(wasm)} of them"
                " for wasm; name one manifest by digest"
            )
        return replace(reference, digest=wasm[0]["digest"])


@dataclass(frozen=True, slots=True)
class PulledModule:
    reference: Reference
    manifest_digest: str  # what the reference resolved to: a tag is pinned to this
    layer_digest: str
    media_type: str
    content: bytes


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryClient:
    """Talks to registries for one pull (or push): one connection pool, one token per host."""

    def __init__(
        self,
        *,
        insecure_registries: Collection[str] = (),
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.insecure_registries = frozenset(insecure_registries) | PLAIN_HTTP_REGISTRIES
        self._environ = environ
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        self._http = httpx.Client(
            timeout=timeout, follow_redirects=True, verify=_shared_ssl_context()
        )
        self._auths: dict[str, RegistryAuth] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def base_url(self, reference: Reference) -> str:
        plain = reference.registry in self.insecure_registries
        return f"{'http' if plain else 'https'}://{reference.api_host}"

    def request(
        self, method: str, reference: Reference, path: str, **kwargs: Any
    ) -> httpx.Response:
        """One API request for `reference`'s repository, `path` after /v2/<name>/ (or an
        absolute URL the registry gave, e.g. an upload location), authenticated as needed."""
        url = (
            path
            if "://" in path
            else f"{self.base_url(reference)}/v2/{reference.repository}/{path}"
        )
        try:
            return self._http.request(method, url, auth=self._auth_for(reference), **kwargs)
        except (httpx.HTTPError, AuthError) as exc:
            raise PullError(f"{reference}: {method} {url}: {_reason(exc)}") from exc

    def pull_module(self, reference: Reference | str, *, max_bytes: int) -> PulledModule:
        """The one wasm module `reference` names, verified; raises PullError."""
        if isinstance(reference, str):
            try:
                reference = parse_reference(reference)
            except InvalidReference as exc:
                raise PullError(str(exc)) from exc
        named, image = self.resolve(reference)
        layer = image.wasm_layer(reference)
        content = self.blob(reference, layer, max_bytes=max_bytes)
        return PulledModule(reference, named.digest, layer["digest"], layer["mediaType"], content)

    def resolve(self, reference: Reference) -> tuple[Manifest, Manifest]:
        """(the manifest `reference` names now, the image manifest that holds the module):
        the same one, or an index and its wasm entry (pulled by digest)."""
        named = self.manifest(reference)
        if not named.is_index:
            return named, named
        image = self.manifest(named.wasm_entry(reference))
        if image.is_index:
            raise PullError(f"{reference}: an index inside an index is not read")
        return named, image

    def manifest(self, reference: Reference) -> Manifest:
        """The manifest `reference` names now (a tag's may change between two calls)."""
        headers = {"accept": ", ".join(MANIFEST_TYPES + INDEX_TYPES)}
        body = self._bounded_get(
            reference, f"manifests/{reference.pull_ref}", MAX_MANIFEST_BYTES, "manifest", headers
        )
        return parse_manifest(reference, body)

    def blob(self, reference: Reference, descriptor: Mapping[str, Any], *, max_bytes: int) -> bytes:
        """The blob `descriptor` names, checked against its size and digest."""
        digest, size = descriptor["digest"], descriptor["size"]
        if size > max_bytes:
            raise PullError(
                f"{reference}: layer {digest} is {size} bytes, over max_module_bytes ({max_bytes})"
            )
        content = self._bounded_get(reference, f"blobs/{digest}", size, f"layer {digest}")
        if len(content) != size:
            raise PullError(
                f"{reference}: layer {digest} has {len(content)} bytes, its manifest says {size}"
            )
        actual = sha256_digest(content)
        if actual != digest:
            raise PullError(f"{reference}: layer {digest} does not match its content ({actual})")
        return content

    def _bounded_get(
        self,
        reference: Reference,
        path: str,
        limit: int,
        what: str,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        url = f"{self.base_url(reference)}/v2/{reference.repository}/{path}"
        try:
            with self._http.stream(
                "GET", url, headers=headers, auth=self._auth_for(reference)
            ) as response:
                if response.status_code != 200:
                    raise PullError(f"{reference}: {what}: {_refusal(response)}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise PullError(f"{reference}: {what} is {declared} bytes, over {limit}")
                chunks, received = [], 0
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    received += len(chunk)
                    if received > limit:
                        raise PullError(f"{reference}: {what} is over {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TransportError as exc:
            raise RegistryUnreachable(f"{reference}: {what}: {url}: {_reason(exc)}") from exc
        except (httpx.HTTPError, AuthError) as exc:
            raise PullError(f"{reference}: {what}: {url}: {_reason(exc)}") from exc

    def _auth_for(self, reference: Reference) -> RegistryAuth:
        auth = self._auths.get(reference.registry)
        if auth is None:
            plain = reference.registry in self.insecure_registries
            credentials = load_docker_credentials(reference.registry, self._environ)
            auth = RegistryAuth(credentials, self._http, plain_http=plain)
            self._auths[reference.registry] = auth
        return auth


@functools.cache
def _shared_ssl_context() -> ssl.SSLContext:
    """httpx's default context (certifi, or $SSL_CERT_FILE / $SSL_CERT_DIR), built once: it
    costs ~60 ms, which every pull (each tag on each reload) paid again."""
    return httpx.create_ssl_context()


def parse_manifest(reference: Reference, raw: bytes) -> Manifest:
    """`raw` checked against the reference's digest (if any) and parsed; raises PullError."""
    digest = sha256_digest(raw)
    if reference.digest is not None and digest != reference.digest:
        raise PullError(f"{reference}: the manifest's content has digest {digest}")
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise PullError(f"{reference}: the manifest is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise PullError(f"{reference}: the manifest is not a JSON object")
    media_type = document.get("mediaType", OCI_MANIFEST)
    if media_type not in MANIFEST_TYPES + INDEX_TYPES:
        raise PullError(f"{reference}: manifest media type {media_type!r} is not supported")
    return Manifest(digest, raw, document)


def _wasm_layer(reference: Reference, manifest: Mapping[str, Any]) -> dict[str, Any]:
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(_is_descriptor(layer) for layer in layers):
        raise PullError(f"{reference}: the manifest's layers are not a list of descriptors")
    wasm = [layer for layer in layers if layer["mediaType"] in WASM_LAYER_TYPES]
    config = manifest.get("config")
    config_type = config.get("mediaType") if isinstance(config, dict) else None
    if config_type == WASM_CONFIG and len(layers) != 1:
        raise PullError(
            f"{reference}: a wasm artifact ({WASM_CONFIG}) must have exactly one layer,"
            f" this one has {len(layers)}"
        )
    if not wasm:
        found = ", ".join(sorted({layer["mediaType"] for layer in layers})) or "none"
        raise PullError(
            f"{reference}: no wasm layer (looked for {', '.join(sorted(WASM_LAYER_TYPES))};"
            f" found {found})"
        )
    if len(wasm) > 1:
        raise PullError(
            f"{reference}: {len(wasm)} wasm layers; a module reference must name exactly one"
            " module (a Spin app of several components is not one module)"
        )
    return wasm[0]


def _is_wasm_platform(platform: object) -> bool:
    return isinstance(platform, dict) and (
        platform.get("architecture") == "wasm" or platform.get("os") in WASM_OS
    )


def _is_descriptor(layer: object) -> bool:
    return (
        isinstance(layer, dict)
        and isinstance(layer.get("mediaType"), str)
        and isinstance(layer.get("digest"), str)
        and DIGEST.fullmatch(layer["digest"]) is not None
        and isinstance(layer.get("size"), int)
        and layer["size"] >= 0
    )


def _refusal(response: httpx.Response) -> str:
    """`404 MANIFEST_UNKNOWN: manifest unknown`, from the registry's error document if any
    (its first ERROR_BODY_BYTES: a refusal is read, but not without bound)."""
    text = f"{response.status_code} {response.reason_phrase}"
    body = b""
    for chunk in response.iter_bytes(ERROR_BODY_BYTES):
        body += chunk
        if len(body) >= ERROR_BODY_BYTES:
            break
    try:
        errors = json.loads(body).get("errors") or []
        first = errors[0]
        text = f"{response.status_code} {first.get('code')}: {first.get('message')}"
    except (ValueError, AttributeError, IndexError, TypeError):
        pass
    return text


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
