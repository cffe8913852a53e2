"""Route tables (WAGI.md "Routing"): which module entrypoint answers a raw request path.

Pure data in, data out; no I/O. A pattern is either exact (`/hello`, trailing slash matters)
or a prefix ending in `/...` (`/api/...` matches `/api`, `/api/` and `/api/anything`; `/...`
matches everything). The most specific route wins: exact beats prefix, a longer prefix beats a
shorter one, and of two equal patterns the later entry wins (WAGI itself takes the first match
in file order; this project prefers the most specific so the order of `modules.toml` can't hide
a route).

`match` costs one dict lookup per "/" in the path, whatever the size of the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "Route",
    "RouteError",
    "RouteMatch",
    "RouteTable",
    "join_route",
    "parse_routes_output",
    "validate_pattern",
]

T = TypeVar("T")

WILDCARD = "..."
WILDCARD_SUFFIX = "/" + WILDCARD

# Characters that end the path part of a request target (RFC 3986 section 3.3), so a pattern
# holding one could never equal a raw path.
_FORBIDDEN_CHARS = "?#"

# Longest excerpt of a pattern or `_routes` line quoted in an error: enough to recognise it,
# short enough that a guest printing megabytes can't blow up a log line.
MAX_QUOTED_CHARS = 80


class RouteError(ValueError):
    """A route pattern or `_routes` line is malformed; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class Route(Generic[T]):
    """One entry of a route table; `target` is opaque here (the gateway keeps module + export)."""

    pattern: str
    target: T


@dataclass(frozen=True, slots=True)
class RouteMatch(Generic[T]):
    """The chosen route and how it splits the path into CGI `SCRIPT_NAME` and `PATH_INFO`.

    `script_name` is the route base ("" for `/...`: the gateway joins it after the tenant base
    path and turns an empty result into "/"); `path_info_raw` is the undecoded rest of the path.
    """

    route: Route[T]
    script_name: str
    path_info_raw: str


class RouteTable(Generic[T]):
    """An immutable set of validated routes, matched most-specific-first."""

    __slots__ = ("_exact", "_prefix", "routes")

    def __init__(self, routes: Iterable[Route[T]]) -> None:
        self.routes: tuple[Route[T], ...] = tuple(routes)
        # Keyed by the exact path and by the prefix base; later entries overwrite earlier ones,
        # which is the "equal patterns: the later entry wins" rule.
        self._exact: dict[str, Route[T]] = {}
        self._prefix: dict[str, Route[T]] = {}
        for route in self.routes:
            validate_pattern(route.pattern)
            base = _prefix_base(route.pattern)
            if base is None:
                self._exact[route.pattern] = route
            else:
                self._prefix[base] = route

    def __len__(self) -> int:
        return len(self.routes)

    def match(self, path: str) -> RouteMatch[T] | None:
        """The most specific route for a raw path (no query), or None when nothing matches.

        A path that doesn't start with "/" (`*`, an absolute URL) matches nothing: no route
        could give it a meaningful `PATH_INFO`.
        """
        if not path.startswith("/"):
            return None
        exact = self._exact.get(path)
        if exact is not None:
            return RouteMatch(exact, path, "")
        # Try the path itself, then each ancestor cut just before a "/", longest first; the last
        # candidate is "" (the base of `/...`).
        end = len(path)
        while end >= 0:
            base = path[:end]
            prefix = self._prefix.get(base)
            if prefix is not None:
                return RouteMatch(prefix, base, path[end:])
            end = path.rfind("/", 0, end)
        return None


def validate_pattern(pattern: str) -> None:
    """Raise RouteError if `pattern` is not a route WAGI.md allows."""
    problem = _pattern_problem(pattern)
    if problem is not None:
        raise RouteError(f"route {_quote(pattern)}: {problem}")


def join_route(base_pattern: str, sub_pattern: str) -> str:
    """The pattern of a `_routes` entry: `sub_pattern` under the module's route base.

    Exactly one "/" separates the two, whatever slashes either side brings, so `/api/...`
    and `/users` give `/api/users`, and `/...` or `/` as the base leave the sub pattern at the
    root. The result is validated.
    """
    validate_pattern(base_pattern)
    base = base_pattern.removesuffix(WILDCARD_SUFFIX).rstrip("/")
    joined = f"{base}/{sub_pattern.lstrip('/')}"
    validate_pattern(joined)
    return joined


def parse_routes_output(text: str) -> list[tuple[str, str]]:
    """The `(pattern, export)` pairs a module's `_routes` printed, one `<pattern> <export>` a line.

    Blank lines are skipped; any other line that isn't exactly two fields, or whose pattern
    could never be valid once joined, raises RouteError naming the line so the module's author
    can find it.
    """
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise _line_error(number, line, "expected '<pattern> <export>'")
        pattern, export = fields
        # The sub pattern may omit its leading "/" (join_route adds it); check it as if rooted.
        problem = _pattern_problem("/" + pattern.lstrip("/"))
        if problem is not None:
            raise _line_error(number, line, f"pattern {_quote(pattern)}: {problem}")
        entries.append((pattern, export))
    return entries


def _prefix_base(pattern: str) -> str | None:
    """The base a prefix pattern matches under ("" for `/...`), or None for an exact pattern."""
    if pattern.endswith(WILDCARD_SUFFIX):
        return pattern.removesuffix(WILDCARD_SUFFIX)
    return None


def _pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is invalid, or None if it is valid."""
    if not pattern.startswith("/"):
        return "must start with '/'"
    for char in pattern:
        if char.isspace():
            return "must not contain whitespace"
        if char in _FORBIDDEN_CHARS:
            return f"must not contain {char!r} (the path ends there)"
        if not char.isprintable():
            return "must not contain control characters"
    base = _prefix_base(pattern)
    if WILDCARD in (pattern if base is None else base):
        return f"{WILDCARD!r} is only allowed as the final segment ('{WILDCARD_SUFFIX}')"
    return None


def _line_error(number: int, line: str, reason: str) -> RouteError:
    return RouteError(f"_routes line {number} {_quote(line)}: {reason}")


def _quote(text: str) -> str:
    """`text` as a repr, cut to MAX_QUOTED_CHARS so control characters show and size is bounded."""
    if len(text) > MAX_QUOTED_CHARS:
        return repr(text[:MAX_QUOTED_CHARS]) + " (truncated)"
    return repr(text)
