"""A new pod's first load of a module from the store's shared artifacts, vs compiling it.

Runs `--pods` fresh processes over one store, each with an empty local cache: the first
compiles and publishes the sealed artifact, the others read, verify and deserialize it. With
`--store nats`, a temporary nats-server (`.cache/nats`, as `make test` unpacks it) on 127.0.0.1.

    PYTHONPATH=. python bench/shared_artifacts.py --wasm python3.11.wasm --pods 4 --store nats
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = "bench:" + "b" * 40  # a throwaway key: the store lives in a temp folder
NATS_SERVER = Path(__file__).resolve().parent.parent / ".cache/nats/usr/sbin/nats-server"


def open_bucket(root: Path, nats_url: str | None):
    from supervisor.artifacts import FileArtifactBucket

    if nats_url is None:
        return FileArtifactBucket(root / "store")
    from supervisor.store.nats_artifacts import NatsArtifactBucket
    from supervisor.store.nats_client import NatsConnection, parse_nats_url

    connection = NatsConnection(parse_nats_url(nats_url))
    connection.start()
    if not connection.wait_connected(10):
        raise SystemExit(f"nats: {connection.last_error}")
    return NatsArtifactBucket(connection)


def one_pod(wasm: Path, root: Path, name: str, nats_url: str | None) -> None:
    from supervisor.artifacts import ArtifactKeys
    from supervisor.modules import ArtifactCache
    from supervisor.sandbox import Sandbox

    binary = wasm.read_bytes()
    keys = ArtifactKeys.parse(KEYS, source="bench")
    with Sandbox() as sandbox:
        cache = ArtifactCache(
            root / f"cache-{name}",
            sandbox.engine,
            sandbox.settings,
            sandbox.code,
            bucket=open_bucket(root, nats_url),
            keys=keys,
        )
        started = time.perf_counter()
        loaded = cache.load(binary, name=wasm.name)
        load_s = time.perf_counter() - started
        shared = cache.shared
        started = time.perf_counter()
        sealed = shared.bucket.get(f"{cache.fingerprint}/{loaded.sha256}")
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        keys.open(sealed, fingerprint=cache.fingerprint, digest=loaded.sha256)
        verify_s = time.perf_counter() - started
    how = "compiled" if cache.compiled else "from the store"
    print(
        f"pod {name}: {how}: {load_s * 1000:.0f} ms (sealed artifact {len(sealed)} B:"
        f" read {read_s * 1000:.1f} ms, verify {verify_s * 1000:.1f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wasm", type=Path, required=True)
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--store", choices=["file", "nats"], default="file")
    parser.add_argument("--nats-url", help=argparse.SUPPRESS)
    parser.add_argument("--pod", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pod:
        one_pod(args.wasm, args.root, args.pod, args.nats_url)
        return
    with tempfile.TemporaryDirectory() as root:
        command = [sys.executable, __file__, "--wasm", str(args.wasm), "--root", root]
        server = None
        if args.store == "nats":
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            server = subprocess.Popen(
                [str(NATS_SERVER), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", root],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            command += ["--nats-url", f"nats://127.0.0.1:{port}"]
        try:
            for index in range(args.pods):
                subprocess.run([*command, "--pod", str(index)], check=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=10)


if __name__ == "__main__":
    main()
