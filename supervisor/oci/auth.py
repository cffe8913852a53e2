"""Registry credentials and the registry token flow, as an httpx auth.

Credentials come from Docker's `config.json` ($DOCKER_CONFIG/config.json, else
~/.docker/config.json), in Docker's order: the credential helper `credHelpers.<registry>`
names, else the `credsStore` helper (`docker-credential-<name> get`, the registry on stdin,
JSON with `Username` and `Secret` on stdout), else `auths.<registry>.auth` (base64 of
`user:password`) or its `username` and `password`. A registry answers 401 with the scheme it
wants:

- `Basic`: the request is sent again with the credentials;
- `Bearer realm=...,service=...,scope=...` (the distribution token spec): the realm is asked
  for a token (with the credentials, if any; anonymously otherwise), and the request is sent
  again with `Authorization: Bearer <token>`. The token is kept for later requests.

Credentials go out only after a registry asks for them, and never over plain HTTP to a host
that was not named insecure on purpose (the caller decides which hosts those are).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import subprocess
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = ["AuthError", "Credentials", "RegistryAuth", "load_docker_credentials"]

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")
"""The keys `docker login` writes for Docker Hub (the first is what helpers are asked for)."""
HELPER_PREFIX = "docker-credential-"
HELPER_TIMEOUT_S = 30.0
"""A helper may ask a keychain or a cloud API; one that hangs must not hang a reload."""
HELPER_NOT_FOUND = "credentials not found"
"""What docker-credential-helpers print (exit 1) for a registry they hold nothing for."""
MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024
"""A token answer is a small JSON object; anything bigger is not one."""

_AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


class AuthError(Exception):
    """Credentials that cannot be read, or a token the realm would not give."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def docker_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    folder = environ.get("DOCKER_CONFIG")
    return Path(folder) / "config.json" if folder else Path.home() / ".docker" / "config.json"


def load_docker_credentials(
    registry: str, environ: Mapping[str, str] = os.environ
) -> Credentials | None:
    """The credentials Docker's config.json gives `registry` (host[:port]), or None.

    Raises AuthError for a config file that exists but cannot be read, naming the file, or a
    credential helper that fails.
    """
    path = docker_config_path(environ)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuthError(f"{path}: cannot be read as JSON: {exc}") from exc
    if not isinstance(document, dict):
        return None
    helpers = document.get("credHelpers")
    helper = helpers.get(registry) if isinstance(helpers, dict) else None
    helper = helper or document.get("credsStore")
    if isinstance(helper, str) and helper:
        server = DOCKER_HUB_KEYS[0] if registry == "docker.io" else registry
        found = _helper_credentials(helper, server)
        if found is not None:
            return found
    auths = document.get("auths")
    if not isinstance(auths, dict):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == "docker.io":
        keys += DOCKER_HUB_KEYS
    for key in keys:
        entry = auths.get(key) or auths.get(key + "/")
        if isinstance(entry, dict):
            return _entry_credentials(entry, f"{path}: auths.{key}")
    return None


def _helper_credentials(helper: str, server: str) -> Credentials | None:
    """Ask `docker-credential-<helper> get` for `server`; None if it holds nothing for it."""
    command = HELPER_PREFIX + helper
    try:
        done = subprocess.run(
            [command, "get"],
            input=server.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AuthError(f"credential helper {command}: {exc}") from exc
    if done.returncode != 0:
        if HELPER_NOT_FOUND in done.stdout.decode(errors="replace").lower():
            return None
        said = (done.stderr or done.stdout).decode(errors="replace").strip()[:200]
        raise AuthError(f"credential helper {command} failed ({done.returncode}): {said}")
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        answer = None
    if not (
        isinstance(answer, dict)
        and isinstance(answer.get("Username"), str)
        and isinstance(answer.get("Secret"), str)
    ):
        raise AuthError(f"credential helper {command}: not a Username/Secret JSON object")
    return Credentials(answer["Username"], answer["Secret"])


def _entry_credentials(entry: Mapping, where: str) -> Credentials | None:
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            pair = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise AuthError(f"{where}.auth: not base64 of user:password") from exc
        username, colon, password = pair.partition(":")
        if not colon:
            raise AuthError(f"{where}.auth: not base64 of user:password (no ':')")
        return Credentials(username, password)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"])
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="x",service="y"` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _AUTH_PARAM.match(rest, position)
        if match is None or match.end() == position:
            break
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[match.group(1).lower()] = value
        position = match.end()
    return scheme.lower(), params


class RegistryAuth(httpx.Auth):
    """Answers a registry's 401 with basic credentials or a bearer token (see the module doc).

    One instance serves one registry client; the last token is reused until the registry
    refuses it (a new scope, an expired token), then fetched again once.
    """

    def __init__(
        self, credentials: Credentials | None, token_client: httpx.Client, *, plain_http: bool
    ) -> None:
        """`plain_http`: the registry was named insecure, so a realm may be plain HTTP too."""
        self.credentials = credentials
        self._token_client = token_client
        self._plain_http = plain_http
        self._authorization: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._authorization is not None:
            request.headers["authorization"] = self._authorization
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
        if scheme == "basic" and self.credentials is not None:
            self._authorization = self.credentials.basic()
        elif scheme == "bearer" and params.get("realm"):
            self._authorization = "Bearer " + self._token(params)
        else:
            return
        request.headers["authorization"] = self._authorization
        yield request

    def _token(self, params: Mapping[str, str]) -> str:
        query = {key: params[key] for key in ("service", "scope") if params.get(key)}
        headers = {"authorization": self.credentials.basic()} if self.credentials else {}
        realm = params["realm"]
        if not realm.startswith("https://") and not (
            self._plain_http and realm.startswith("http://")
        ):
            raise AuthError(f"token realm {realm!r} is not an https:// URL")
        try:
            response = self._token_client.get(realm, params=query, headers=headers)
        except httpx.HTTPError as exc:
            raise AuthError(f"token realm {realm}: {exc}") from exc
        if response.status_code != 200:
            raise AuthError(f"token realm {realm} answered {response.status_code}")
        if len(response.content) > MAX_TOKEN_RESPONSE_BYTES:
            raise AuthError(f"token realm {realm}: answer over {MAX_TOKEN_RESPONSE_BYTES} bytes")
        try:
            document = response.json()
        except ValueError as exc:
            raise AuthError(f"token realm {realm}: answer is not JSON") from exc
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise AuthError(f"token realm {realm}: answer has no token")
        return token
