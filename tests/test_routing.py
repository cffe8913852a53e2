"""The routing rules of WAGI.md, one test per rule, on plain route tables (no server)."""

from __future__ import annotations

import pytest

from supervisor.routing import (
    MAX_QUOTED_CHARS,
    Route,
    RouteError,
    RouteTable,
    join_route,
    parse_routes_output,
    validate_pattern,
)


def table(*patterns: str) -> RouteTable[str]:
    """A table whose targets are their own patterns, in the order given."""
    return RouteTable(Route(pattern, pattern) for pattern in patterns)


def winner(routes: RouteTable[str], path: str) -> str | None:
    found = routes.match(path)
    return None if found is None else found.route.pattern


# Exact routes


def test_exact_route_matches_only_the_identical_path() -> None:
    routes = table("/hello")
    assert winner(routes, "/hello") == "/hello"
    assert winner(routes, "/hello/") is None
    assert winner(routes, "/hello/x") is None
    assert winner(routes, "/hell") is None
    assert winner(routes, "/helloworld") is None


def test_exact_route_trailing_slash_matters() -> None:
    routes = table("/a/")
    assert winner(routes, "/a/") == "/a/"
    assert winner(routes, "/a") is None


def test_exact_root_matches_only_root() -> None:
    routes = table("/")
    assert winner(routes, "/") == "/"
    assert winner(routes, "/x") is None


def test_exact_route_compares_the_raw_undecoded_path() -> None:
    routes = table("/a%20b")
    assert winner(routes, "/a%20b") == "/a%20b"
    assert winner(routes, "/a b") is None


def test_exact_match_has_the_route_as_script_name_and_empty_path_info() -> None:
    found = table("/hello").match("/hello")
    assert found is not None
    assert (found.script_name, found.path_info_raw) == ("/hello", "")


# Prefix routes


@pytest.mark.parametrize("path", ["/x", "/x/", "/x/anything", "/x/a/b/c", "/x//y"])
def test_prefix_route_matches_its_base_and_everything_under_it(path: str) -> None:
    assert winner(table("/x/..."), path) == "/x/..."


@pytest.mark.parametrize("path", ["/xy", "/xy/z", "/", "/y/x", "/X"])
def test_prefix_route_does_not_match_a_sibling_sharing_its_letters(path: str) -> None:
    assert winner(table("/x/..."), path) is None


@pytest.mark.parametrize("path", ["/", "/a", "/a/b/c", "/%2F..", "//"])
def test_root_wildcard_matches_every_path(path: str) -> None:
    assert winner(table("/..."), path) == "/..."


def test_path_that_is_not_origin_form_matches_nothing() -> None:
    routes = table("/...")
    assert routes.match("*") is None
    assert routes.match("http://example.com/") is None
    assert routes.match("") is None


@pytest.mark.parametrize(
    ("path", "script_name", "path_info_raw"),
    [
        ("/api", "/api", ""),
        ("/api/", "/api", "/"),
        ("/api/users/7", "/api", "/users/7"),
        ("/api/a%2Fb", "/api", "/a%2Fb"),
    ],
)
def test_prefix_match_splits_path_into_base_and_raw_rest(
    path: str, script_name: str, path_info_raw: str
) -> None:
    found = table("/api/...").match(path)
    assert found is not None
    assert (found.script_name, found.path_info_raw) == (script_name, path_info_raw)


def test_root_wildcard_gives_empty_script_name_and_whole_path_as_path_info() -> None:
    found = table("/...").match("/a/b")
    assert found is not None
    assert (found.script_name, found.path_info_raw) == ("", "/a/b")


def test_match_returns_the_route_with_its_target() -> None:
    target = ("hello.wasm", "_start")
    routes = RouteTable([Route("/hello", target)])
    found = routes.match("/hello")
    assert found is not None
    assert found.route == Route("/hello", target)
    assert found.route.target is target


# Most specific wins


def test_exact_beats_prefix_whatever_the_order() -> None:
    for routes in (table("/x", "/x/..."), table("/x/...", "/x")):
        assert winner(routes, "/x") == "/x"
        assert winner(routes, "/x/y") == "/x/..."


def test_exact_beats_root_wildcard() -> None:
    assert winner(table("/", "/..."), "/") == "/"
    assert winner(table("/...", "/"), "/") == "/"


def test_longer_prefix_beats_shorter_whatever_the_order() -> None:
    for routes in (table("/...", "/a/...", "/a/b/..."), table("/a/b/...", "/a/...", "/...")):
        assert winner(routes, "/a/b/c") == "/a/b/..."
        assert winner(routes, "/a/b") == "/a/b/..."
        assert winner(routes, "/a/bc") == "/a/..."
        assert winner(routes, "/a") == "/a/..."
        assert winner(routes, "/ab") == "/..."


def test_equal_patterns_the_later_entry_wins() -> None:
    routes = RouteTable([Route("/x", "first"), Route("/x", "second")])
    found = routes.match("/x")
    assert found is not None and found.route.target == "second"
    routes = RouteTable([Route("/p/...", "first"), Route("/p/...", "second")])
    found = routes.match("/p/q")
    assert found is not None and found.route.target == "second"


def test_table_keeps_every_route_in_the_order_given() -> None:
    given = [Route("/b", 1), Route("/a/...", 2), Route("/b", 3)]
    routes = RouteTable(given)
    assert routes.routes == tuple(given)
    assert len(routes) == 3


def test_table_accepts_any_iterable_once() -> None:
    routes = RouteTable(Route(f"/{n}", n) for n in range(3))
    assert len(routes) == 3
    assert winner(routes, "/2") == "/2"


def test_empty_table_matches_nothing() -> None:
    assert RouteTable([]).match("/") is None


def test_thousand_routes_still_pick_the_most_specific() -> None:
    # 1,000 routes, most general last, so a first-match scan would pick the wrong ones.
    patterns = [f"/svc{n}/v1/items/{n}" for n in range(300)]  # exact, deep
    patterns += [f"/svc{n}/v1/..." for n in range(300)]  # prefix, deeper
    patterns += [f"/svc{n}/..." for n in range(300)]  # prefix, shallow
    patterns += [f"/page{n}" for n in range(99)]  # exact, shallow
    patterns += ["/..."]
    routes = table(*reversed(patterns))
    assert len(routes) == 1_000

    assert winner(routes, "/svc123/v1/items/123") == "/svc123/v1/items/123"
    assert winner(routes, "/svc123/v1/items/124") == "/svc123/v1/..."
    assert winner(routes, "/svc123/v1") == "/svc123/v1/..."
    assert winner(routes, "/svc123/v2/items") == "/svc123/..."
    assert winner(routes, "/svc12") == "/svc12/..."
    assert winner(routes, "/svc1234/v1") == "/..."
    assert winner(routes, "/page98") == "/page98"
    assert winner(routes, "/page98/") == "/..."
    deep = "/svc7/v1/" + "/".join(["d"] * 500)
    found = routes.match(deep)
    assert found is not None
    assert (found.route.pattern, found.script_name) == ("/svc7/v1/...", "/svc7/v1")


# Pattern validation


@pytest.mark.parametrize(
    "pattern", ["/", "/...", "/hello", "/a/b/", "/api/...", "/a%20b/...", "/a.b/c..d", "/x/.."]
)
def test_valid_patterns_are_accepted(pattern: str) -> None:
    validate_pattern(pattern)
    assert len(RouteTable([Route(pattern, None)])) == 1


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("", "start with '/'"),
        ("hello", "start with '/'"),
        ("...", "start with '/'"),
        ("/a b", "whitespace"),
        ("/a\tb", "whitespace"),
        ("/a\u00a0b", "whitespace"),
        ("/a?b", "'?'"),
        ("/a#b", "'#'"),
        ("/a\x00b", "control"),
        ("/a\x7fb", "control"),
        ("/.../x", "final segment"),
        ("/x...", "final segment"),
        ("/x/..../...", "final segment"),
        ("/x/....", "final segment"),
    ],
)
def test_invalid_pattern_is_refused_naming_it_and_why(pattern: str, reason: str) -> None:
    with pytest.raises(RouteError) as raised:
        validate_pattern(pattern)
    assert repr(pattern) in str(raised.value)
    assert reason in str(raised.value)


def test_table_refuses_a_table_with_any_invalid_pattern() -> None:
    with pytest.raises(RouteError, match="'/ok/x y'"):
        RouteTable([Route("/ok", 1), Route("/ok/x y", 2)])


def test_route_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_pattern("nope")


def test_overlong_pattern_is_quoted_truncated() -> None:
    pattern = "/" + "a" * 10_000 + "?"
    with pytest.raises(RouteError) as raised:
        validate_pattern(pattern)
    assert len(str(raised.value)) < MAX_QUOTED_CHARS + 100


# join_route (`_routes` entries)


@pytest.mark.parametrize(
    ("base", "sub", "joined"),
    [
        ("/api/...", "/users/...", "/api/users/..."),
        ("/api/...", "/users", "/api/users"),
        ("/api", "x", "/api/x"),
        ("/api/", "/x", "/api/x"),
        ("/", "/x", "/x"),
        ("/...", "/x", "/x"),
        ("/...", "/...", "/..."),
        ("/api/...", "...", "/api/..."),
        ("/api/...", "//x", "/api/x"),
    ],
)
def test_sub_pattern_joins_onto_the_module_base_with_exactly_one_slash(
    base: str, sub: str, joined: str
) -> None:
    assert join_route(base, sub) == joined


def test_joined_route_is_validated() -> None:
    with pytest.raises(RouteError, match="'/api/a#b'"):
        join_route("/api/...", "a#b")
    with pytest.raises(RouteError, match="final segment"):
        join_route("/api/...", "/.../x")
    with pytest.raises(RouteError, match="start with '/'"):
        join_route("api", "/x")


def test_joined_routes_match_like_any_route() -> None:
    routes = table(join_route("/api/...", "/users/..."), join_route("/api/...", "/health"))
    found = routes.match("/api/users/7")
    assert found is not None
    assert (found.script_name, found.path_info_raw) == ("/api/users", "/7")
    assert winner(routes, "/api/health") == "/api/health"


# parse_routes_output (`_routes` output)


def test_routes_output_is_one_pattern_and_export_per_line() -> None:
    text = "/users/... users_handler\n/health  health\n\n   \n\t/x\tx_export \r\n"
    assert parse_routes_output(text) == [
        ("/users/...", "users_handler"),
        ("/health", "health"),
        ("/x", "x_export"),
    ]


def test_empty_routes_output_gives_no_routes() -> None:
    assert parse_routes_output("") == []
    assert parse_routes_output("\n\n") == []


def test_routes_output_sub_pattern_may_omit_its_leading_slash() -> None:
    assert parse_routes_output("users/... handler") == [("users/...", "handler")]


@pytest.mark.parametrize(
    ("text", "number", "bad_line"),
    [
        ("/a a\n/b", 2, "/b"),
        ("/a a\n\n/b b extra", 3, "/b b extra"),
        ("/a a b c", 1, "/a a b c"),
        ("\n\n\nlonely", 4, "lonely"),
    ],
)
def test_routes_line_without_exactly_two_fields_is_refused_naming_it(
    text: str, number: int, bad_line: str
) -> None:
    with pytest.raises(RouteError) as raised:
        parse_routes_output(text)
    message = str(raised.value)
    assert f"line {number}" in message
    assert repr(bad_line) in message


@pytest.mark.parametrize("line", ["/a?b export", "/a#b export", "/.../x export", "/a\x00 e"])
def test_routes_line_with_an_impossible_pattern_is_refused_naming_it(line: str) -> None:
    with pytest.raises(RouteError, match="line 2") as raised:
        parse_routes_output("/ok ok\n" + line)
    assert repr(line) in str(raised.value)


def test_overlong_routes_line_is_quoted_truncated() -> None:
    line = "/x " + "y" * 10_000 + " z"
    with pytest.raises(RouteError, match="line 1") as raised:
        parse_routes_output(line)
    message = str(raised.value)
    assert repr(line[:MAX_QUOTED_CHARS]) in message
    assert len(message) < MAX_QUOTED_CHARS + 100
