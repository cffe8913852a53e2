"""The private wasmtime-py bindings this project relies on, and nothing else.

wasmtime-py's public API lacks two things the request path needs: handing stdin to WASI as
bytes (the public route is a file path) and changing a store's fuel from inside a host call
(`Caller` has no `set_fuel`). Both are one C call, bound in `wasmtime._ffi`. Keeping them here
means a wasmtime upgrade that moves them breaks one module, and `tests/test_wasmtime_ext.py`
says so loudly.
"""

from __future__ import annotations

import ctypes

import wasmtime
from wasmtime import _ffi as ffi


def set_stdin_bytes(config: wasmtime.WasiConfig, data: bytes) -> None:
    """Give the guest `data` as its whole stdin, without a temporary file."""
    vec = ffi.wasm_byte_vec_t()
    source = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ffi.wasm_byte_t))
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), source)  # copies `data`
    # wasmtime takes ownership of the vector's buffer.
    ffi.wasi_config_set_stdin_bytes(config.ptr(), ctypes.byref(vec))


def stop_guest(caller: wasmtime.Caller) -> None:
    """Make the running guest trap (out of fuel) as soon as the current host call returns.

    Host functions must never raise (FACTS.md: the exception leaks into another thread's
    trap), so this is how a host function ends a guest: it records why on the request's own
    state, then empties the fuel tank.
    """
    ffi.wasmtime_context_set_fuel(caller._context(), 0)


def memory_span(caller: wasmtime.Caller, memory: wasmtime.Memory) -> tuple[int, int]:
    """The guest memory's base address and length, valid until the host call returns.

    Reads and writes go through `ctypes.string_at` / `ctypes.memmove` after a bounds check
    against the length: cheaper than building a ctypes array type per call.
    """
    length = memory.data_len(caller)
    address = ctypes.cast(memory.data_ptr(caller), ctypes.c_void_p).value or 0
    return address, length


_CHAR_ARRAY = ctypes.POINTER(ctypes.POINTER(ctypes.c_char))


def _chars(data: bytes) -> ctypes._Pointer:
    return ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_char))


_MEMORY_NAME = ctypes.create_string_buffer(b"memory")
_EXTERN_FUNC = ffi.WASMTIME_EXTERN_FUNC.value
_EXTERN_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value


def set_argv_env(
    config: wasmtime.WasiConfig, argv: list[bytes], names: list[bytes], values: list[bytes]
) -> None:
    """argv and environment in one array each: the public setters re-encode string by string."""
    pointer = config.ptr()
    ffi.wasi_config_set_argv(
        pointer, len(argv), ctypes.cast((ctypes.c_char_p * len(argv))(*argv), _CHAR_ARRAY)
    )
    count = len(names)
    ffi.wasi_config_set_env(
        pointer,
        count,
        ctypes.cast((ctypes.c_char_p * count)(*names), _CHAR_ARRAY),
        ctypes.cast((ctypes.c_char_p * count)(*values), _CHAR_ARRAY),
    )


class NoSuchFunction(Exception):
    """The instance exports no function of that name."""


def call_export(
    store: wasmtime.Store, instance: wasmtime.Instance, name: bytes
) -> Exception | None:
    """Call an exported `() -> ()` function; return how it failed (Trap, ExitTrap,
    WasmtimeError, NoSuchFunction) or None.

    The public path builds every export of the instance and looks up the function's type on
    each call. It also re-raises wasmtime-py's module-level "last host exception", which can
    belong to another thread's request; our host functions never raise, so we skip it.
    """
    context = store._context()
    item = ffi.wasmtime_extern_t()
    found = ffi.wasmtime_instance_export_get(
        context, ctypes.byref(instance._instance), _chars(name), len(name), ctypes.byref(item)
    )
    if not found or item.kind != _EXTERN_FUNC:
        return NoSuchFunction(name.decode(errors="replace"))
    trap = ctypes.POINTER(ffi.wasm_trap_t)()
    error = ffi.wasmtime_func_call(
        context, ctypes.byref(item.of.func), None, 0, None, 0, ctypes.byref(trap)
    )
    if error:
        return wasmtime.WasmtimeError._from_ptr(error)
    if trap:
        return wasmtime.Trap._from_ptr(trap)
    return None


def memory_size(store: wasmtime.Store, instance: wasmtime.Instance) -> int:
    """Bytes of the instance's exported `memory` (0 without one): its high-water mark."""
    context = store._context()
    item = ffi.wasmtime_extern_t()
    found = ffi.wasmtime_instance_export_get(
        context, ctypes.byref(instance._instance), _MEMORY_NAME, 6, ctypes.byref(item)
    )
    if not found or item.kind != _EXTERN_MEMORY:
        return 0
    return ffi.wasmtime_memory_data_size(context, ctypes.byref(item.of.memory))
