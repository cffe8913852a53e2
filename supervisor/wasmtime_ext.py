"""The per-request wasmtime path, driven through wasmtime-py's private C bindings.

Why not the public API: measured in the server (2 threads on one core), a trivial guest cost
~325 µs per request through wasmtime-py's classes against ~140 µs for the same calls in a
loop. Every ctypes call through wasmtime-py's `CDLL` releases the GIL, and with the event
loop waiting for it each release hands the GIL over: ~30 handoffs per request. Here the short
C calls go through a `PyDLL` handle of the same library, which keeps the GIL, and only the
two calls that run guest code (instantiation, which may run a start function, and the call
itself) release it.

Host functions are defined with `wasmtime_linker_define_func_unchecked` and a callback of our
own: no `Caller`/`Val` objects per call, and no trip through wasmtime-py's trampoline, whose
module-level "last exception" can hand one thread's error to another thread's trap (FACTS.md).
Callbacks must never raise; they return a WASI errno.

Everything private to wasmtime-py lives in this module. `tests/test_wasmtime_ext.py` fails
loudly if a wasmtime upgrade moves any of it.
"""

from __future__ import annotations

import ctypes
import itertools
import struct
from collections.abc import Callable, Collection, Mapping, Sequence

import wasmtime
from wasmtime import _bindings as raw
from wasmtime import _ffi as ffi

# The same shared library, opened again through PyDLL: calls keep the GIL (see module doc).
_held = ctypes.PyDLL(ffi.dll._name)


def _bind(dll: ctypes.CDLL, name: str) -> ctypes._CFuncPtr:
    """`name` from libwasmtime with wasmtime-py's signature, every pointer in it a `c_void_p`.

    Addresses cross as plain ints (or `byref`/bytes, which `c_void_p` takes as they are): no
    ctypes pointer object is built or type-checked per argument or result. For the ~20 calls
    of a demo hello request that was ~4 µs of its ~32.
    """
    binding = getattr(raw, f"_{name}")
    function = dll[name]  # a new function object: getattr would share (and cache) one
    function.argtypes = [_raw(kind) for kind in binding.argtypes]
    function.restype = _raw(binding.restype)
    return function


def _raw(kind: type | None) -> type | None:
    """Data and function pointers become `c_void_p`; other types stay."""
    pointer = kind is not None and issubclass(kind, (ctypes._Pointer, ctypes._CFuncPtr))
    return ctypes.c_void_p if pointer else kind


def _hold(name: str) -> ctypes._CFuncPtr:
    """`name`, called without releasing the GIL (for short calls only)."""
    return _bind(_held, name)


_store_new = _hold("wasmtime_store_new")
_store_context = _hold("wasmtime_store_context")
_store_delete = _hold("wasmtime_store_delete")
_store_limiter = _hold("wasmtime_store_limiter")
_set_fuel = _hold("wasmtime_context_set_fuel")
_get_fuel = _hold("wasmtime_context_get_fuel")
_set_epoch_deadline = _hold("wasmtime_context_set_epoch_deadline")
_set_wasi = _hold("wasmtime_context_set_wasi")
_wasi_config_new = _hold("wasi_config_new")
_wasi_set_argv = _hold("wasi_config_set_argv")
_wasi_set_env = _hold("wasi_config_set_env")
_wasi_set_stdin_bytes = _hold("wasi_config_set_stdin_bytes")
_wasi_preopen_dir = _hold("wasi_config_preopen_dir")
_byte_vec_new = _hold("wasm_byte_vec_new")
_export_get = _hold("wasmtime_instance_export_get")
_caller_export_get = _hold("wasmtime_caller_export_get")
_caller_context = _hold("wasmtime_caller_context")
_memory_data = _hold("wasmtime_memory_data")
_memory_data_size = _hold("wasmtime_memory_data_size")
_error_delete = _hold("wasmtime_error_delete")
_define_unchecked = _hold("wasmtime_linker_define_func_unchecked")
# These two run guest code, which may take long: they release the GIL (wasmtime-py's CDLL).
_instantiate_pre = _bind(ffi.dll, "wasmtime_instance_pre_instantiate")
_func_call = _bind(ffi.dll, "wasmtime_func_call")

# glibc (the image is Debian): splits a buffer of NUL-separated strings into a pointer table.
try:
    _argz_extract = ctypes.PyDLL(None).argz_extract
except AttributeError:
    raise ImportError("wasm-supervisor needs Linux with glibc (it calls argz_extract)") from None
_argz_extract.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
_argz_extract.restype = None
_POINTER_SIZE = ctypes.sizeof(ctypes.c_void_p)

_TRAP_POINTER = ctypes.POINTER(ffi.wasm_trap_t)
_ERROR_POINTER = ctypes.POINTER(ffi.wasmtime_error_t)
_EXTERN_OF = ffi.wasmtime_extern_t.of.offset
_EXTERN_FUNC = ffi.WASMTIME_EXTERN_FUNC.value
_EXTERN_MEMORY = ffi.WASMTIME_EXTERN_MEMORY.value
_MEMORY_NAME = b"memory"
_NO_MEMORY = (ctypes.c_char * 0)()

HostCallback = Callable[[int, Sequence[int]], int]
"""(caller pointer as int, i32 arguments) -> i32 result. Must never raise."""

# ctypes callback objects must outlive the linker that calls them.
_callbacks: list[object] = []


class NoSuchFunction(Exception):
    """The instance exports no function of that name."""


def _string_arrays(*lists: Collection[str]) -> tuple[object, list[int]]:
    """C arrays of NUL-terminated UTF-8 strings: (what must stay alive, each array's address).

    One encode of the joined strings and one call to glibc's `argz_extract` to fill the table
    of addresses: ~2.3 µs for a request's ~47 strings, against ~8 µs encoding and indexing
    each string in Python. A string holding a NUL ends there, as a C string must.
    """
    items = list(itertools.chain.from_iterable(lists))
    text = "\0".join(items)
    if text.count("\0") >= len(items):  # a NUL inside a string: cut that string there
        text = "\0".join([item.partition("\0")[0] for item in items])
    blob = text.encode()
    table = (ctypes.c_void_p * (len(items) + 1))()  # argz_extract ends it with a NULL
    _argz_extract(blob, len(blob) + 1 if items else 0, table)  # bytes end in a NUL
    address = ctypes.addressof(table)
    arrays = []
    for strings in lists:
        arrays.append(address)
        address += _POINTER_SIZE * len(strings)
    return (blob, table), arrays


def _check(error: int | None) -> None:
    if error:
        raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, _ERROR_POINTER))


class VolumeUnavailable(wasmtime.WasmtimeError):
    """A volume's folder could not be opened. The message names the guest path only: the
    host folder (`host_dir`) is for the log, never for a client."""

    def __init__(self, host_dir: bytes, guest_path: bytes) -> None:
        super().__init__(f"cannot open the volume at {guest_path.decode(errors='replace')}")
        self.host_dir = host_dir


class GuestStore:
    """One request's store: created, configured, run and deleted through the C API.

    Not thread-safe (a store never is); `close` must be called (the run does it in `finally`).
    """

    __slots__ = ("_context", "_instance", "_store")

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._store = _store_new(engine.ptr(), None, None)
        self._context = _store_context(self._store)
        self._instance: ffi.wasmtime_instance_t | None = None

    def close(self) -> None:
        if self._store:
            _store_delete(self._store)
            self._store = None

    def set_limits(self, *, fuel: int, epoch_ticks: int, memory_bytes: int) -> None:
        _check(_set_fuel(self._context, fuel))
        _set_epoch_deadline(self._context, epoch_ticks)
        _store_limiter(self._store, memory_bytes, -1, -1, -1, -1)

    def fuel_left(self) -> int:
        fuel = ctypes.c_uint64()
        _check(_get_fuel(self._context, ctypes.byref(fuel)))
        return fuel.value

    def set_wasi(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        stdin: bytes,
        preopens: Sequence[tuple[bytes, bytes]],
    ) -> None:
        """argv, environment, stdin (as bytes, no temp file) and read-only preopens."""
        config = _wasi_config_new()
        try:
            alive, (argv_array, names_array, values_array) = _string_arrays(argv, env, env.values())
            _wasi_set_argv(config, len(argv), argv_array)
            _wasi_set_env(config, len(env), names_array, values_array)
            del alive  # wasmtime has copied the strings
            if stdin:
                vec = ffi.wasm_byte_vec_t()
                _byte_vec_new(ctypes.byref(vec), len(stdin), stdin)
                _wasi_set_stdin_bytes(config, ctypes.byref(vec))  # takes the vector's buffer
            for host_dir, guest_path in preopens:
                if not _wasi_preopen_dir(config, host_dir, guest_path, False):
                    raise VolumeUnavailable(host_dir, guest_path)
        finally:
            # set_wasi takes ownership of the config, even on error.
            _check(_set_wasi(self._context, config))

    def instantiate(self, instance_pre: wasmtime.InstancePre) -> Exception | None:
        """Instantiate (which may run a start function); return how it failed, or None."""
        instance = ffi.wasmtime_instance_t()
        trap = ctypes.c_void_p()
        error = _instantiate_pre(
            instance_pre.ptr(), self._context, ctypes.byref(instance), ctypes.byref(trap)
        )
        failure = _failure(error, trap.value)
        if failure is None:
            self._instance = instance
        return failure

    def call(self, name: bytes) -> Exception | None:
        """Call an exported `() -> ()` function; return how it failed (a Trap, an ExitTrap, a
        WasmtimeError or NoSuchFunction), or None."""
        item = ffi.wasmtime_extern_t()
        found = _export_get(
            self._context, ctypes.byref(self._instance), name, len(name), ctypes.byref(item)
        )
        if not found or item.kind != _EXTERN_FUNC:
            return NoSuchFunction(name.decode(errors="replace"))
        trap = ctypes.c_void_p()
        function = ctypes.addressof(item) + _EXTERN_OF
        error = _func_call(self._context, function, None, 0, None, 0, ctypes.byref(trap))
        return _failure(error, trap.value)

    def memory_size(self) -> int:
        """Bytes of the exported `memory` (0 without one): the run's high-water mark."""
        if self._instance is None:
            return 0
        item = ffi.wasmtime_extern_t()
        found = _export_get(
            self._context,
            ctypes.byref(self._instance),
            _MEMORY_NAME,
            len(_MEMORY_NAME),
            ctypes.byref(item),
        )
        if not found or item.kind != _EXTERN_MEMORY:
            return 0
        return _memory_data_size(self._context, ctypes.addressof(item) + _EXTERN_OF)


def _failure(error: int | None, trap: int | None) -> Exception | None:
    if error:  # an ExitTrap for proc_exit
        return wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, _ERROR_POINTER))
    if trap:
        return wasmtime.Trap._from_ptr(ctypes.cast(trap, _TRAP_POINTER))
    return None


def caller_memory(caller: int) -> ctypes.Array:
    """The calling instance's `memory` as a writable byte array (empty without one).

    Valid until the host call returns. Callbacks bounds-check against its `len`, then read
    and write it with slicing and `struct.unpack_from`/`pack_into`: no ctypes call per access
    (`string_at`/`memmove` cost 0.3 to 0.9 µs each). ctypes caches one array type per size:
    sizes are whole pages, so at most one per page count a guest ever reaches.
    """
    item = ffi.wasmtime_extern_t()
    if not _caller_export_get(caller, _MEMORY_NAME, len(_MEMORY_NAME), ctypes.byref(item)):
        return _NO_MEMORY
    if item.kind != _EXTERN_MEMORY:
        return _NO_MEMORY
    context = _caller_context(caller)
    memory = ctypes.addressof(item) + _EXTERN_OF
    size = _memory_data_size(context, memory)
    if not size:
        return _NO_MEMORY
    return (ctypes.c_char * size).from_address(_memory_data(context, memory))


def fuel_left(caller: int) -> int:
    """The calling guest's fuel: what a host function may charge its work against."""
    fuel = ctypes.c_uint64()
    error = _get_fuel(_caller_context(caller), ctypes.byref(fuel))
    if error:  # only when fuel is off, which the engine never is: nothing left to charge
        _error_delete(error)
        return 0
    return fuel.value


def set_fuel_left(caller: int, units: int) -> None:
    """Leave the calling guest `units` of fuel (0: it traps, out of fuel, once it resumes)."""
    error = _set_fuel(_caller_context(caller), units)
    if error:
        _error_delete(error)


def stop_guest(caller: int) -> None:
    """Make the running guest trap (out of fuel) as soon as the current host call returns.

    Host functions must never raise, so this is how one ends a guest: it records why on the
    request's own state, then empties the fuel tank.
    """
    set_fuel_left(caller, 0)


_UNCHECKED_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t
)
"""wasmtime_func_unchecked_callback_t with raw addresses: no ctypes objects per call."""
_VAL_RAW_SIZE = ctypes.sizeof(ffi.wasmtime_val_raw_t)


def define_host_function(
    linker: wasmtime.Linker, module: str, name: str, params: int, callback: HostCallback
) -> None:
    """Define `module.name` as `(i32 x params) -> i32` calling `callback` (never raises).

    Arguments arrive as the i32 slots of `wasmtime_val_raw_t`s (read as unsigned: WASI
    pointers and sizes), the result goes back in the first slot.
    """
    i32 = wasmtime.ValType.i32()
    functype = wasmtime.FuncType([i32] * params, [i32])
    layout = struct.Struct("<" + f"I{_VAL_RAW_SIZE - 4}x" * params)
    values_type = ctypes.c_char * layout.size
    result_type = ctypes.c_int32

    def trampoline(_env: int, caller: int, values: int, _count: int) -> int:
        # Views on the values in place, not `string_at`/`memmove` calls: ~0.7 µs less a call.
        result = callback(caller, layout.unpack_from(values_type.from_address(values)))
        result_type.from_address(values).value = result
        return 0  # no trap

    c_callback = _UNCHECKED_CALLBACK(trampoline)
    _callbacks.append(c_callback)
    module_bytes, name_bytes = module.encode(), name.encode()
    _check(
        _define_unchecked(
            linker.ptr(),
            module_bytes,
            len(module_bytes),
            name_bytes,
            len(name_bytes),
            functype.ptr(),
            c_callback,
            None,
            None,
        )
    )


def enable_pooling_allocator(
    config: wasmtime.Config, *, instances: int, max_memory_bytes: int
) -> None:
    """Preallocate instance slots: no mmap/munmap per request.

    `instances` bounds the stores alive at once (instantiation fails past it), and every
    guest memory must fit in `max_memory_bytes`.
    """
    pool = ffi.wasmtime_pooling_allocation_config_new()
    try:
        ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pool, instances)
        ffi.wasmtime_pooling_allocation_config_total_memories_set(pool, instances)
        ffi.wasmtime_pooling_allocation_config_total_tables_set(pool, instances)
        ffi.wasmtime_pooling_allocation_config_total_stacks_set(pool, instances)
        ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pool, max_memory_bytes)
        ffi.wasmtime_pooling_allocation_config_max_core_instance_size_set(pool, 16 << 20)
        ffi.wasmtime_pooling_allocation_config_table_elements_set(pool, 1 << 20)
        ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(pool, 1 << 20)
        ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(pool, 64 << 10)
        ffi.wasmtime_pooling_allocation_strategy_set(config.ptr(), pool)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pool)
