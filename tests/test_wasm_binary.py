"""The binary reader on real modules (from `wasmtime.wat2wasm`) and on broken ones built by hand."""

from __future__ import annotations

import random
import time

import pytest
import wasmtime
from conftest import leb, section

from supervisor.errors import ModuleRejected
from supervisor.wasm_binary import (
    Export,
    Import,
    WasmFormatError,
    disallowed_imports,
    inspect,
)

HEADER = b"\0asm\x01\0\0\0"
MALFORMED = "truncated or malformed WebAssembly at byte offset "

# A small module touching every section the reader parses, and some it skips.
SMALL_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
  (import "host" "call" (func))
  (import "env" "memory" (memory 2))
  (global $g (mut i32) (i32.const 7))
  (func (export "_start") call 1)
  (func (export "pair") (param i64) (result i32 i32) i32.const 1 i32.const 2)
  (export "g" (global $g))
  (data (i32.const 0) "hello")
  (@custom "note" "a custom section")
)
"""


def name(text: str) -> bytes:
    raw = text.encode()
    return leb(len(raw)) + raw


def outcome(binary: bytes | memoryview) -> str:
    """ "ok" or the WasmFormatError message; any other exception fails the test."""
    try:
        inspect(binary)
    except WasmFormatError as exc:
        return exc.message
    return "ok"


@pytest.fixture(scope="module")
def small() -> bytes:
    return wasmtime.wat2wasm(SMALL_WAT)


# What a module needs and offers


def test_imports_of_every_kind_in_module_order() -> None:
    info = inspect(
        wasmtime.wat2wasm("""
        (module
          (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
          (import "host" "call" (func))
          (import "wasi_experimental_http" "req" (func (param i32) (result i32)))
          (import "env" "table" (table 1 funcref))
          (import "env" "memory" (memory 1))
          (import "env" "g" (global (mut i64)))
          (import "env" "oops" (tag (param i32)))
          (import "wasi_snapshot_preview1" "proc_exit" (func (param i32))))
        """)
    )
    assert info.imports == (
        Import("wasi_snapshot_preview1", "fd_write", "func"),
        Import("host", "call", "func"),
        Import("wasi_experimental_http", "req", "func"),
        Import("env", "table", "table"),
        Import("env", "memory", "memory"),
        Import("env", "g", "global"),
        Import("env", "oops", "tag"),
        Import("wasi_snapshot_preview1", "proc_exit", "func"),
    )
    assert [(i.module, i.name) for i in disallowed_imports(info)] == [
        ("host", "call"),
        ("wasi_experimental_http", "req"),
        ("env", "table"),
        ("env", "memory"),
        ("env", "g"),
        ("env", "oops"),
    ]
    assert [i.name for i in disallowed_imports(info, allowed_module="env")] == [
        "fd_write",
        "call",
        "req",
        "proc_exit",
    ]


def test_compile_cost_is_the_defined_functions_and_the_code_section_size(small: bytes) -> None:
    """Imported functions cost no compile; the code section is measured, never read."""
    info = inspect(small)
    assert info.functions == 2  # _start and pair; fd_write and host.call are imports
    code = wasmtime.wat2wasm("(module (func) (func (drop (i32.const 1))))")
    # The code section: a count (1 byte), then each body with its size: 1 + 3 + 6 bytes.
    assert code.endswith(section(10, b"\x02" + b"\x02\x00\x0b" + b"\x05\x00\x41\x01\x1a\x0b"))
    assert inspect(code).code_bytes == 10
    assert (inspect(HEADER).functions, inspect(HEADER).code_bytes) == (0, 0)


def test_a_wasi_only_module_has_no_disallowed_imports() -> None:
    info = inspect(
        wasmtime.wat2wasm(
            '(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32))))'
        )
    )
    assert disallowed_imports(info) == []


def test_export_signatures_follow_the_function_index_space_after_imports() -> None:
    info = inspect(
        wasmtime.wat2wasm("""
        (module
          (import "a" "f0" (func $f0 (param i32 i32 i32) (result i64)))
          (import "a" "f1" (func))
          (func $g (export "_start"))
          (func (export "add") (param i32 f64) (result f32) f32.const 0)
          (func (export "multi") (result i32 i32 i32) i32.const 0 i32.const 0 i32.const 0)
          (export "reexported" (func $f0))
          (export "also_start" (func $g))
          (table (export "tab") 1 funcref)
          (memory (export "memory") 1)
          (global (export "answer") i32 (i32.const 42)))
        """)
    )
    assert info.exports == (
        Export("_start", "func", 0, 0),
        Export("add", "func", 2, 1),
        Export("multi", "func", 0, 3),
        Export("reexported", "func", 3, 1),
        Export("also_start", "func", 0, 0),
        Export("tab", "table"),
        Export("memory", "memory"),
        Export("answer", "global"),
    )
    assert info.export("add") == Export("add", "func", 2, 1)
    assert info.export("missing") is None


def test_gc_type_forms_keep_type_indices_right() -> None:
    """Struct types and recursion groups occupy type indices that func types are counted after."""
    binary = wasmtime.wat2wasm("""
        (module
          (type (struct (field i32) (field (mut i8))))
          (type (array (mut (ref null any))))
          (rec (type $a (func (param (ref null $a)))) (type (sub (struct))))
          (func (export "f") (type $a)))
    """)
    assert inspect(binary).export("f") == Export("f", "func", 1, 0)


@pytest.mark.parametrize(
    ("wat", "expected"),
    [
        ("(module)", None),
        ("(module (memory 3))", 3 * 65536),
        ('(module (import "env" "m" (memory 2 10)) (memory 5))', 2 * 65536),
        ("(module (memory i64 4))", 4 * 65536),
        ("(module (memory 1000 (pagesize 1)))", 1000),
        ("(module (memory 0))", 0),
    ],
    ids=["none", "defined", "imported-first", "memory64", "one-byte-pages", "zero"],
)
def test_initial_memory_is_memory_zero(wat: str, expected: int | None) -> None:
    assert inspect(wasmtime.wat2wasm(wat)).initial_memory_bytes == expected


def test_inspect_accepts_a_memoryview_and_releases_the_buffer(small: bytes) -> None:
    buffer = bytearray(small)
    assert inspect(memoryview(buffer)) == inspect(small)
    buffer.extend(b"\0")  # would raise BufferError if a view were still held


# Refusals that name the problem


def test_module_rejected_with_status_422() -> None:
    with pytest.raises(ModuleRejected) as caught:
        inspect(b"")
    assert caught.value.status == 422


@pytest.mark.parametrize(
    "text",
    [
        b"(module)",
        b"  \n\t(module (func))",
        b";; hello.wat\n;; two comment lines\n(module)",
        b"(; block (; nested ;) comment ;)\n(module $named)",
        b"(component)",
    ],
)
def test_wat_text_is_named_as_such(text: bytes) -> None:
    assert outcome(text).startswith("this is WebAssembly text (WAT); ")


@pytest.mark.parametrize(
    ("binary", "found"),
    [
        (b"", "an empty file"),
        (b"\x7fELF\x02\x01\x01\0", "7f 45 4c 46"),
        (b"<html>(module)</html>", "3c 68 74 6d"),
        (b";; an unterminated comment (module)", "3b 3b 20 61"),
        (b"\0ASM\x01\0\0\0", "00 41 53 4d"),
    ],
)
def test_not_a_module_shows_the_bytes_found(binary: bytes, found: str) -> None:
    message = outcome(binary)
    assert message.startswith("not a WebAssembly module: ")
    assert message.endswith(found)


def test_a_component_is_not_a_core_module() -> None:
    message = outcome(wasmtime.wat2wasm("(component)"))
    assert message.startswith("a WebAssembly component, not a core module: ")


def test_other_versions_are_unsupported() -> None:
    assert outcome(b"\0asm\x02\0\0\0") == "unsupported WebAssembly version 2"


@pytest.mark.parametrize(
    ("binary", "offset", "what"),
    [
        (b"\0asm\x01\0", 6, "the 8-byte header is incomplete"),
        (HEADER + b"\x0e\x00", 8, "unknown section id 14"),
        (HEADER + b"\x01\x80\x80\x80\x80\x80", 9, "integer representation too long (u32)"),
        (HEADER + b"\x01\xff\xff\xff\xff\x1f", 9, "integer too large (u32)"),
        (HEADER + b"\x0a\x64\x01", 8, "the code section declares 100 bytes, but only 1 remain"),
        (
            HEADER + section(7, b"\x00") + section(1, b"\x00"),
            11,
            "the type section comes after the export section",
        ),
        (
            HEADER + section(5, b"\x00") + section(5, b"\x00"),
            11,
            "the memory section comes after the memory section",
        ),
        (HEADER + section(1, b"\x00\x00"), 11, "1 unexpected bytes at the end of the type section"),
        (HEADER + section(1, b"\x01\x60\x01\x7f"), 14, "unexpected end of the type section"),
        (
            HEADER + section(1, b"\x01\x60\x01"),
            12,
            "1 parameters declared, but only 0 bytes remain",
        ),
        (HEADER + section(1, b"\x01\x60\x01\x20\x00"), 13, "unknown value type 0x20"),
        (HEADER + section(1, b"\x01\x40"), 11, "unknown type form 0x40"),
        (HEADER + section(2, b"\x05\x00"), 10, "5 imports declared, but only 1 bytes remain"),
        (
            HEADER + section(2, b"\x01" + name("a") + name("b") + b"\x07\x00"),
            15,
            "unknown import kind 0x07 for a.b",
        ),
        (
            HEADER + section(2, b"\x01\x02\xc3\x28" + name("b") + b"\x00\x00"),
            11,
            "a name is not valid UTF-8",
        ),
        (HEADER + section(3, b"\x01\x80"), 12, "unexpected end of the function section"),
        (HEADER + section(5, b"\x01\x10\x01"), 11, "unknown limits flags 0x10"),
        (HEADER + section(5, b"\x01\x08\x01\x30"), 11, "page size 2**48 is larger than 64 KiB"),
        (
            HEADER + section(7, b"\x01" + name("_start") + b"\x00\x00"),
            18,
            "export '_start' names function 0, which does not exist",
        ),
        (
            HEADER
            + section(1, b"\x01\x5f\x00")
            + section(3, b"\x01\x00")
            + section(7, b"\x01" + name("f") + b"\x00\x00"),
            22,
            "function 0 (export 'f') has no function type",
        ),
        (
            HEADER + section(7, b"\x01" + name("t") + b"\x09\x00"),
            13,
            "unknown export kind 0x09 for 't'",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_binaries_name_the_offset_and_the_fault(
    binary: bytes, offset: int, what: str
) -> None:
    assert outcome(binary) == f"{MALFORMED}{offset}: {what}"


# Never any other exception


def test_every_truncation_is_refused_or_a_whole_section_prefix(small: bytes) -> None:
    full = inspect(small)
    refused = 0
    for n in range(1, len(small)):
        try:
            info = inspect(memoryview(small)[:n])
        except WasmFormatError as exc:
            assert exc.message.startswith(MALFORMED), (n, exc.message)
            refused += 1
            continue
        # A cut that falls between two sections leaves a shorter, well-formed module.
        assert info.imports in ((), full.imports), n
        assert info.exports in ((), full.exports), n
    assert refused > len(small) * 0.8


def test_byte_mutations_never_escape_and_never_refuse_what_wasmtime_accepts(small: bytes) -> None:
    engine = wasmtime.Engine()
    for position in range(len(small)):
        for value in (0x00, 0x01, 0x40, 0x7F, 0x80, 0xFF):
            mutated = bytearray(small)
            mutated[position] = value
            message = outcome(bytes(mutated))
            if message != "ok":
                with pytest.raises(wasmtime.WasmtimeError):
                    wasmtime.Module.validate(engine, bytes(mutated))


def test_random_garbage_is_refused_cleanly() -> None:
    rng = random.Random(20240601)
    for _ in range(2000):
        garbage = rng.randbytes(rng.randrange(0, 64))
        if rng.random() < 0.5:
            garbage = HEADER + garbage
        outcome(garbage)


@pytest.mark.parametrize(
    ("section_id", "items"),
    [(1, "types"), (2, "imports"), (3, "functions"), (5, "memories"), (7, "exports")],
)
def test_a_count_the_section_cannot_hold_is_named(section_id: int, items: str) -> None:
    message = outcome(HEADER + section(section_id, leb(2**32 - 1)))
    assert message == f"{MALFORMED}10: 4294967295 {items} declared, but only 0 bytes remain"


# Speed: a big runtime is inspected in milliseconds


def test_a_50_mb_custom_section_is_skipped_not_read(small: bytes) -> None:
    payload = bytes(50 * 1024 * 1024)
    binary = small + section(0, name("debug") + payload)
    started = time.perf_counter()
    info = inspect(binary)
    elapsed = time.perf_counter() - started
    print(f"inspect of a {len(binary) / 1e6:.0f} MB module: {elapsed * 1e3:.2f} ms")
    assert info == inspect(small)
    assert elapsed < 1.0


@pytest.mark.parametrize("type_count", [100, 300], ids=["one-byte-indices", "two-byte-indices"])
def test_a_100k_function_module_is_inspected_quickly(type_count: int) -> None:
    functions = 100_000
    types = leb(type_count) + b"".join(
        b"\x60" + leb(k % 4) + b"\x7f" * (k % 4) + b"\x00" for k in range(type_count)
    )
    function_types = [(k * 7) % type_count for k in range(functions)]
    binary = (
        HEADER
        + section(1, types)
        + section(3, leb(functions) + b"".join(leb(t) for t in function_types))
        + section(7, b"\x01" + name("last") + b"\x00" + leb(functions - 1))
    )
    started = time.perf_counter()
    info = inspect(binary)
    elapsed = time.perf_counter() - started
    print(f"inspect of {functions} functions, {type_count} types: {elapsed * 1e3:.2f} ms")
    assert info.export("last") == Export("last", "func", function_types[-1] % 4, 0)
    assert elapsed < 1.0
