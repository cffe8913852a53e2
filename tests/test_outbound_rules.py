"""Outbound allow patterns and the SSRF guard (supervisor/outbound/rules.py), without a server;
and how the policy and modules.toml refuse a bad pattern."""

from __future__ import annotations

import re

import pytest
import wasmtime

from supervisor.errors import ConfigError, ModuleRejected
from supervisor.outbound.rules import (
    PatternError,
    address_allowed,
    parse_allow_list,
    parse_pattern,
)
from supervisor.policies import parse_policy
from supervisor.tenants import check_module_binary, parse_modules_toml


@pytest.mark.parametrize(
    ("pattern", "url", "allowed"),
    [
        ("https://api.example.com", ("https", "api.example.com", 443), True),
        ("https://api.example.com", ("http", "api.example.com", 80), False),  # scheme
        ("https://api.example.com", ("https", "api.example.com", 8443), False),  # port
        ("https://api.example.com:8443", ("https", "api.example.com", 8443), True),
        ("HTTPS://API.Example.com/", ("https", "api.example.com", 443), True),
        ("https://*.example.com", ("https", "a.b.example.com", 443), True),
        ("https://*.example.com", ("https", "example.com", 443), False),  # below it only
        ("https://*.example.com", ("https", "badexample.com", 443), False),
        ("https://*", ("https", "anything.test", 443), True),
        ("*://api.example.com", ("http", "api.example.com", 80), True),
        ("http://api.example.com:*", ("http", "api.example.com", 1234), True),
        ("http://[::1]:8080", ("http", "::1", 8080), True),
    ],
)
def test_a_pattern_compares_scheme_host_and_port(pattern, url, allowed):
    assert parse_allow_list([pattern]).allows(*url) is allowed


def test_an_empty_list_allows_nothing_and_allow_all_allows_everything():
    assert not parse_allow_list([]).allows("https", "example.com", 443)
    assert parse_allow_list(["insecure:allow-all"]).allows("http", "example.com", 1)


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("api.example.com", "scheme://host[:port]"),  # WAGI failed every request on this
        ("https://api.example.com/v1", "scheme://host[:port]"),
        ("ftp://example.com", "not http, https or *"),
        ("https://a.*.example.com", "wildcard"),
        ("https://exa mple.com", "not a host name"),
        ("https://example.com:70000", "between 1 and 65535"),
        ("http://[nope]", "not an IPv6 address"),
    ],
)
def test_a_bad_pattern_is_refused_with_the_reason(pattern, reason):
    with pytest.raises(PatternError, match=re.escape(reason)):
        parse_pattern(pattern)


def test_only_names_without_a_wildcard_count_as_named_exactly():
    rules = parse_allow_list(["http://svc.ns:80", "https://*.example.com", "http://[::1]"])
    assert rules.exact_hosts == frozenset({"svc.ns", "::1"})


@pytest.mark.parametrize(
    ("host", "address", "named", "allowed"),
    [
        ("api.example.com", "93.184.216.34", set(), True),  # public
        ("evil.test", "127.0.0.1", set(), False),  # loopback
        ("evil.test", "10.1.2.3", set(), False),  # private
        ("evil.test", "192.168.0.1", set(), False),
        ("evil.test", "169.254.1.1", set(), False),  # link-local
        ("evil.test", "100.64.0.1", set(), False),  # shared (carrier-grade NAT)
        ("evil.test", "::1", set(), False),
        ("evil.test", "fe80::1%2", set(), False),
        ("evil.test", "::ffff:127.0.0.1", set(), False),  # IPv4-mapped loopback
        ("svc.ns", "10.1.2.3", {"svc.ns"}, True),  # named exactly: in-cluster service
        ("localhost", "127.0.0.1", {"localhost"}, True),
        ("meta.test", "169.254.169.254", {"meta.test"}, False),  # metadata: never
        ("169.254.169.254", "169.254.169.254", {"169.254.169.254"}, False),
        ("meta6.test", "fd00:ec2::254", {"meta6.test"}, False),
    ],
)
def test_the_guard_refuses_addresses_that_are_not_global_unless_named_exactly(
    host, address, named, allowed
):
    assert address_allowed(host, address, frozenset(named)) is allowed


def test_the_policy_refuses_a_bad_outbound_pattern_naming_the_entry():
    with pytest.raises(ConfigError, match=r"outbound_hosts\[1\].*scheme://host"):
        parse_policy({"outbound_hosts": ["https://ok.example", "api.example.com"]}, source="p")
    policy = parse_policy({"outbound_hosts": ["https://ok.example"]}, source="p")
    assert policy.to_dict()["outbound_hosts"] == ["https://ok.example"]


def test_modules_toml_reads_wagis_outbound_keys_and_refuses_bad_values():
    entry = {"route": "/", "module": "m.wasm"}
    (spec,) = parse_modules_toml(
        {"module": [{**entry, "allowed_hosts": ["https://a.test"], "http_max_concurrency": 2}]},
        source="m",
    )
    assert spec.allowed_hosts == ("https://a.test",) and spec.http_max_concurrency == 2
    with pytest.raises(ConfigError, match=r"allowed_hosts.*scheme://host"):
        parse_modules_toml({"module": [{**entry, "allowed_hosts": ["a.test"]}]}, source="m")
    with pytest.raises(ConfigError, match=r"http_max_concurrency.*at least 1"):
        parse_modules_toml({"module": [{**entry, "http_max_concurrency": 0}]}, source="m")


def test_exactly_the_five_outbound_imports_are_offered():
    offered = "".join(
        f'(import "wasi_experimental_http" "{name}" (func (param i32) (result i32)))'
        for name in ("req", "close", "header_get", "headers_get_all", "body_read")
    )
    check_module_binary(wasmtime.wat2wasm(f"(module {offered})"), name="m", memory_limit=1 << 20)
    other = '(module (import "wasi_experimental_http" "connect" (func)))'
    with pytest.raises(ModuleRejected, match=r"imports wasi_experimental_http\.connect.*offers"):
        check_module_binary(wasmtime.wat2wasm(other), name="m", memory_limit=1 << 20)
