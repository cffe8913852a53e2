"""A TCP relay on 127.0.0.1 that a test can cut and restore: one pod's own network to NATS.

Stopping nats-server disconnects every pod at once; a relay in front of one pod's connection
takes that pod alone away while the others keep writing, which is what a pod on a node whose
network fails sees. `cut` closes the listening socket and every relayed connection (the pod's
reconnects are then refused); `restore` listens again on the same port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

from nats_server import free_port

CHUNK = 64 * 1024


class TcpRelay:
    """Relays 127.0.0.1:`port` to 127.0.0.1:`upstream_port`, a thread per direction."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, target), daemon=True).start()


def _pump(source: socket.socket, target: socket.socket) -> None:
    """Copy until either side closes; then close both (the other pump ends too)."""
    try:
        while data := source.recv(CHUNK):
            target.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def relay_to(upstream_port: int) -> Iterator[TcpRelay]:
    relay = TcpRelay(upstream_port)
    relay.restore()
    try:
        yield relay
    finally:
        relay.cut()
