"""wasm-supervisor: a multi-tenant host for WebAssembly (WAGI) HTTP handlers."""

__version__ = "0.1.0"
