"""The peer of the end-to-end benchmark: a plain trio + h11 hello server that runs no guest.

It is the ceiling: what the same HTTP stack gives with no tenant lookup, no admission and no
sandbox. Keep-alive, Content-Length framing, nothing else.

    python bench/peer_h11.py PORT
"""

from __future__ import annotations

import sys

import h11
import trio

BODY = b"hello from wasm\n"
HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]


async def handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                continue
            if isinstance(event, h11.EndOfMessage):
                out = conn.send(h11.Response(status_code=200, headers=HEADERS))
                out += conn.send(h11.Data(data=BODY)) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
    except (trio.BrokenResourceError, h11.RemoteProtocolError):
        return
    finally:
        await trio.aclose_forcefully(stream)


async def main(port: int) -> None:
    await trio.serve_tcp(handle, port, host="127.0.0.1")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
