"""A new pod's first load of a module from the store's shared artifacts, vs compiling it.

Runs `--pods` fresh processes over one `file:` store, each with an empty local cache: the first
compiles and publishes the sealed artifact, the others read, verify and deserialize it.

    PYTHONPATH=. python bench/shared_artifacts.py --wasm python3.11.wasm --pods 4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = "bench:" + "b" * 40  # a throwaway key: the store lives in a temp folder


def one_pod(wasm: Path, root: Path, name: str) -> None:
    from supervisor.artifacts import ArtifactKeys, FileArtifactBucket
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
            bucket=FileArtifactBucket(root / "store"),
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
    parser.add_argument("--pod", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pod:
        one_pod(args.wasm, args.root, args.pod)
        return
    with tempfile.TemporaryDirectory() as root:
        for index in range(args.pods):
            command = [sys.executable, __file__, "--wasm", str(args.wasm)]
            subprocess.run([*command, "--root", root, "--pod", str(index)], check=True)


if __name__ == "__main__":
    main()
