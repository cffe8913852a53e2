"""The policy schema as an operator meets it: files in a folder, values in force, error lines."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from pathlib import Path

import pytest

from supervisor.errors import ConfigError
from supervisor.policies import (
    DEFAULT_POLICY,
    Policy,
    is_valid_tenant_name,
    load_policy_dir,
    load_policy_file,
    parse_policy,
    parse_size,
)

REPO_POLICIES = Path(__file__).resolve().parent.parent / "policies"
SOURCE = "policies/acme.toml"
TOKEN_HASH = hashlib.sha256(b"s3cret-token").hexdigest()


def parse(data: dict, base: Policy = DEFAULT_POLICY) -> Policy:
    return parse_policy(data, source=SOURCE, base=base)


def parse_error(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# --- tenant names -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "a", "acme-corp", "0x", "t1", "a" * 63])
def test_dns_labels_are_tenant_names(name: str) -> None:
    assert is_valid_tenant_name(name)


@pytest.mark.parametrize(
    "name",
    ["", "Acme", "-acme", "acme-", "_defaults", ".hidden", "a_b", "a.b", "a" * 64, "demo\n"],
)
def test_non_labels_are_not_tenant_names(name: str) -> None:
    assert not is_valid_tenant_name(name)


def test_reserved_top_level_path_is_not_a_tenant_name() -> None:
    assert not is_valid_tenant_name("healthz")


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096),
        (0, 0),
        ("64MiB", 64 * 1024 * 1024),
        ("1 MiB", 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("100B", 100),
        ("1KB", 1000),
        ("1MB", 1_000_000),
        ("2GB", 2_000_000_000),
        ("64mib", 64 * 1024 * 1024),
        ("1234", 1234),
    ],
)
def test_parse_size_accepts_bytes_and_units(text: int | str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "MiB", "1.5MiB", "-1", -1, "64M", "64 Mi B", " 64MiB", "1e6", "٣KiB", True, 1.0]
)
def test_parse_size_rejects_everything_else(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)  # type: ignore[arg-type]


# --- parsing: values and inheritance ------------------------------------------------------


def test_empty_file_is_the_base_policy() -> None:
    assert parse({}) == DEFAULT_POLICY


def test_full_policy_from_design_example() -> None:
    policy = parse(
        {
            "hosts": ["Acme.Example.com", "*.acme.example.net"],
            "fuel_per_request": 1_000_000,
            "memory_bytes": "32MiB",
            "timeout_ms": 500,
            "max_concurrency": 2,
            "max_queue": 0,
            "queue_timeout_ms": 0,
            "max_request_bytes": "0B",
            "max_response_bytes": "1KiB",
            "max_module_bytes": 2048,
            "max_modules": 3,
            "admin_token_sha256": TOKEN_HASH,
            "env": {"GREETING": "hello"},
            "volumes": {"/static": "static"},
        }
    )
    assert policy.hosts == ("acme.example.com", "*.acme.example.net")
    assert policy.fuel_per_request == 1_000_000
    assert policy.memory_bytes == 32 * 1024 * 1024
    assert policy.timeout_ms == 500
    assert policy.max_concurrency == 2
    assert policy.max_queue == 0
    assert policy.queue_timeout_ms == 0
    assert policy.max_request_bytes == 0
    assert policy.max_response_bytes == 1024
    assert policy.max_module_bytes == 2048
    assert policy.max_modules == 3
    assert policy.admin_token_sha256 == TOKEN_HASH
    assert dict(policy.env) == {"GREETING": "hello"}
    assert dict(policy.volumes) == {"/static": "static"}


def test_missing_keys_inherit_from_base() -> None:
    base = parse({"timeout_ms": 100, "max_queue": 5})
    policy = parse({"max_queue": 7}, base=base)
    assert policy.timeout_ms == 100
    assert policy.max_queue == 7
    assert policy.memory_bytes == DEFAULT_POLICY.memory_bytes


def test_env_and_volumes_merge_over_base_and_tenant_wins() -> None:
    base = parse({"env": {"A": "base", "B": "base"}, "volumes": {"/shared": "shared"}})
    policy = parse({"env": {"B": "tenant", "C": "tenant"}, "volumes": {"/own": "own"}}, base=base)
    assert dict(policy.env) == {"A": "base", "B": "tenant", "C": "tenant"}
    assert dict(policy.volumes) == {"/shared": "shared", "/own": "own"}


def test_volume_paths_are_normalised_before_merging() -> None:
    base = parse({"volumes": {"/static": "old"}})
    policy = parse({"volumes": {"//static/./": "./assets//css/"}}, base=base)
    assert dict(policy.volumes) == {"/static": "assets/css"}


def test_limits_accept_their_bounds() -> None:
    low = parse({"memory_bytes": "64KiB", "timeout_ms": 1, "max_response_bytes": "1KiB"})
    high = parse({"memory_bytes": "4GiB", "timeout_ms": 600_000, "fuel_per_request": 10**13})
    assert (low.memory_bytes, low.timeout_ms, low.max_response_bytes) == (65536, 1, 1024)
    assert (high.memory_bytes, high.timeout_ms, high.fuel_per_request) == (
        4 * 1024**3,
        600_000,
        10**13,
    )


# --- parsing: errors name the file, the key and the reason --------------------------------


def test_out_of_range_size_message() -> None:
    error = parse_error({"memory_bytes": "1KiB"})
    assert str(error) == 'policies/acme.toml: memory_bytes: must be at least 64KiB, got "1KiB"'
    assert (error.source, error.key) == (SOURCE, "memory_bytes")


def test_above_range_message() -> None:
    error = parse_error({"timeout_ms": 700_000})
    assert str(error) == "policies/acme.toml: timeout_ms: must be at most 600_000, got 700_000"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fuel_per_request", 0),
        ("fuel_per_request", 10**13 + 1),
        ("memory_bytes", 65535),
        ("memory_bytes", "5GiB"),
        ("timeout_ms", 0),
        ("max_concurrency", 0),
        ("max_concurrency", 10_001),
        ("max_queue", -1),
        ("max_queue", 100_001),
        ("queue_timeout_ms", -1),
        ("max_request_bytes", "2GiB"),
        ("max_response_bytes", "1000B"),
        ("max_module_bytes", 1023),
        ("max_modules", 0),
    ],
)
def test_every_limit_rejects_out_of_range(key: str, value: object) -> None:
    error = parse_error({key: value})
    assert error.key == key
    assert "must be" in error.reason


def test_typo_is_unknown_and_suggests_the_known_key() -> None:
    error = parse_error({"timout_ms": 100})
    assert str(error) == 'policies/acme.toml: timout_ms: unknown key (did you mean "timeout_ms"?)'


def test_unrelated_unknown_key_lists_known_keys() -> None:
    error = parse_error({"frobnicate": 1})
    assert error.key == "frobnicate"
    assert "unknown key" in error.reason
    assert "timeout_ms" in error.reason


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"timeout_ms": "2000"}, "timeout_ms", 'must be an integer, got a string ("2000")'),
        ({"timeout_ms": 2.5}, "timeout_ms", "must be an integer, got a float (2.5)"),
        ({"max_queue": True}, "max_queue", "must be an integer, got a boolean (true)"),
        ({"memory_bytes": 1.5}, "memory_bytes", "got a float (1.5)"),
        ({"memory_bytes": "64M"}, "memory_bytes", 'unknown unit "M"'),
        ({"hosts": "acme.com"}, "hosts", 'must be an array of strings, got a string ("acme.com")'),
        ({"hosts": [1]}, "hosts[0]", "must be a string, got an integer (1)"),
        ({"env": ["A"]}, "env", "must be a table"),
        ({"env": {"PORT": 8080}}, "env.PORT", "must be a string, got an integer (8_080)"),
        ({"volumes": "static"}, "volumes", "must be a table"),
        ({"volumes": {"/static": 1}}, 'volumes."/static"', "must be a string"),
    ],
)
def test_wrong_types_are_named(data: dict, key: str, expected: str) -> None:
    error = parse_error(data)
    assert error.key == key
    assert expected in error.reason


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("acme.com:8080", "bare host name"),
        ("https://acme.com", "bare host name"),
        ("acme.*.com", '"*" as its whole first label'),
        ("*", '"*" as its whole first label'),
        ("*acme.com", '"*" as its whole first label'),
        ("acme..com", "not a host name"),
        ("acme.com.", "not a host name"),
        ("-acme.com", "not a host name"),
        ("acme_corp.com", "not a host name"),
        ("bücher.de", "xn--"),
        ("", "not a host name"),
        ("a." * 127 + "com", "longer than 253"),
    ],
)
def test_bad_hosts_are_refused(host: str, reason: str) -> None:
    error = parse_error({"hosts": ["ok.example.com", host]})
    assert error.key == "hosts[1]"
    assert reason in error.reason


def test_duplicate_host_is_refused_case_insensitively() -> None:
    error = parse_error({"hosts": ["acme.com", "ACME.com"]})
    assert error.key == "hosts[1]"
    assert "listed twice" in error.reason


@pytest.mark.parametrize("name", ["1ABC", "MY-VAR", "A B", ""])
def test_bad_env_names_are_refused(name: str) -> None:
    error = parse_error({"env": {name: "x"}})
    assert error.key is not None and error.key.startswith("env.")
    assert "not a valid variable name" in error.reason


def test_env_value_with_nul_is_refused() -> None:
    assert "NUL" in parse_error({"env": {"A": "x\0y"}}).reason


@pytest.mark.parametrize(
    ("guest", "folder", "reason"),
    [
        ("static", "static", "must be absolute"),
        ("/static/../etc", "static", '".."'),
        ("/static", "/srv/static", "not absolute"),
        ("/static", "../other-tenant", '".."'),
        ("/static", "static/../../x", '".."'),
        ("/static", ".", "a folder under the tenant's folder"),
        ("/static", "", "a folder under the tenant's folder"),
    ],
)
def test_volume_escapes_are_refused(guest: str, folder: str, reason: str) -> None:
    error = parse_error({"volumes": {guest: folder}})
    assert error.key is not None and error.key.startswith("volumes.")
    assert reason in error.reason


def test_same_guest_path_twice_is_refused() -> None:
    error = parse_error({"volumes": {"/static": "a", "/static/": "b"}})
    assert "listed twice" in error.reason


def test_admin_token_hash_is_normalised_to_lower_case() -> None:
    assert parse({"admin_token_sha256": TOKEN_HASH.upper()}).admin_token_sha256 == TOKEN_HASH


def test_pasted_token_is_refused_without_echoing_it() -> None:
    error = parse_error({"admin_token_sha256": "s3cret-token"})
    assert error.key == "admin_token_sha256"
    assert "s3cret-token" not in str(error)


# --- the Policy value ---------------------------------------------------------------------


def test_policy_is_immutable_including_its_tables() -> None:
    env = {"A": "1"}
    policy = Policy(env=env, hosts=["a.com"])  # type: ignore[arg-type]
    env["A"] = "changed"
    assert policy.env["A"] == "1"
    assert policy.hosts == ("a.com",)
    with pytest.raises(TypeError):
        policy.env["B"] = "2"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.timeout_ms = 1  # type: ignore[misc]


def test_repr_is_readable_and_masks_the_admin_hash() -> None:
    policy = parse({"admin_token_sha256": TOKEN_HASH, "env": {"GREETING": "hi"}})
    text = repr(policy)
    assert TOKEN_HASH not in text
    assert "admin_token_sha256=<set>" in text
    assert "env={'GREETING': 'hi'}" in text
    assert "timeout_ms=2000" in text
    assert "admin_token_sha256=None" in repr(DEFAULT_POLICY)


def test_to_dict_is_json_and_hides_the_admin_hash() -> None:
    policy = parse({"hosts": ["acme.com"], "admin_token_sha256": TOKEN_HASH})
    shown = json.loads(json.dumps(policy.to_dict()))
    assert TOKEN_HASH not in json.dumps(shown)
    assert shown["admin_token_set"] is True
    assert "admin_token_sha256" not in shown
    assert shown["hosts"] == ["acme.com"]
    assert shown["memory_bytes"] == 64 * 1024 * 1024
    assert DEFAULT_POLICY.to_dict()["admin_token_set"] is False


# --- files and folders --------------------------------------------------------------------


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "acme.toml", 'timeout_ms = 100\nmemory_bytes = "64MiB\n')
    with pytest.raises(ConfigError) as info:
        load_policy_file(path)
    assert info.value.source == str(path)
    assert "invalid TOML" in info.value.reason
    assert "line 2" in info.value.reason


def test_load_policy_file_reports_error_with_path_as_source(tmp_path: Path) -> None:
    path = write(tmp_path, "acme.toml", "timout_ms = 5\n")
    with pytest.raises(ConfigError) as info:
        load_policy_file(path)
    assert str(info.value).startswith(f"{path}: timout_ms: unknown key")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "acme.toml"
    path.write_bytes(b'[env]\nA = "\xff"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_policy_file(path)


def test_policy_dir_applies_defaults_and_isolates_broken_files(tmp_path: Path) -> None:
    write(tmp_path, "_defaults.toml", 'timeout_ms = 300\n[env]\nREGION = "eu"\n')
    write(tmp_path, "acme.toml", 'hosts = ["acme.com"]\n[env]\nGREETING = "hi"\n')
    write(tmp_path, "beta.toml", "max_queue = 1\n")
    write(tmp_path, "broken.toml", "timout_ms = 5\n")
    write(tmp_path, "Bad_Name.toml", "")
    write(tmp_path, ".hidden.toml", "garbage = [")
    write(tmp_path, "README.md", "not a policy")
    (tmp_path / "folder.toml").mkdir()

    loaded = load_policy_dir(tmp_path)

    assert sorted(loaded.policies) == ["acme", "beta"]
    assert sorted(loaded.errors) == ["Bad_Name.toml", "broken.toml"]
    assert "not a valid tenant name" in loaded.errors["Bad_Name.toml"].reason
    assert loaded.errors["broken.toml"].key == "timout_ms"
    assert loaded.defaults.timeout_ms == 300
    acme = loaded.policies["acme"]
    assert acme.timeout_ms == 300
    assert dict(acme.env) == {"REGION": "eu", "GREETING": "hi"}
    assert acme.hosts == ("acme.com",)
    assert loaded.policies["beta"].max_queue == 1


def test_broken_defaults_file_falls_back_to_built_in_defaults(tmp_path: Path) -> None:
    write(tmp_path, "_defaults.toml", "timeout_ms = -5\n")
    write(tmp_path, "acme.toml", "max_queue = 1\n")
    loaded = load_policy_dir(tmp_path)
    assert loaded.errors["_defaults.toml"].key == "timeout_ms"
    assert loaded.defaults == DEFAULT_POLICY
    assert loaded.policies["acme"].timeout_ms == DEFAULT_POLICY.timeout_ms


@pytest.mark.parametrize(
    "key_line", ['hosts = ["all.example.com"]', f'admin_token_sha256 = "{TOKEN_HASH}"']
)
def test_defaults_file_cannot_name_hosts_or_credentials(tmp_path: Path, key_line: str) -> None:
    write(tmp_path, "_defaults.toml", key_line + "\n")
    loaded = load_policy_dir(tmp_path)
    assert "tenant's own file" in loaded.errors["_defaults.toml"].reason


def test_reserved_tenant_file_is_an_error_entry(tmp_path: Path) -> None:
    write(tmp_path, "healthz.toml", "")
    loaded = load_policy_dir(tmp_path)
    assert "reserved" in loaded.errors["healthz.toml"].reason
    assert not loaded.policies


def test_policy_dir_is_deterministic(tmp_path: Path) -> None:
    for name in ["zeta", "alpha", "mid"]:
        write(tmp_path, f"{name}.toml", "")
    first, second = load_policy_dir(tmp_path), load_policy_dir(tmp_path)
    assert list(first.policies) == ["alpha", "mid", "zeta"]
    assert first == second


def test_missing_policy_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot list"):
        load_policy_dir(tmp_path / "absent")


def test_kubernetes_configmap_layout_is_read(tmp_path: Path) -> None:
    """A ConfigMap mount: visible names are symlinks into a hidden, timestamped folder."""
    data = tmp_path / "..2024_01_01_00_00_00.000000001"
    data.mkdir()
    write(data, "acme.toml", "max_queue = 3\n")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "acme.toml").symlink_to("..data/acme.toml")
    loaded = load_policy_dir(tmp_path)
    assert loaded.errors == {}
    assert loaded.policies["acme"].max_queue == 3


# --- the committed policy folder ----------------------------------------------------------


def test_committed_policies_validate() -> None:
    loaded = load_policy_dir(REPO_POLICIES)
    assert dict(loaded.errors) == {}
    demo = loaded.policies["demo"]
    assert demo.hosts == ()
    assert demo.timeout_ms == 1000
    assert demo.memory_bytes == 32 * 1024 * 1024
    assert dict(demo.env) == {"GREETING": "hello from wasm-supervisor"}
    assert dict(demo.volumes) == {}  # site.wat's volume is its own, in modules.toml


def test_committed_defaults_file_shows_every_limit_with_its_built_in_value() -> None:
    data = tomllib.loads((REPO_POLICIES / "_defaults.toml").read_text(encoding="utf-8"))
    limits = {f.name for f in dataclasses.fields(Policy)} - {
        "hosts",
        "env",
        "volumes",
        "admin_token_sha256",
    }
    assert limits <= set(data)
    assert load_policy_dir(REPO_POLICIES).defaults == DEFAULT_POLICY
