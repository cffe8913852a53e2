"""The engine fingerprint: which engines a compiled artifact loads into.

An artifact loads only into an engine of the same wasmtime version, built with the same
code-changing settings (fuel, epochs, optimisation level) for a CPU with the features the code
uses. wasmtime-py exposes no CPU-feature API, but wasmtime writes all of that into every
serialized module: its ELF section `.wasmtime.engine` holds the version, the target triple,
every Cranelift setting and the ISA flags it detected (`has_avx2`, ...). Hashing that section
of a serialized empty module names exactly the engines that accept each other's artifacts.
Measured: stable across processes (1,061 bytes, same hash), different with `opt_level` none or
fuel off; serializing the empty module takes ~0.9 ms, once per process.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import struct

import wasmtime

__all__ = ["ENGINE_SECTION", "engine_fingerprint", "engine_section"]

ENGINE_SECTION = ".wasmtime.engine"
_EMPTY_MODULE = b"\0asm\1\0\0\0"
_ELF64_LE = b"\x7fELF\x02\x01"  # magic, 64-bit, little-endian: what wasmtime emits on x86-64/arm64
_HEADER = struct.Struct("<40xQ10xHHH")  # e_shoff ... e_shentsize, e_shnum, e_shstrndx
_SECTION = struct.Struct("<IIQQQQ")  # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size


def engine_fingerprint(engine: wasmtime.Engine, engine_settings: str = "") -> str:
    """16 hex digits naming `engine`'s compiled code; `engine_settings` (the Sandbox's names
    for its settings, some of which change no code) is folded in as well."""
    version = importlib.metadata.version("wasmtime")
    section = engine_section(wasmtime.Module(engine, _EMPTY_MODULE).serialize())
    digest = hashlib.sha256(f"wasmtime-{version}|{engine_settings}|".encode())
    digest.update(section)
    return digest.hexdigest()[:16]


def engine_section(artifact: bytes | bytearray) -> bytes:
    """The `.wasmtime.engine` section of a serialized module. Raises ValueError if absent."""
    blob = bytes(artifact)
    if not blob.startswith(_ELF64_LE):
        raise ValueError("not a 64-bit little-endian ELF artifact")
    offset, entry_size, count, names_index = _HEADER.unpack_from(blob, 0)
    sections = [_SECTION.unpack_from(blob, offset + i * entry_size) for i in range(count)]
    names_at = sections[names_index][4]
    for name_at, _, _, _, start, size in sections:
        begin = names_at + name_at
        if blob[begin : blob.index(b"\0", begin)] == ENGINE_SECTION.encode():
            return blob[start : start + size]
    raise ValueError(f"no {ENGINE_SECTION} section")
