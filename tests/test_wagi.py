"""The WAGI contract (WAGI.md, "Request → guest" and "Guest → response"), rule by rule."""

from __future__ import annotations

import dataclasses

import pytest

from supervisor.errors import GuestBadOutput, Outcome
from supervisor.policies import Policy
from supervisor.wagi import CgiRequest, CgiResponse, build_argv, build_env, parse_output

MISSING = "Exactly one of 'location' or 'content-type' must be specified"


def make_request(**changes: object) -> CgiRequest:
    base = CgiRequest(
        method="GET",
        path="/api/items",
        query="",
        has_query=False,
        http_version="1.1",
        headers=[("host", "example.com")],
        host="example.com",
        server_port=8080,
        client_addr="192.0.2.7",
        body_length=0,
    )
    return dataclasses.replace(base, **changes)


def env_for(request: CgiRequest | None = None, **changes: object) -> dict[str, str]:
    args: dict = {
        "script_name": "/api",
        "path_info_raw": "/items",
        "matched_route": "/api/...",
        "base_path": "/",
        "tenant_env": {},
    }
    args.update(changes)
    return build_env(request or make_request(), **args)


DEFAULT_HEADERS = Policy().max_response_headers
DEFAULT_HEADER_BYTES = Policy().max_response_header_bytes


def parse(
    stdout: bytes,
    max_headers: int = DEFAULT_HEADERS,
    max_header_bytes: int = DEFAULT_HEADER_BYTES,
) -> CgiResponse:
    """`parse_output` with the default policy's header bounds unless told otherwise."""
    return parse_output(stdout, max_headers=max_headers, max_header_bytes=max_header_bytes)


def bad_output(stdout: bytes, **limits: int) -> GuestBadOutput:
    with pytest.raises(GuestBadOutput) as caught:
        parse(stdout, **limits)
    assert caught.value.outcome is Outcome.BAD_OUTPUT
    return caught.value


# Request → guest: the environment

CGI_VARIABLES = frozenset(
    {
        "REQUEST_METHOD",
        "SCRIPT_NAME",
        "PATH_INFO",
        "X_RAW_PATH_INFO",
        "PATH_TRANSLATED",
        "QUERY_STRING",
        "X_MATCHED_ROUTE",
        "X_FULL_URL",
        "X_BASE_PATH",
        "SERVER_NAME",
        "SERVER_PORT",
        "SERVER_PROTOCOL",
        "SERVER_SOFTWARE",
        "GATEWAY_INTERFACE",
        "REMOTE_ADDR",
        "REMOTE_HOST",
        "AUTH_TYPE",
        "REMOTE_USER",
        "CONTENT_LENGTH",
        "CONTENT_TYPE",
    }
)
"""Every variable WAGI.md says is always set (test_wagi_e2e checks them through a server too)."""


def test_every_cgi_variable_is_set_even_when_empty() -> None:
    env = env_for(make_request(headers=[], host=""), path_info_raw="", script_name="/")
    for name in CGI_VARIABLES:
        assert isinstance(env[name], str), name
    assert env["PATH_INFO"] == env["X_RAW_PATH_INFO"] == env["PATH_TRANSLATED"] == ""
    assert env["QUERY_STRING"] == env["CONTENT_TYPE"] == ""
    assert env["AUTH_TYPE"] == env["REMOTE_USER"] == ""


def test_request_method_is_as_sent() -> None:
    assert env_for(make_request(method="PROPFIND"))["REQUEST_METHOD"] == "PROPFIND"


def test_route_variables_are_passed_through() -> None:
    env = env_for(script_name="/acme/api", matched_route="/api/...", base_path="/acme")
    assert env["SCRIPT_NAME"] == "/acme/api"
    assert env["X_MATCHED_ROUTE"] == "/api/..."
    assert env["X_BASE_PATH"] == "/acme"


def test_path_info_is_percent_decoded_and_raw_path_info_is_not() -> None:
    env = env_for(path_info_raw="/a%20b/%C3%A9%2Fx")
    assert env["PATH_INFO"] == "/a b/é/x"
    assert env["PATH_TRANSLATED"] == "/a b/é/x"
    assert env["X_RAW_PATH_INFO"] == "/a%20b/%C3%A9%2Fx"


def test_path_info_replaces_invalid_utf8() -> None:
    assert env_for(path_info_raw="/%FF")["PATH_INFO"] == "/\ufffd"


def test_path_info_keeps_plus_signs() -> None:
    assert env_for(path_info_raw="/a+b")["PATH_INFO"] == "/a+b"


def test_query_string_is_raw() -> None:
    request = make_request(query="q=a%20b&x=+", has_query=True)
    assert env_for(request)["QUERY_STRING"] == "q=a%20b&x=+"


def test_server_name_and_port_come_from_host() -> None:
    env = env_for(make_request(host="example.org:9000"))
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.org", "9000")


def test_server_port_defaults_to_listening_port() -> None:
    env = env_for(make_request(host="example.org", server_port=3000))
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.org", "3000")


def test_host_with_empty_or_bad_port_uses_listening_port() -> None:
    assert env_for(make_request(host="example.org:"))["SERVER_PORT"] == "8080"
    env = env_for(make_request(host="example.org:http"))
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("example.org", "8080")


def test_ipv6_host_keeps_brackets_and_its_port() -> None:
    env = env_for(make_request(host="[::1]:9000"))
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("[::1]", "9000")
    env = env_for(make_request(host="[2001:db8::1]"))
    assert (env["SERVER_NAME"], env["SERVER_PORT"]) == ("[2001:db8::1]", "8080")


def test_full_url_always_has_a_port() -> None:
    env = env_for(make_request(host="example.com", path="/api/items"))
    assert env["X_FULL_URL"] == "http://example.com:8080/api/items"


def test_full_url_keeps_raw_path_and_query() -> None:
    request = make_request(
        host="[::1]:9000", path="/api/a%20b", query="x=1&y=%2F", has_query=True, scheme="https"
    )
    assert env_for(request)["X_FULL_URL"] == "https://[::1]:9000/api/a%20b?x=1&y=%2F"


def test_full_url_keeps_an_empty_query_mark() -> None:
    request = make_request(path="/api/items", query="", has_query=True)
    assert env_for(request)["X_FULL_URL"] == "http://example.com:8080/api/items?"


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_server_protocol_is_the_request_version(version: str) -> None:
    assert env_for(make_request(http_version=version))["SERVER_PROTOCOL"] == f"HTTP/{version}"


def test_server_software_and_gateway_interface() -> None:
    env = env_for()
    assert env["SERVER_SOFTWARE"] == "WAGI/1"
    assert env["GATEWAY_INTERFACE"] == "CGI/1.1"


def test_remote_addr_and_host_are_the_client_ip() -> None:
    env = env_for(make_request(client_addr="2001:db8::7"))
    assert env["REMOTE_ADDR"] == env["REMOTE_HOST"] == "2001:db8::7"


def test_content_length_is_the_body_as_read() -> None:
    assert env_for(make_request(body_length=0))["CONTENT_LENGTH"] == "0"
    # Not the header: a chunked body has none, and a header can lie.
    request = make_request(headers=[("content-length", "99")], body_length=12)
    assert env_for(request)["CONTENT_LENGTH"] == "12"


def test_content_type_is_the_request_header_value() -> None:
    request = make_request(headers=[("content-type", "application/json")])
    env = env_for(request)
    assert env["CONTENT_TYPE"] == "application/json"
    assert env["HTTP_CONTENT_TYPE"] == "application/json"


def test_headers_become_http_variables() -> None:
    request = make_request(headers=[("x-request-id", "abc"), ("accept", "*/*")])
    env = env_for(request)
    assert env["HTTP_X_REQUEST_ID"] == "abc"
    assert env["HTTP_ACCEPT"] == "*/*"


def test_authorization_and_connection_headers_are_left_out() -> None:
    request = make_request(headers=[("authorization", "Bearer s3cret"), ("connection", "close")])
    env = env_for(request)
    assert "HTTP_AUTHORIZATION" not in env
    assert "HTTP_CONNECTION" not in env
    assert "s3cret" not in env.values()


def test_repeated_header_gives_last_value() -> None:
    request = make_request(
        headers=[
            ("x-tag", "one"),
            ("content-type", "a/b"),
            ("x-tag", "two"),
            ("content-type", "c/d"),
        ]
    )
    env = env_for(request)
    assert env["HTTP_X_TAG"] == "two"
    assert env["CONTENT_TYPE"] == "c/d"


def test_tenant_env_reaches_the_guest() -> None:
    assert env_for(tenant_env={"GREETING": "hello"})["GREETING"] == "hello"


def test_builtins_win_over_tenant_env() -> None:
    tenant_env = {"REQUEST_METHOD": "FAKE", "SERVER_SOFTWARE": "x", "HTTP_ACCEPT": "y"}
    request = make_request(headers=[("accept", "text/html")])
    env = env_for(request, tenant_env=tenant_env)
    assert env["REQUEST_METHOD"] == "GET"
    assert env["SERVER_SOFTWARE"] == "WAGI/1"
    assert env["HTTP_ACCEPT"] == "text/html"


def test_tenant_env_is_not_modified() -> None:
    tenant_env = {"GREETING": "hello"}
    env_for(tenant_env=tenant_env)
    assert tenant_env == {"GREETING": "hello"}


# Request → guest: argv


def test_argv_without_query_is_the_path() -> None:
    assert build_argv(make_request(path="/api/a%20b"), None) == ["/api/a%20b"]


def test_argv_splits_query_on_ampersand_without_decoding() -> None:
    request = make_request(path="/p", query="a=1&b=%20x&c", has_query=True)
    assert build_argv(request, None) == ["/p", "a=1", "b=%20x", "c"]


def test_argv_with_question_mark_and_empty_query_has_an_empty_arg() -> None:
    assert build_argv(make_request(path="/p", query="", has_query=True), None) == ["/p", ""]


def test_argv_template_substitutes_and_splits_on_whitespace() -> None:
    request = make_request(path="/p", query="a=1&b=2", has_query=True)
    template = "  --name ${SCRIPT_NAME}   ${ARGS} --end"
    assert build_argv(request, template) == ["--name", "/p", "a=1", "b=2", "--end"]


def test_argv_template_without_query_drops_args() -> None:
    assert build_argv(make_request(path="/p"), "${SCRIPT_NAME} ${ARGS}") == ["/p"]


def test_argv_template_joins_placeholders_with_surrounding_text() -> None:
    request = make_request(path="/p", query="x", has_query=True)
    assert build_argv(request, "path=${SCRIPT_NAME}?${ARGS}") == ["path=/p?x"]


def test_argv_template_does_not_expand_placeholders_from_the_request() -> None:
    request = make_request(path="/${ARGS}", query="${SCRIPT_NAME}", has_query=True)
    assert build_argv(request, "${SCRIPT_NAME} ${ARGS}") == ["/${ARGS}", "${SCRIPT_NAME}"]


# Guest → response


def test_content_type_alone_gives_200() -> None:
    response = parse(b"Content-Type: text/plain\n\nhello")
    assert (response.status, response.reason) == (200, b"")
    assert response.headers == [(b"content-type", b"text/plain")]
    assert response.body == b"hello"


def test_location_alone_gives_302() -> None:
    response = parse(b"Location: /elsewhere\n\n")
    assert response.status == 302
    assert response.headers == [(b"location", b"/elsewhere")]


def test_location_with_content_type_still_gives_302() -> None:
    assert parse(b"Content-Type: text/html\nLocation: /x\n\n<a>").status == 302


def test_status_alone_is_enough() -> None:
    response = parse(b"Status: 204\n\n")
    assert (response.status, response.headers, response.body) == (204, [], b"")


def test_status_header_beats_location() -> None:
    for stdout in (b"Location: /x\nStatus: 301\n\n", b"Status: 301\nLocation: /x\n\n"):
        assert parse(stdout).status == 301


def test_status_sets_status_and_reason() -> None:
    response = parse(b"Status: 404 Not Found Here\nContent-Type: text/plain\n\n")
    assert (response.status, response.reason) == (404, b"Not Found Here")


def test_status_reason_may_follow_a_tab() -> None:
    assert parse(b"Status: 418\tteapot\n\n").reason == b"teapot"


def test_status_is_consumed_not_passed_on() -> None:
    response = parse(b"Status: 201\nContent-Type: a/b\n\n")
    assert response.headers == [(b"content-type", b"a/b")]


def test_last_status_counts() -> None:
    assert parse(b"Status: 200\nStatus: 503\n\n").status == 503


@pytest.mark.parametrize("code", [b"100", b"999", b"599"])
def test_status_accepts_100_to_999(code: bytes) -> None:
    assert parse(b"Status: " + code + b"\n\n").status == int(code)


@pytest.mark.parametrize(
    "value", [b"", b"abc", b"99", b"099", b"1000", b"20x", b"-200", b"+200", b"2 00", b"\xd9\xa2"]
)
def test_status_not_an_integer_100_to_999_is_502(value: bytes) -> None:
    error = bad_output(b"Content-Type: a/b\nStatus: " + value + b"\n\n")
    assert error.status == 502
    assert "Status" in error.message


def test_missing_required_headers_is_500_with_wagi_message() -> None:
    error = bad_output(b"X-Other: 1\n\nbody")
    assert (error.status, error.message) == (500, MISSING)


@pytest.mark.parametrize(
    "stdout",
    [b"", b"hello world", b"Content-Type: text/plain", b"Content-Type: text/plain\nbody"],
    ids=["empty", "no-headers", "no-newline", "no-blank-line"],
)
def test_header_block_without_blank_line_is_500(stdout: bytes) -> None:
    error = bad_output(stdout)
    assert (error.status, error.message) == (500, MISSING)


def test_leading_blank_line_is_an_empty_header_block() -> None:
    error = bad_output(b"\r\nContent-Type: text/plain\n\nbody")
    assert (error.status, error.message) == (500, MISSING)


def test_required_header_names_are_case_insensitive() -> None:
    response = parse(b"CONTENT-type: a/b\nlOcAtIoN: /x\n\n")
    assert response.status == 302
    assert response.headers == [(b"content-type", b"a/b"), (b"location", b"/x")]


def test_header_lines_may_end_in_crlf_or_lf() -> None:
    response = parse(b"Content-Type: a/b\r\nX-One: 1\nX-Two: 2\r\n\r\nbody")
    assert response.headers == [(b"content-type", b"a/b"), (b"x-one", b"1"), (b"x-two", b"2")]
    assert response.body == b"body"


def test_carriage_returns_are_dropped_in_the_header_block() -> None:
    response = parse(b"Content-Type: a/\rb\r\r\n\r\r\nbody")
    assert response.headers == [(b"content-type", b"a/b")]
    assert response.body == b"body"


def test_body_is_byte_for_byte_after_first_empty_line() -> None:
    body = b"line\r\n\r\nStatus: 500\n\n\x00\xff\r"
    response = parse(b"Content-Type: application/octet-stream\n\n" + body)
    assert response.status == 200
    assert response.body == body


def test_header_splits_at_first_colon_and_trims() -> None:
    response = parse(b"Location:   http://example.com:8080/x?a=b:c \t\n\n")
    assert response.headers == [(b"location", b"http://example.com:8080/x?a=b:c")]


def test_header_name_is_trimmed() -> None:
    assert parse(b" Content-Type\t: a/b\n\n").headers == [(b"content-type", b"a/b")]


def test_header_value_may_be_empty() -> None:
    response = parse(b"Content-Type: a/b\nX-Empty:\n\n")
    assert response.headers == [(b"content-type", b"a/b"), (b"x-empty", b"")]


def test_line_without_colon_is_ignored() -> None:
    response = parse(b"just some text\nContent-Type: a/b\nmore text\n\nbody")
    assert response.headers == [(b"content-type", b"a/b")]
    assert response.body == b"body"


def test_other_headers_pass_through_lower_cased_in_order() -> None:
    response = parse(b"X-B: 2\nContent-Type: a/b\nCache-Control: no-store\n\n")
    assert response.headers == [
        (b"x-b", b"2"),
        (b"content-type", b"a/b"),
        (b"cache-control", b"no-store"),
    ]


def test_repeated_header_keeps_every_value() -> None:
    response = parse(b"Set-Cookie: a=1\nContent-Type: a/b\nSet-Cookie: b=2\n\n")
    assert response.headers == [
        (b"set-cookie", b"a=1"),
        (b"content-type", b"a/b"),
        (b"set-cookie", b"b=2"),
    ]


def test_framing_headers_from_the_guest_are_dropped() -> None:
    response = parse(
        b"Content-Length: 999\nTransfer-Encoding: chunked\nConnection: close\n"
        b"Content-Type: a/b\n\nbody"
    )
    assert response.headers == [(b"content-type", b"a/b")]
    assert response.body == b"body"


@pytest.mark.parametrize(
    "name", [b"Bad Name", b"X(1)", b"X/Y", b"", b"X\x00Y", b"Caf\xc3\xa9", b"X\x7f"]
)
def test_header_name_that_is_not_a_token_is_502(name: bytes) -> None:
    error = bad_output(b"Content-Type: a/b\n" + name + b": v\n\n")
    assert error.status == 502


@pytest.mark.parametrize("value", [b"a\x00b", b"a\x01b", b"a\x0bb", b"a\x1fb", b"a\x7fb"])
def test_header_value_with_control_character_is_502(value: bytes) -> None:
    error = bad_output(b"Content-Type: a/b\nX-Bad: " + value + b"\n\n")
    assert error.status == 502
    assert "X-Bad" in error.message


def test_control_character_in_a_required_header_is_502() -> None:
    assert bad_output(b"Content-Type: text/html\x01\n\n").status == 502


def test_header_value_may_hold_tab_and_obs_text() -> None:
    response = parse(b"Content-Type: a/b\nX-Ok: a\tb \xe9\n\n")
    assert response.headers[1] == (b"x-ok", b"a\tb \xe9")


def test_output_that_is_not_cgi_gets_500_before_header_checks() -> None:
    error = bad_output(b"Hello, World: welcome!\n\n")
    assert (error.status, error.message) == (500, MISSING)


def test_error_message_echoes_at_most_64_bytes_of_guest_output() -> None:
    name = b"X" * 60 + b" SECRET-TAIL" + b"Y" * 1000
    error = bad_output(b"Content-Type: a/b\n" + name + b": v\n\n")
    assert error.status == 502
    assert "XXXX" in error.message
    assert "SECRET" not in error.message
    assert "Y" * 10 not in error.message
    assert len(error.message) < 200


def test_error_message_escapes_control_characters() -> None:
    error = bad_output(b"Content-Type: a/b\nX\x1b[31m: v\n\n")
    assert "\x1b" not in error.message
    assert "\\x1b" in error.message


# Guest → response: the header block is bounded (lines and bytes), and so is the work on it.


def header_lines(count: int) -> bytes:
    """`count` header lines, the first a Content-Type, each ending in a newline."""
    return b"Content-Type: a/b\n" + b"".join(b"X-%d: v\n" % n for n in range(count - 1))


def test_header_lines_up_to_the_bound_are_accepted() -> None:
    response = parse(header_lines(128) + b"\nbody", max_headers=128)
    assert len(response.headers) == 128
    assert response.body == b"body"


@pytest.mark.parametrize("count", [129, 2_000])
def test_one_header_line_over_the_bound_is_502_naming_it(count: int) -> None:
    error = bad_output(header_lines(count) + b"\nbody", max_headers=128)
    assert error.status == 502
    assert "max_response_headers" in error.message and "128" in error.message


def test_every_line_of_the_header_block_counts_against_the_bound() -> None:
    # Status and lines without ':' are parsed too; only the blank line that ends it is free.
    assert parse(b"Status: 200\nno colon\nContent-Type: a/b\n\n", max_headers=3).status == 200
    assert bad_output(b"Status: 200\nno colon\nContent-Type: a/b\n\n", max_headers=2).status == 502


def test_an_empty_header_block_has_no_lines() -> None:
    # Checked for its required headers (500), not against the line bound.
    assert bad_output(b"\nbody", max_headers=1).status == 500


def test_header_block_of_exactly_the_byte_bound_is_accepted() -> None:
    block = b"Content-Type: a/b\n\n"  # the blank line counts: 19 bytes
    assert parse(block + b"x" * 100, max_header_bytes=len(block)).body == b"x" * 100


def test_header_block_of_exactly_the_byte_bound_with_crlf_is_accepted() -> None:
    block = b"Content-Type: a/b\r\n\r\n"
    assert parse(block + b"body", max_header_bytes=len(block)).body == b"body"


@pytest.mark.parametrize("block", [b"Content-Type: a/b\n\n", b"Content-Type: a/b\r\n\r\n", b"\n"])
def test_header_block_one_byte_over_the_byte_bound_is_502_naming_it(block: bytes) -> None:
    error = bad_output(block + b"body", max_header_bytes=len(block) - 1)
    assert error.status == 502
    assert "max_response_header_bytes" in error.message
    assert str(len(block) - 1) in error.message


def test_output_without_blank_line_within_the_byte_bound_is_502() -> None:
    # It may end its headers later, or never: nothing past the bound is looked at.
    error = bad_output(b"Content-Type: a/b\n" + b"X: y\n" * 20_000 + b"\nbody")
    assert error.status == 502
    assert "max_response_header_bytes" in error.message


def test_output_without_blank_line_shorter_than_the_byte_bound_is_still_500() -> None:
    assert bad_output(b"Content-Type: a/b\n", max_header_bytes=1024).status == 500


def test_a_body_larger_than_the_byte_bound_is_not_bounded() -> None:
    body = b"\n\n" * 100_000
    assert parse(b"Content-Type: a/b\n\n" + body, max_header_bytes=1024).body == body


def test_higher_bounds_let_a_larger_header_block_through() -> None:
    stdout = header_lines(5_000) + b"\nbody"
    assert bad_output(stdout).status == 502  # default: 128 lines, 64KiB
    response = parse(stdout, max_headers=5_000, max_header_bytes=len(stdout))
    assert len(response.headers) == 5_000
