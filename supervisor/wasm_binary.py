"""A pure reader of the WebAssembly binary format: enough to refuse a bad module before compiling.

Compiling a 100 MB language runtime takes a minute and gigabytes; reading its section headers
takes microseconds. So uploads and loads call `inspect` first: it parses only the sections that
say what a module needs and offers (type, import, function, memory, export), skips every other
section (code, data, custom...) by its declared size, and never copies the binary. It checks only
what it reads; wasmtime still validates the whole module when it compiles it. What compiling
will cost is known from the same pass: the number of functions (the function section) and the
code section's size.

Any malformed input raises `WasmFormatError` (a `ModuleRejected`, 422) naming the problem and,
for a structural fault, its byte offset. Any other exception escaping `inspect` is a bug.

Reference: WebAssembly Core Specification 2.0, chapter 5 "Binary Format", plus the encodings of
the memory64, custom-page-sizes, exception-handling (tags) and GC (type forms) proposals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from supervisor.errors import ModuleRejected

__all__ = [
    "WASI_MODULE",
    "Export",
    "Import",
    "WasmFormatError",
    "WasmInfo",
    "disallowed_imports",
    "inspect",
]

WASI_MODULE = "wasi_snapshot_preview1"

_MAGIC = b"\0asm"
_HEADER_BYTES = 8  # magic + 4-byte little-endian version
_CORE_VERSION = 1
# A component's header has the same magic, a 2-byte version (0x0d at the time of writing, it
# moves with each draft) and then a 2-byte "layer" that is 0 for core modules and 1 here.
_COMPONENT_LAYER = b"\x01\x00"

_PAGE_SIZE = 65536  # the memory page size unless custom-page-sizes says otherwise
# custom-page-sizes allows pages of 1 byte or 64 KiB; refusing a larger exponent up front also
# keeps a hostile 2**(2**32) out of the initial-memory arithmetic.
_MAX_PAGE_SIZE_LOG2 = 16

# How much of a non-wasm upload to search for WAT text: enough for a licence header in comments
# before "(module", bounded so a huge upload costs no more than a small one.
_WAT_SNIFF_BYTES = 4096
_WAT_STARTS = ("(module", "(component")

_SECTION_NAMES = {
    0: "custom",
    1: "type",
    2: "import",
    3: "function",
    4: "table",
    5: "memory",
    6: "global",
    7: "export",
    8: "start",
    9: "element",
    10: "code",
    11: "data",
    12: "data count",
    13: "tag",
}
_CODE_SECTION = 10
# The order the spec requires of the non-custom sections (tag sits between memory and global;
# data count before code). Each may appear at most once.
_SECTION_RANK = {sid: rank for rank, sid in enumerate((1, 2, 3, 4, 5, 13, 6, 7, 8, 9, 12, 10, 11))}

_EXTERN_KINDS = ("func", "table", "memory", "global", "tag")  # indexed by the kind byte
_FUNC, _TABLE, _MEMORY, _GLOBAL, _TAG = range(len(_EXTERN_KINDS))

# Limits flags (memory64 and custom-page-sizes extend the original 0x00/0x01).
_LIMITS_HAS_MAX = 0x01
_LIMITS_SHARED = 0x02
_LIMITS_64 = 0x04
_LIMITS_PAGE_SIZE = 0x08
_LIMITS_KNOWN = _LIMITS_HAS_MAX | _LIMITS_SHARED | _LIMITS_64 | _LIMITS_PAGE_SIZE

# Type section forms (the GC proposal adds all but func; wasmtime enables GC by default).
_FUNC_TYPE = 0x60
_STRUCT_TYPE = 0x5F
_ARRAY_TYPE = 0x5E
_SUB_TYPE = 0x50
_SUB_FINAL_TYPE = 0x4F
_REC_GROUP = 0x4E

# Value types are one byte (a negative one-byte SLEB: numbers, v128, abstract reference
# shorthands, packed i8/i16), except `(ref null ht)` / `(ref ht)`, which carry a heap type.
_ONE_BYTE_TYPES = range(0x40, 0x80)
_REF_NULL = 0x63
_REF = 0x64
_S33_MAX_BYTES = 5  # ceil(33 / 7)
_U32_MAX_BYTES = 5  # ceil(32 / 7)


class WasmFormatError(ModuleRejected):
    """The bytes are not a core WebAssembly module we can read; the message says why."""


@dataclass(frozen=True, slots=True)
class Import:
    module: str
    name: str
    kind: str  # "func" | "table" | "memory" | "global" | "tag"


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    kind: str
    params: int | None = None  # for func exports: how many params and results its type has
    results: int | None = None


@dataclass(frozen=True, slots=True)
class WasmInfo:
    imports: tuple[Import, ...]
    exports: tuple[Export, ...]
    initial_memory_bytes: int | None  # memory 0 (imported or defined); None without memory
    functions: int  # defined (not imported): compile time and memory grow with them
    code_bytes: int  # the code section's size: the other measure of compile cost

    def export(self, name: str) -> Export | None:
        """The export called `name`, or None (export names are unique in a valid module)."""
        return next((e for e in self.exports if e.name == name), None)


def disallowed_imports(info: WasmInfo, allowed_module: str = WASI_MODULE) -> list[Import]:
    """Imports that no host but `allowed_module` could satisfy, in module order."""
    return [imp for imp in info.imports if imp.module != allowed_module]


def inspect(binary: bytes | memoryview) -> WasmInfo:
    """Read what a core module imports and exports, and its initial memory, without compiling."""
    with memoryview(binary) as view, view.cast("B") as data:
        _check_header(data)
        return _Parser(data).parse()


def _check_header(data: memoryview) -> None:
    cut_in_magic = 0 < len(data) < len(_MAGIC) and _MAGIC.startswith(data)
    if data[: len(_MAGIC)] != _MAGIC and not cut_in_magic:
        if _looks_like_wat(data[:_WAT_SNIFF_BYTES]):
            raise WasmFormatError(
                "this is WebAssembly text (WAT); convert it to the binary format before inspecting"
            )
        found = bytes(data[: len(_MAGIC)]).hex(" ") if data else "an empty file"
        raise WasmFormatError(
            f"not a WebAssembly module: expected the magic bytes 00 61 73 6d ('\\0asm'), "
            f"found {found}"
        )
    if len(data) < _HEADER_BYTES:
        _malformed(len(data), f"the {_HEADER_BYTES}-byte header is incomplete")
    version = data[4:8]
    if version[2:] == _COMPONENT_LAYER:
        raise WasmFormatError(
            "a WebAssembly component, not a core module: WAGI guests are core modules "
            f"importing {WASI_MODULE} (component version {version[0] | version[1] << 8})"
        )
    number = int.from_bytes(version, "little")
    if number != _CORE_VERSION:
        raise WasmFormatError(f"unsupported WebAssembly version {number}")


def _looks_like_wat(head: memoryview) -> bool:
    """True if `head` is whitespace and WAT comments followed by "(module" or "(component"."""
    text = bytes(head).decode("latin-1")
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if text.startswith(";;", pos):
            end = text.find("\n", pos)
            if end < 0:
                return False
            pos = end + 1
        elif text.startswith("(;", pos):
            pos = _skip_block_comment(text, pos)
            if pos < 0:
                return False
        else:
            return text.startswith(_WAT_STARTS, pos)


def _skip_block_comment(text: str, pos: int) -> int:
    """Index just past the (possibly nested) `(; ... ;)` at `pos`, or -1 if it does not end."""
    depth = 0
    while pos < len(text):
        if text.startswith("(;", pos):
            depth += 1
            pos += 2
        elif text.startswith(";)", pos):
            depth -= 1
            pos += 2
            if depth == 0:
                return pos
        else:
            pos += 1
    return -1


def _malformed(offset: int, what: str) -> NoReturn:
    raise WasmFormatError(f"truncated or malformed WebAssembly at byte offset {offset}: {what}")


class _Reader:
    """A cursor over `data[pos:end]` that refuses to read past `end` (one section, or the file)."""

    __slots__ = ("data", "end", "place", "pos")

    def __init__(self, data: memoryview, pos: int, end: int, place: str) -> None:
        self.data = data
        self.pos = pos
        self.end = end
        self.place = place  # for messages: "the module", "the import section"...

    def fail(self, what: str, offset: int | None = None) -> NoReturn:
        _malformed(self.pos if offset is None else offset, what)

    def byte(self) -> int:
        if self.pos >= self.end:
            self.fail(f"unexpected end of {self.place}")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def uleb(self, bits: int) -> int:
        """An unsigned LEB128 integer of at most `bits` bits, in at most ceil(bits/7) bytes."""
        start = self.pos
        result = shift = 0
        while True:
            value = self.byte()
            result |= (value & 0x7F) << shift
            shift += 7
            if value < 0x80:
                break
            if shift >= bits:
                self.fail(f"integer representation too long (u{bits})", start)
        if result >> bits:
            self.fail(f"integer too large (u{bits})", start)
        return result

    def u32(self) -> int:
        return self.uleb(32)

    def u32_vector(self, n: int) -> list[int]:
        """`n` u32s: `u32` inlined (twice as fast), because a big runtime has one per function."""
        data, pos, end = self.data, self.pos, self.end
        values: list[int] = []
        for _ in range(n):
            start = pos
            value = shift = 0
            while True:
                if pos >= end:
                    self.pos = pos
                    self.fail(f"unexpected end of {self.place}")
                byte = data[pos]
                pos += 1
                value |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift >= _U32_MAX_BYTES * 7:
                    self.fail("integer representation too long (u32)", start)
            if value >> 32:
                self.fail("integer too large (u32)", start)
            values.append(value)
        self.pos = pos
        return values

    def skip_s33(self) -> None:
        start = self.pos
        for _ in range(_S33_MAX_BYTES):
            if self.byte() < 0x80:
                return
        self.fail("heap type representation too long", start)

    def count(self, what: str) -> int:
        """A vector length, refused at once if the bytes left could not hold that many items."""
        start = self.pos
        n = self.u32()
        if n > self.end - self.pos:
            self.fail(f"{n} {what} declared, but only {self.end - self.pos} bytes remain", start)
        return n

    def name(self) -> str:
        start = self.pos
        size = self.u32()
        if size > self.end - self.pos:
            self.fail(f"a name of {size} bytes runs past the end of {self.place}", start)
        raw = bytes(self.data[self.pos : self.pos + size])
        self.pos += size
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail("a name is not valid UTF-8", start)

    def value_type(self) -> None:
        start = self.pos
        code = self.byte()
        if code in (_REF_NULL, _REF):
            self.skip_s33()
        elif code not in _ONE_BYTE_TYPES:
            self.fail(f"unknown value type 0x{code:02x}", start)

    def limits(self) -> tuple[int, int]:
        """(minimum, page size) of a memory or table type; the rest is read and dropped."""
        start = self.pos
        flags = self.byte()
        if flags & ~_LIMITS_KNOWN:
            self.fail(f"unknown limits flags 0x{flags:02x}", start)
        bits = 64 if flags & _LIMITS_64 else 32
        minimum = self.uleb(bits)
        if flags & _LIMITS_HAS_MAX:
            self.uleb(bits)
        page_size = _PAGE_SIZE
        if flags & _LIMITS_PAGE_SIZE:
            log2 = self.u32()
            if log2 > _MAX_PAGE_SIZE_LOG2:
                self.fail(f"page size 2**{log2} is larger than 64 KiB", start)
            page_size = 1 << log2
        return minimum, page_size


class _Parser:
    """Walks the sections once, filling in what `WasmInfo` needs."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.types: list[tuple[int, int] | None] = []  # (params, results); None: not a func type
        self.func_types: list[int] = []  # type index of each imported function
        # Type index of each defined function: the function section's bytes as they are when
        # every index is one byte (the usual case), else decoded; read only for exports.
        self.defined_types: bytes | list[int] = b""
        self.defined_functions = 0
        self.code_bytes = 0
        self.imports: list[Import] = []
        self.memory_bytes: list[int] = []  # initial size of each memory, imports first
        self.exports: list[Export] = []
        self.sections: dict[int, Callable[[_Reader], None]] = {
            1: self.type_section,
            2: self.import_section,
            3: self.function_section,
            5: self.memory_section,
            7: self.export_section,
        }

    def parse(self) -> WasmInfo:
        size = len(self.data)
        top = _Reader(self.data, _HEADER_BYTES, size, "the module")
        last_rank = -1
        last_name = ""
        while top.pos < size:
            start = top.pos
            section_id = top.byte()
            name = _SECTION_NAMES.get(section_id)
            if name is None:
                top.fail(f"unknown section id {section_id}", start)
            length = top.u32()
            body = top.pos
            if length > size - body:
                top.fail(
                    f"the {name} section declares {length} bytes, but only {size - body} remain",
                    start,
                )
            if section_id:
                rank = _SECTION_RANK[section_id]
                if rank <= last_rank:
                    top.fail(f"the {name} section comes after the {last_name} section", start)
                last_rank, last_name = rank, name
            handler = self.sections.get(section_id)
            if handler is not None:
                reader = _Reader(self.data, body, body + length, f"the {name} section")
                handler(reader)
                if reader.pos != reader.end:
                    left = reader.end - reader.pos
                    reader.fail(f"{left} unexpected bytes at the end of the {name} section")
            elif section_id == _CODE_SECTION:
                self.code_bytes = length  # skipped, like every section not read, by its size
            top.pos = body + length
        return WasmInfo(
            imports=tuple(self.imports),
            exports=tuple(self.exports),
            initial_memory_bytes=self.memory_bytes[0] if self.memory_bytes else None,
            functions=self.defined_functions,
            code_bytes=self.code_bytes,
        )

    def type_section(self, r: _Reader) -> None:
        for _ in range(r.count("types")):
            start = r.pos
            form = r.byte()
            if form == _REC_GROUP:
                for _ in range(r.count("types in a recursion group")):
                    self.sub_type(r, r.byte(), r.pos - 1)
            else:
                self.sub_type(r, form, start)

    def sub_type(self, r: _Reader, form: int, start: int) -> None:
        if form in (_SUB_TYPE, _SUB_FINAL_TYPE):
            for _ in range(r.count("supertypes")):
                r.u32()
            start = r.pos
            form = r.byte()
        if form == _FUNC_TYPE:
            params = r.count("parameters")
            for _ in range(params):
                r.value_type()
            results = r.count("results")
            for _ in range(results):
                r.value_type()
            self.types.append((params, results))
            return
        if form == _STRUCT_TYPE:
            for _ in range(r.count("fields")):
                self.field_type(r)
        elif form == _ARRAY_TYPE:
            self.field_type(r)
        else:
            r.fail(f"unknown type form 0x{form:02x}", start)
        self.types.append(None)

    @staticmethod
    def field_type(r: _Reader) -> None:
        r.value_type()  # packed i8/i16 share the one-byte encoding
        start = r.pos
        if r.byte() > 1:
            r.fail("a field's mutability is neither 0 nor 1", start)

    def import_section(self, r: _Reader) -> None:
        for _ in range(r.count("imports")):
            module = r.name()
            name = r.name()
            start = r.pos
            kind = r.byte()
            if kind == _FUNC:
                self.func_types.append(r.u32())
            elif kind == _TABLE:
                r.value_type()
                r.limits()
            elif kind == _MEMORY:
                minimum, page_size = r.limits()
                self.memory_bytes.append(minimum * page_size)
            elif kind == _GLOBAL:
                r.value_type()
                r.byte()  # mutability
            elif kind == _TAG:
                r.byte()  # attribute: 0 = exception
                r.u32()
            else:
                r.fail(f"unknown import kind 0x{kind:02x} for {module}.{name}", start)
            self.imports.append(Import(module, name, _EXTERN_KINDS[kind]))

    def function_section(self, r: _Reader) -> None:
        n = r.count("functions")
        self.defined_functions = n
        if n == r.end - r.pos:
            # Every type index is one byte (fewer than 128 types, the usual case): keep the
            # bytes as they are. A list of 200,000 ints cost ~5 ms of the GIL per look at an
            # upload, time the event loop waited for.
            indices = bytes(r.data[r.pos : r.end])
            if indices.isascii():  # every byte < 0x80: each is a whole LEB128
                self.defined_types = indices
                r.pos = r.end
                return
        self.defined_types = r.u32_vector(n)

    def memory_section(self, r: _Reader) -> None:
        for _ in range(r.count("memories")):
            minimum, page_size = r.limits()
            self.memory_bytes.append(minimum * page_size)

    def export_section(self, r: _Reader) -> None:
        for _ in range(r.count("exports")):
            name = r.name()
            start = r.pos
            kind = r.byte()
            if kind >= len(_EXTERN_KINDS):
                r.fail(f"unknown export kind 0x{kind:02x} for {name!r}", start)
            index = r.u32()
            if kind != _FUNC:
                self.exports.append(Export(name, _EXTERN_KINDS[kind]))
                continue
            imported = len(self.func_types)
            if index >= imported + len(self.defined_types):
                r.fail(f"export {name!r} names function {index}, which does not exist", start)
            type_index = (
                self.func_types[index] if index < imported else self.defined_types[index - imported]
            )
            signature = self.types[type_index] if type_index < len(self.types) else None
            if signature is None:
                r.fail(f"function {index} (export {name!r}) has no function type", start)
            self.exports.append(Export(name, "func", *signature))
