"""Modules pulled from OCI registries: `oci:` references in modules.toml and in `upload`.

reference.py parses a reference; auth.py finds credentials and answers a registry's 401;
client.py pulls one wasm module over the distribution API and verifies it; cache.py keeps
what was pulled on the pod's disk by digest and pins tags for the tenant registry.
"""

from .cache import PulledModules
from .client import PLAIN_HTTP_REGISTRIES, PulledModule, PullError, RegistryClient
from .reference import (
    InvalidReference,
    Reference,
    check_registry_host,
    is_reference,
    parse_reference,
)

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
