"""A real nats-server with JetStream for the `--store nats://` tests.

Debian's `nats-server` (2.9.10), unpacked by `make test` into .cache/nats the way promtool is,
runs on a free 127.0.0.1 port with a temporary store folder (`-js -sd DIR`). `stop` and
`start` restart it on the same port and folder, so a test can take NATS away mid-traffic and
bring it back with everything it had stored.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO, unpacked_binary

NATS_BINARY = REPO / ".cache" / "nats" / "usr" / "sbin" / "nats-server"
READY_S = 20.0
"""nats-server accepts within ~50 ms; a loaded CI machine gets far longer."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class NatsServer:
    """One nats-server process with JetStream; `url` stays the same across restarts."""

    def __init__(self, folder: Path, *, extra: tuple[str, ...] = ()) -> None:
        self.binary = unpacked_binary(NATS_BINARY, "nats-server")
        self.extra = extra  # more nats-server options (`--auth TOKEN`)
        self.folder = folder
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log_file = (self.folder / "nats.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(self.binary),
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-sd",
                str(self.folder / "jetstream"),
                *self.extra,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        deadline = time.monotonic() + READY_S
        while True:  # ready when the port accepts and JetStream said it is up
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                if b"Server is ready" in (self.folder / "nats.log").read_bytes():
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start: {self.log()}")
            time.sleep(0.02)  # polling a process we started for its port; no event to wait on

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def log(self) -> str:
        return (self.folder / "nats.log").read_text(errors="replace")


@contextlib.contextmanager
def run_nats(folder: Path, *, extra: tuple[str, ...] = ()) -> Iterator[NatsServer]:
    server = NatsServer(folder, extra=extra)
    server.start()
    try:
        yield server
    finally:
        server.stop()
