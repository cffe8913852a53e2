"""Which outbound requests a guest may make: allow patterns and the SSRF guard. Pure: no I/O.

Patterns are Spin's: `scheme://host[:port]`, where the scheme is `http`, `https` or `*`, the
host is a name, an IP literal (IPv6 in brackets), `*.domain` (any name below `domain`, not
`domain` itself) or `*`, and the port is a number or `*`; without one, the scheme's default
port (80, 443). Scheme and port are compared, unlike WAGI, which compared the host only. The
literal `insecure:allow-all` allows every destination. A trailing `/` is accepted (WAGI's
examples write one); any other path is an error, since a rule never looks at paths.

The SSRF guard judges the address a connection is about to be made to, after resolution:
an address that is not globally routable (loopback, private, link-local, shared, reserved...)
is refused unless the operator's policy names the host exactly (no wildcard), which admits
in-cluster services and explicit `127.0.0.1` or `localhost` upstreams; the cloud metadata
addresses are refused whatever names them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

ALLOW_ALL = "insecure:allow-all"
"""WAGI's escape hatch: every destination (the SSRF guard still applies)."""
DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_PORT = -1
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
"""Cloud instance metadata (AWS, GCP, Azure, and AWS's IPv6 endpoint): hands out credentials."""

_PATTERN = re.compile(
    r"(?P<scheme>[A-Za-z*][A-Za-z0-9+.-]*)://(?P<host>\[[^\]/]*\]|[^:/\[\]]+)"
    r"(?::(?P<port>[0-9]{1,5}|\*))?/?"
)
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


class PatternError(ValueError):
    """An allow pattern that cannot be read; the message says why."""


@dataclass(frozen=True, slots=True)
class HostPattern:
    """One parsed `scheme://host[:port]` pattern."""

    scheme: str  # "http", "https" or "*"
    host: str  # lower case; IPv6 without brackets; "*" or "*.suffix" for wildcards
    port: int | None  # None: the request scheme's default port; ANY_PORT: any

    @property
    def exact(self) -> bool:
        """Names one host, no wildcard: what the SSRF guard's exception needs."""
        return not self.host.startswith("*")

    def matches(self, scheme: str, host: str, port: int) -> bool:
        """`scheme`, `host` (lower case, IPv6 without brackets) and `port` of a request."""
        if self.scheme not in ("*", scheme):
            return False
        wanted = DEFAULT_PORTS[scheme] if self.port is None else self.port
        if wanted not in (ANY_PORT, port):
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


@dataclass(frozen=True, slots=True)
class AllowList:
    """A list of patterns; empty allows nothing."""

    patterns: tuple[HostPattern, ...] = ()
    allow_all: bool = False

    def allows(self, scheme: str, host: str, port: int) -> bool:
        return self.allow_all or any(p.matches(scheme, host, port) for p in self.patterns)

    @property
    def exact_hosts(self) -> frozenset[str]:
        return frozenset(pattern.host for pattern in self.patterns if pattern.exact)


def parse_allow_list(entries: Iterable[str]) -> AllowList:
    """Parse a list of patterns; raises PatternError naming the first bad entry."""
    patterns: list[HostPattern] = []
    allow_all = False
    for index, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise PatternError(f"entry {index} must be a string")
        if entry == ALLOW_ALL:
            allow_all = True
            continue
        try:
            patterns.append(parse_pattern(entry))
        except PatternError as exc:
            raise PatternError(f"entry {index} ({entry!r}): {exc}") from None
    return AllowList(tuple(patterns), allow_all)


def check_entry(text: str) -> None:
    """Raise PatternError unless `text` is a pattern or `insecure:allow-all`."""
    if text != ALLOW_ALL:
        parse_pattern(text)


def parse_pattern(text: str) -> HostPattern:
    match = _PATTERN.fullmatch(text.strip())
    if match is None:
        raise PatternError(
            'expected "scheme://host[:port]", such as "https://api.example.com" or'
            ' "http://*.svc.cluster.local:8080" (no path, no user)'
        )
    scheme = match["scheme"].lower()
    if scheme not in ("*", *DEFAULT_PORTS):
        raise PatternError(f"scheme {scheme!r} is not http, https or *")
    host = match["host"].lower()
    problem = _host_problem(host)
    if problem:
        raise PatternError(problem)
    port_text = match["port"]
    port: int | None = None
    if port_text == "*":
        port = ANY_PORT
    elif port_text is not None:
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise PatternError(f"port {port} is not between 1 and 65535")
    return HostPattern(scheme, host.strip("[]"), port)


def _host_problem(host: str) -> str | None:
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not an IPv6 address"
        return None
    if host == "*":
        return None
    name = host.removeprefix("*.")
    if "*" in name:
        return 'a wildcard is "*" alone or "*." before a domain, as in "*.example.com"'
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return f"{host!r} is not a host name or an IP address"
    return None


def address_allowed(host: str, address: str, named_exactly: frozenset[str]) -> bool:
    """May a connection for `host` go to `address`? (The SSRF guard, on a resolved address.)"""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return False
    return ip.is_global or host in named_exactly
