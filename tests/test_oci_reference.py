"""`oci:` references and registry credentials: pure functions, no registry needed."""

from __future__ import annotations

import base64
import json
import os

import httpx
import pytest

from supervisor.oci import InvalidReference, Reference, check_registry_host, parse_reference
from supervisor.oci.auth import (
    AuthError,
    Credentials,
    RegistryAuth,
    load_docker_credentials,
    parse_challenge,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected", "api_host", "pull_ref"),
    [
        # WAGI's two spellings
        ("oci:foo/bar:1.2.3", Reference("docker.io", "foo/bar", "1.2.3", None), None, "1.2.3"),
        (
            "oci://127.0.0.1:5001/x/y:v1",
            Reference("127.0.0.1:5001", "x/y", "v1", None),
            "127.0.0.1:5001",
            "v1",
        ),
        # Docker Hub: the default registry, library/ for single names, latest by default
        ("oci:hello", Reference("docker.io", "library/hello", "latest", None), None, "latest"),
        ("oci:docker.io/hello:1", Reference("docker.io", "library/hello", "1", None), None, "1"),
        # a first component with a dot, a port or `localhost` is a registry
        ("oci:ghcr.io/a/b:c", Reference("ghcr.io", "a/b", "c", None), "ghcr.io", "c"),
        ("oci:localhost/a", Reference("localhost", "a", "latest", None), "localhost", "latest"),
        ("oci:localhost:5000/a", Reference("localhost:5000", "a", "latest", None), None, None),
        # digests: pulled by digest, a tag beside one is only a label
        (f"oci:ghcr.io/a@{DIGEST}", Reference("ghcr.io", "a", None, DIGEST), None, DIGEST),
        (f"oci:ghcr.io/a:v1@{DIGEST}", Reference("ghcr.io", "a", "v1", DIGEST), None, DIGEST),
        # `oci://` always names the registry first, even without a dot
        ("oci://registry/a/b", Reference("registry", "a/b", "latest", None), "registry", None),
        (
            "oci:a__b/c-d.e_f:t.1-x",
            Reference("docker.io", "a__b/c-d.e_f", "t.1-x", None),
            None,
            None,
        ),
    ],
)
def test_accepted_forms(text, expected, api_host, pull_ref):
    reference = parse_reference(text)
    assert reference == expected
    if api_host is not None:
        assert reference.api_host == api_host
    if pull_ref is not None:
        assert reference.pull_ref == pull_ref


def test_docker_io_is_served_by_registry_1_and_a_reference_prints_back():
    reference = parse_reference("oci:foo/bar:1")
    assert reference.api_host == "registry-1.docker.io"
    assert str(reference) == "oci:docker.io/foo/bar:1"
    assert parse_reference(str(reference)) == reference


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("oci:", "no repository after oci:"),
        ("oci://host", "no repository after the registry 'host'"),
        (
            "oci:ghcr.io/Upper/x",
            "repository component 'Upper' is not valid (repositories are lowercase)",
        ),
        ("oci:ghcr.io/a/-b", "repository component '-b' is not valid"),
        ("oci:ghcr.io/a:bad:tag", "repository component 'a:bad' is not valid"),
        ("oci:ghcr.io/a:.tag", "tag '.tag' is not a valid tag"),
        ("oci:ghcr.io/a@sha256:12", "digest 'sha256:12' is not sha256: followed by 64"),
        ("oci:ghcr.io/a@sha512:" + "0" * 128, "is not sha256: followed by 64"),
        ("oci://bad_host:5000/a", "registry 'bad_host:5000' is not HOST[:PORT]"),
        ("oci:ghcr.io/" + "a/" * 130 + "a", "name longer than 255 characters"),
        ("ghcr.io/a", "not an oci: reference"),
    ],
)
def test_refused_forms_name_the_part_that_is_wrong(text, message):
    with pytest.raises(InvalidReference) as raised:
        parse_reference(text)
    assert message in str(raised.value)


def test_insecure_registry_hosts_are_host_and_optional_port():
    assert check_registry_host("127.0.0.1:5001") == "127.0.0.1:5001"
    assert check_registry_host("[::1]:5000") == "[::1]:5000"
    with pytest.raises(InvalidReference, match="'http://x' is not a registry HOST"):
        check_registry_host("http://x")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.example/token",service="registry.example",'
            'scope="repository:a/b:pull"',
            (
                "bearer",
                {
                    "realm": "https://auth.example/token",
                    "service": "registry.example",
                    "scope": "repository:a/b:pull",
                },
            ),
        ),
        ('Basic realm="Registry Realm"', ("basic", {"realm": "Registry Realm"})),
        (
            'Bearer realm="a\\"b", error=invalid_token',
            ("bearer", {"realm": 'a"b', "error": "invalid_token"}),
        ),
        ("", ("", {})),
    ],
)
def test_challenges_are_parsed_with_quoted_and_bare_values(header, expected):
    assert parse_challenge(header) == expected


def write_config(folder, auths) -> dict[str, str]:
    (folder / "config.json").write_text(json.dumps({"auths": auths}))
    return {"DOCKER_CONFIG": str(folder)}


def encoded(pair: str) -> str:
    return base64.b64encode(pair.encode()).decode()


def test_docker_config_credentials_by_host_url_or_docker_hub_key(tmp_path):
    environ = write_config(
        tmp_path,
        {
            "ghcr.io": {"auth": encoded("me:pa:ss")},
            "https://registry.example:5000": {"username": "u", "password": "p"},
            "https://index.docker.io/v1/": {"auth": encoded("hub:key")},
        },
    )
    assert load_docker_credentials("ghcr.io", environ) == Credentials("me", "pa:ss")
    assert load_docker_credentials("registry.example:5000", environ) == Credentials("u", "p")
    assert load_docker_credentials("docker.io", environ) == Credentials("hub", "key")
    assert load_docker_credentials("other.example", environ) is None
    assert "pa:ss" not in repr(load_docker_credentials("ghcr.io", environ))


def test_no_docker_config_means_anonymous(tmp_path):
    assert load_docker_credentials("ghcr.io", {"DOCKER_CONFIG": str(tmp_path)}) is None


def test_a_broken_docker_config_is_an_error_that_names_the_file_and_entry(tmp_path):
    environ = write_config(tmp_path, {"ghcr.io": {"auth": "not base64!"}})
    with pytest.raises(AuthError, match=r"config.json: auths.ghcr.io.auth: not base64"):
        load_docker_credentials("ghcr.io", environ)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(AuthError, match=r"config.json: cannot be read as JSON"):
        load_docker_credentials("ghcr.io", environ)


def install_helper(folder, monkeypatch, name: str, script: str) -> None:
    """A `docker-credential-<name>` on PATH: a real executable, as Docker's helpers are."""
    helper = folder / f"docker-credential-{name}"
    helper.write_text("#!/bin/sh\nread server\n" + script)
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


HOLDS_GHCR = """case "$server" in
  ghcr.io) echo '{"ServerURL": "ghcr.io", "Username": "helped", "Secret": "s3"}' ;;
  https://index.docker.io/v1/) echo '{"Username": "hub-helped", "Secret": "h"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
"""


def test_credential_helpers_come_first_in_dockers_order(tmp_path, monkeypatch):
    install_helper(tmp_path, monkeypatch, "store", HOLDS_GHCR)
    install_helper(tmp_path, monkeypatch, "never", "echo 'must not be asked' >&2; exit 3\n")
    environ = {"DOCKER_CONFIG": str(tmp_path)}
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "credsStore": "store",
                "credHelpers": {"quay.io": "never"},
                "auths": {"ghcr.io": {"auth": encoded("file:f")}, "other.example": {}},
            }
        )
    )
    assert load_docker_credentials("ghcr.io", environ) == Credentials("helped", "s3")
    assert load_docker_credentials("docker.io", environ) == Credentials("hub-helped", "h")
    # The helper holds nothing for it: the auths entry (empty here) is used.
    assert load_docker_credentials("other.example", environ) is None
    with pytest.raises(AuthError, match=r"docker-credential-never failed \(3\): must not be asked"):
        load_docker_credentials("quay.io", environ)


def test_a_missing_or_garbled_helper_is_an_error_that_names_it(tmp_path, monkeypatch):
    environ = {"DOCKER_CONFIG": str(tmp_path)}
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "absent-helper"}))
    with pytest.raises(AuthError, match="credential helper docker-credential-absent-helper"):
        load_docker_credentials("ghcr.io", environ)
    install_helper(tmp_path, monkeypatch, "garbled", "echo '{\"Username\": 1}'\n")
    (tmp_path / "config.json").write_text(json.dumps({"credsStore": "garbled"}))
    with pytest.raises(AuthError, match="not a Username/Secret JSON object"):
        load_docker_credentials("ghcr.io", environ)


def test_credentials_never_go_to_a_plain_http_realm_of_an_https_registry():
    """A registry's 401 names the realm; over https, a `http://` realm would get the password
    in clear, so it is refused before any request (driven through httpx's auth-flow protocol)."""
    with httpx.Client() as token_client:
        auth = RegistryAuth(Credentials("u", "p"), token_client, plain_http=False)
        request = httpx.Request("GET", "https://registry.example/v2/a/manifests/v1")
        flow = auth.auth_flow(request)
        next(flow)
        challenge = {"www-authenticate": 'Bearer realm="http://realm.example/token"'}
        with pytest.raises(AuthError, match=r"realm 'http://realm\.example/token' is not an https"):
            flow.send(httpx.Response(401, headers=challenge, request=request))
