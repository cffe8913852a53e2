"""A registry token issuer of the tests' own, whose tokens the real registry verifies.

distribution's `auth: token:` accepts a request that carries a JWT signed (RS256) by a key
whose certificate is in its `rootcertbundle`, issued by `issuer` for `service`, granting the
repository actions the request needs. This issuer makes an RSA key and a self-signed X.509
certificate at start, in plain Python (integers, DER by hand: no `cryptography`, no openssl),
and answers the realm: basic credentials in, a token for the requested scope out. Every
request it gets is recorded for the test to read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

RSA_BITS = 2048
RSA_EXPONENT = 65537
MILLER_RABIN_ROUNDS = 32
TOKEN_LIFETIME_S = 300
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
"""DER of DigestInfo{sha256} before the hash: EMSA-PKCS1-v1_5 (RFC 8017 9.2, note 1)."""
SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
COMMON_NAME = "2.5.4.3"
_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % q for q in range(2, int(p**0.5) + 1))]


def _probably_prime(n: int) -> bool:
    if any(n % p == 0 for p in _SMALL_PRIMES):
        return n in _SMALL_PRIMES
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(MILLER_RABIN_ROUNDS):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int) -> int:
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1  # top two bits: full size
        if candidate % RSA_EXPONENT != 1 and _probably_prime(candidate):
            return candidate


class RsaKey:
    def __init__(self) -> None:
        p, q = _prime(RSA_BITS // 2), _prime(RSA_BITS // 2)
        self.n, self.e = p * q, RSA_EXPONENT
        self.d = pow(self.e, -1, (p - 1) * (q - 1))

    def sign_sha256(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256: what JWT's RS256 and X.509's signature use."""
        size = (self.n.bit_length() + 7) // 8
        digest_info = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        padded = b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" + digest_info
        return pow(int.from_bytes(padded, "big"), self.d, self.n).to_bytes(size, "big")


# DER, just what one certificate needs (X.690).
def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _integer(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _sequence(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    body = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _name(common_name: str) -> bytes:
    attribute = _sequence(_oid(COMMON_NAME), _der(0x0C, common_name.encode()))
    return _sequence(_der(0x31, attribute))


def _utc_time(moment: float) -> bytes:
    return _der(0x17, time.strftime("%y%m%d%H%M%SZ", time.gmtime(moment)).encode())


def self_signed_certificate(key: RsaKey, common_name: str) -> bytes:
    """A v3 certificate (DER) for `key`, issued by itself, valid from an hour ago for a day."""
    algorithm = _sequence(_oid(SHA256_WITH_RSA), _der(0x05, b""))
    public_key = _sequence(_integer(key.n), _integer(key.e))
    now = time.time()
    tbs = _sequence(
        _der(0xA0, _integer(2)),  # version 3
        _integer(secrets.randbits(63) + 1),
        algorithm,
        _name(common_name),
        _sequence(_utc_time(now - 3600), _utc_time(now + 86400)),
        _name(common_name),
        _sequence(_sequence(_oid(RSA_ENCRYPTION), _der(0x05, b"")), _der(0x03, b"\0" + public_key)),
    )
    return _sequence(tbs, algorithm, _der(0x03, b"\0" + key.sign_sha256(tbs)))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenIssuer:
    """The realm of a registry configured with `auth: token:` (see the module docstring)."""

    SERVICE = "oci-tests"
    ISSUER = "oci-tests-issuer"

    def __init__(self, folder: Path, username: str, password: str) -> None:
        self.key = RsaKey()
        self.certificate = self_signed_certificate(self.key, self.ISSUER)
        self.bundle = folder / "token-issuer.pem"
        pem = base64.encodebytes(self.certificate).decode().replace("\n", "")
        lines = [pem[i : i + 64] for i in range(0, len(pem), 64)]
        self.bundle.write_text(
            "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"
        )
        self.credentials = base64.b64encode(f"{username}:{password}".encode()).decode()
        self.log: list[tuple[str, str]] = []  # (scope, authorization scheme) per token request
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.realm = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def registry_auth(self) -> str:
        """The `auth:` section of the registry's config.yml."""
        return (
            "auth:\n  token:\n"
            f"    realm: {self.realm}\n    service: {self.SERVICE}\n"
            f"    issuer: {self.ISSUER}\n    rootcertbundle: {self.bundle}\n"
        )

    def __enter__(self) -> TokenIssuer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def token(self, subject: str, scopes: list[str]) -> str:
        """A JWT granting `scopes` (`repository:<name>:<actions>`), RS256, x5c-certified."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self.certificate).decode()],
        }
        claims = {
            "iss": self.ISSUER,
            "sub": subject,
            "aud": self.SERVICE,
            "exp": now + TOKEN_LIFETIME_S,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signed = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        return f"{signed}.{_b64url(self.key.sign_sha256(signed.encode()))}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                authorization = self.headers.get("authorization", "")
                query = parse_qs(urlsplit(self.path).query)
                scopes = query.get("scope", [])
                issuer.log.append((" ".join(scopes), authorization.partition(" ")[0]))
                if authorization != f"Basic {issuer.credentials}":
                    body, status = b'{"details": "wrong credentials"}', 401
                elif query.get("service") != [issuer.SERVICE]:
                    body, status = b'{"details": "unknown service"}', 400
                else:
                    token = issuer.token("oci-tests-user", scopes)
                    body, status = json.dumps({"token": token, "expires_in": 300}).encode(), 200
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
