"""NATS decentralized auth for the tests: an operator, accounts and users made with `nkeys`.

What `nsc` would make, built here so a test needs nothing but nats-server: every identity is
an NKey, and every JWT is `base64url(header).base64url(claims).base64url(signature)`, with the
header `{"typ":"JWT","alg":"ed25519-nkey"}` and the signature the issuer's Ed25519 NKey over
the first two parts. The claims are nats-io/jwt v2's: `jti` (base32 of the SHA-512/256 of the
standard claims with `jti` blank), `iat`, `iss` (the issuer's public key), `sub` (the subject's
public key), `name`, and `nats` (`type`, `version: 2`, and the type's own fields).

nats-server runs in operator mode with a memory resolver (`operator`, `system_account`,
`resolver: MEMORY`, `resolver_preload`); an account has JetStream when its limits give it
storage. A user signs in with a `.creds` file: its JWT and its NKey seed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys

UNLIMITED = -1
_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_ACCOUNT_LIMITS = {
    "subs": UNLIMITED,
    "data": UNLIMITED,
    "payload": UNLIMITED,
    "imports": UNLIMITED,
    "exports": UNLIMITED,
    "wildcards": True,
    "conn": UNLIMITED,
    "leaf": UNLIMITED,
}
_JETSTREAM_LIMITS = {  # any storage other than 0 turns JetStream on for the account
    "mem_storage": UNLIMITED,
    "disk_storage": UNLIMITED,
    "streams": UNLIMITED,
    "consumer": UNLIMITED,
}


def new_key(prefix: int) -> nkeys.KeyPair:
    """A fresh NKey of one kind (`nkeys.PREFIX_BYTE_OPERATOR`, `_ACCOUNT`, `_USER`)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def public(key: nkeys.KeyPair) -> str:
    return key.public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def issue(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict) -> str:
    """A JWT about `subject`, signed by `issuer`."""
    standard = {"jti": "", "iat": int(time.time()), "iss": public(issuer), "name": name}
    standard["sub"] = subject
    digest = hashlib.new("sha512_256", json.dumps(standard, separators=(",", ":")).encode())
    claims = {**standard, "jti": base64.b32encode(digest.digest()).decode().rstrip("=")}
    claims["nats"] = {**nats, "version": 2}
    signing_input = f"{_b64(json.dumps(_HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(issuer.sign(signing_input.encode()))}"


def creds_file(path: Path, user_jwt: str, user: nkeys.KeyPair) -> Path:
    """A `.creds` file as `nsc` writes it: the user's JWT, then its NKey seed."""
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    return path


@dataclass
class Operator:
    """An operator with one JetStream account (`account`) and a system account."""

    key: nkeys.KeyPair
    account: nkeys.KeyPair
    system: nkeys.KeyPair

    @classmethod
    def create(cls) -> Operator:
        return cls(
            new_key(nkeys.PREFIX_BYTE_OPERATOR),
            new_key(nkeys.PREFIX_BYTE_ACCOUNT),
            new_key(nkeys.PREFIX_BYTE_ACCOUNT),
        )

    def server_config(self, path: Path) -> Path:
        """nats-server's configuration: trust this operator, preload both accounts."""
        operator_jwt = issue(self.key, public(self.key), "test-operator", {"type": "operator"})
        account_jwt = issue(
            self.key,
            public(self.account),
            "store",
            {"type": "account", "limits": {**_ACCOUNT_LIMITS, **_JETSTREAM_LIMITS}},
        )
        system_jwt = issue(
            self.key, public(self.system), "SYS", {"type": "account", "limits": _ACCOUNT_LIMITS}
        )
        path.write_text(
            f"operator: {operator_jwt}\n"
            f"system_account: {public(self.system)}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {public(self.account)}: {account_jwt}\n"
            f"  {public(self.system)}: {system_jwt}\n"
            "}\n"
        )
        return path

    def user_creds(self, path: Path, *, signed_by: nkeys.KeyPair | None = None) -> Path:
        """A new user of the account, as a `.creds` file; `signed_by` another key: a user no
        account of this operator vouches for."""
        user = new_key(nkeys.PREFIX_BYTE_USER)
        user_jwt = issue(
            signed_by or self.account,
            public(user),
            "supervisor",
            {
                "type": "user",
                "pub": {},
                "sub": {},
                "subs": UNLIMITED,
                "data": UNLIMITED,
                "payload": UNLIMITED,
            },
        )
        return creds_file(path, user_jwt, user)
