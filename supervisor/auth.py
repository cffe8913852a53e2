"""Admin API credentials: who is asking, and whether they may touch a tenant.

Bearer tokens. The server keeps only SHA-256 digests: the operator's (made at start from
`SUPERVISOR_ADMIN_TOKEN` or `--admin-token-file`) and each tenant's (`admin_token_sha256` in
its policy, so a policy file never holds a usable secret). A presented token is hashed once
and compared with every digest through `hmac.compare_digest`, without stopping at a match, so
the time taken says nothing of which digest, or how much of one, matched.

The operator may do everything; a tenant's token manages that tenant only. No token, or one
that matches nothing, is `Unauthorized` (401); a valid token asking for another tenant is
`Forbidden` (403). Tokens never reach a log or an error message: only the principal does.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import Forbidden, Unauthorized
from .policies import Policy

__all__ = ["Authenticator", "Principal", "operator_token_sha256", "token_sha256"]

BEARER = "bearer"
CHALLENGE = 'Bearer realm="wasm-supervisor admin"'
"""The `WWW-Authenticate` value of a 401 (RFC 6750 §3)."""

OPERATOR_TOKEN_ENV = "SUPERVISOR_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16
"""An operator token shorter than this is refused at start: it could be guessed online."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request speaks for: the operator, or the tenants whose token it presented."""

    operator: bool
    tenants: frozenset[str]

    def __str__(self) -> str:
        if self.operator:
            return "operator"
        return "tenant:" + ",".join(sorted(self.tenants))


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def operator_token_sha256(token_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The operator's token, hashed: from `token_file` if given, else `SUPERVISOR_ADMIN_TOKEN`.

    None when neither is set (then only tenants' tokens work). Raises ValueError for a token
    too short to resist guessing, OSError for an unreadable file; neither message holds it.
    """
    if token_file is not None:
        token, source = token_file.read_text().strip(), str(token_file)
    else:
        token, source = environ.get(OPERATOR_TOKEN_ENV, "").strip(), OPERATOR_TOKEN_ENV
        if not token:
            return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{source}: the admin token must be at least {MIN_TOKEN_CHARS} characters")
    return token_sha256(token)


class Authenticator:
    """Checks bearer tokens against the operator's digest and the tenants' policies in force."""

    def __init__(
        self,
        operator_token_sha256: str | None,
        policies: Callable[[], Iterable[tuple[str, Policy]]],
    ) -> None:
        self._operator = operator_token_sha256.encode() if operator_token_sha256 else None
        self._policies = policies

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization` header value. Raises Unauthorized."""
        if not authorization:
            raise Unauthorized("an admin token is required: Authorization: Bearer <token>")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != BEARER or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        digest = token_sha256(token).encode()
        operator = self._operator is not None and hmac.compare_digest(digest, self._operator)
        tenants = set()
        for name, policy in self._policies():
            expected = policy.admin_token_sha256
            if expected is not None and hmac.compare_digest(digest, expected.encode()):
                tenants.add(name)
        if not operator and not tenants:
            raise Unauthorized("the admin token is not valid")
        return Principal(operator, frozenset(tenants))

    @staticmethod
    def authorize(principal: Principal, tenant: str) -> None:
        """Raises Forbidden unless `principal` may manage `tenant`."""
        if not principal.operator and tenant not in principal.tenants:
            raise Forbidden(f"this token may not manage tenant {tenant!r}")
