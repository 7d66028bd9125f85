"""Pallas kernels with their jnp references; `use_impl` / `set_impl` force the attention path.

Modules: `flash_attention` (prefill / verify), `decode_attention` (few queries over a KV cache),
`attend` (the models' entry point), `block_mask` (tile maps and skip ratios).
"""

from pdx.kernels_pallas._core import get_impl, set_impl, use_impl

__all__ = ["get_impl", "set_impl", "use_impl"]
