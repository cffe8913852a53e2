"""Modules pulled from OCI registries: `oci:` references in modules.toml and in `upload`.

reference.py parses a reference; auth.py finds credentials and answers a registry's 401;
client.py pulls one wasm module over the distribution API and verifies it; cache.py keeps
what was pulled on the pod's disk by digest and pins tags for the tenant registry.
"""

import importlib

from .reference import (
    InvalidReference,
    Reference,
    check_registry_host,
    is_reference,
    parse_reference,
)

_LAZY = {
    "PulledModules": ".cache",
    "PLAIN_HTTP_REGISTRIES": ".client",
    "PulledModule": ".client",
    "PullError": ".client",
    "RegistryClient": ".client",
}
"""Imported on first use: the client needs httpx (~100 ms of imports), which a server whose
tenants name no `oci:` module never uses."""


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


__all__ = [
    "PLAIN_HTTP_REGISTRIES",
    "InvalidReference",
    "PullError",
    "PulledModule",
    "PulledModules",
    "Reference",
    "RegistryClient",
    "check_registry_host",
    "is_reference",
    "parse_reference",
]
