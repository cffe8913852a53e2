"""How the store signs in to NATS and trusts it: `tls://` with `--store-ca`, and
`--store-credentials` with a `.creds` file (decentralized JWT auth) or a token.

A real nats-server each time: with TLS (a certificate made by the `openssl` CLI), or in
operator mode with JWTs this test signs with `nkeys` (tests/nats_operator.py). A fault is
named: a certificate no CA of `--store-ca` vouches for names the store's URL and that file;
a `.creds` file refused, unreadable or malformed names the file.
"""

from __future__ import annotations

import nkeys
import pytest
from nats_operator import Operator, new_key
from nats_server import run_nats
from test_tls import make_certificate

from supervisor.errors import ConfigError
from supervisor.store.settings import StoreSettings

CONNECT_S = 20.0
"""A store connects and reads its manifests within this (a loaded CI machine included)."""
REFUSED_S = 2.0
"""How long a store that must not connect is given to try (it retries every 0.5 s)."""


def test_a_tls_store_connects_trusting_the_ca_of_store_ca(tmp_path):
    cert, key = make_certificate(tmp_path)  # self-signed: its own CA
    (tmp_path / "other").mkdir()
    other_ca, _ = make_certificate(tmp_path / "other")  # another CA, same names
    tls = ("--tls", "--tlscert", str(cert), "--tlskey", str(key))
    with run_nats(tmp_path / "nats", extra=tls) as server:
        url = server.url.replace("nats://", "tls://")
        trusting = StoreSettings.parse(url, ca_file=cert).open(tmp_path / "a")
        wrong_ca = StoreSettings.parse(url, ca_file=other_ca).open(tmp_path / "b")
        system_cas = StoreSettings.parse(url).open(tmp_path / "c")
        try:
            assert trusting.wait_synced(CONNECT_S), trusting.connection.last_error
            digest = trusting.put_module("acme", b"\0asm\1\0\0\0")
            assert trusting.has_module("acme", digest)
            for store, ca in ((wrong_ca, str(other_ca)), (system_cas, "the system's CAs")):
                assert not store.connection.wait_connected(REFUSED_S)
                error = store.connection.last_error
                assert url in error and "not trusted" in error and ca in error, error
        finally:
            for store in (trusting, wrong_ca, system_cas):
                store.close()


def test_store_ca_is_refused_with_a_plain_nats_url_or_a_file_that_holds_no_ca(tmp_path):
    cert, _ = make_certificate(tmp_path)
    with pytest.raises(ConfigError, match="only a tls:// store") as plain:
        StoreSettings.parse("nats://127.0.0.1:4222", ca_file=cert)
    assert "--store-ca" in plain.value.message
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("hello\n")
    with pytest.raises(ConfigError, match="not a PEM CA bundle") as garbage:
        StoreSettings.parse("tls://127.0.0.1:4222", ca_file=not_pem)
    assert str(not_pem) in garbage.value.message


def test_a_creds_file_signs_in_to_an_operator_mode_server_with_jetstream(tmp_path):
    """The account's JWT (signed by the operator) gives it JetStream; the user's JWT (signed by
    the account) and its seed sign the server's nonce. A user no account vouches for is
    refused, and the error names its .creds file."""
    operator = Operator.create()
    config = operator.server_config(tmp_path / "server.conf")
    good = operator.user_creds(tmp_path / "good.creds")
    stranger = operator.user_creds(
        tmp_path / "stranger.creds", signed_by=new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    )
    with run_nats(tmp_path / "nats", extra=("-c", str(config))) as server:
        signed_in = StoreSettings.parse(server.url, credentials=good).open(tmp_path / "a")
        refused = StoreSettings.parse(server.url, credentials=stranger).open(tmp_path / "b")
        anonymous = StoreSettings.parse(server.url).open(tmp_path / "c")
        try:
            assert signed_in.wait_synced(CONNECT_S), signed_in.connection.last_error
            digest = signed_in.put_module("acme", b"\0asm\1\0\0\0")  # JetStream answers
            assert signed_in.get_module("acme", digest) == b"\0asm\1\0\0\0"
            for store, named in ((refused, str(stranger)), (anonymous, "no --store-credentials")):
                assert not store.connection.wait_connected(REFUSED_S)
                error = store.connection.last_error
                assert server.url in error and "refused" in error and named in error, error
        finally:
            for store in (signed_in, refused, anonymous):
                store.close()


def test_a_missing_or_malformed_credentials_file_is_named_before_connecting(tmp_path):
    operator = Operator.create()
    creds = operator.user_creds(tmp_path / "user.creds")
    url = "nats://127.0.0.1:4222"
    faults = {
        tmp_path / "absent.creds": "cannot read",
        tmp_path / "no-seed.creds": "without its NKey seed",
        tmp_path / "empty": "neither a NATS .creds file nor one token",
    }
    (tmp_path / "no-seed.creds").write_text(creds.read_text().split("\n\n")[0])
    (tmp_path / "empty").write_text("\n")
    for path, reason in faults.items():
        with pytest.raises(ConfigError) as raised:
            StoreSettings.parse(url, credentials=path)
        message = raised.value.message
        assert "--store-credentials" in message and str(path) in message, message
        assert reason in message, message
