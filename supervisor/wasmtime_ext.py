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
