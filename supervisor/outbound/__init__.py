"""Outbound HTTP for guests: WAGI's `wasi_experimental_http` ABI without its holes.

- `rules.py`: allow patterns and the SSRF guard (pure);
- `client.py`: per-tenant connection pools, limits, redirects checked hop by hop, the guard
  applied to the address actually connected to;
- `abi.py`: the five host functions over guest memory, with a per-request handle table.
"""
