"""Causal decode attention on XLA CPU over the live slots of a KV cache:

    decode_attention(q [B, N, H], k, v [B, K, S, H], q_pos [B], live [B], window) -> [B, N, H]   (fp32)

One new query per row, already written into the cache at slot `q_pos` (slot = position). XLA's
jnp attention over a cache reads all S slots, live or not, and at 16 rows that was about 40% of a
SmolLM2 decode step; `decode_attention.cc` reads each (row, kv head)'s visible slots once for the
G query heads that share them (`pdx.kernels_cpu.library`). `reference` is the jnp spec."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pdx.errors import InvalidInputError
from pdx.kernels_cpu import library

TARGET = "pdx_decode_attention"


def applies(q: jax.Array, k: jax.Array) -> bool:
    """Whether a causal decode step `q [B, 1, N, H]` over the cache `k [B, K, S, H]` should run here:
    CPU, fp32, one query per row, H a whole number of SIMD registers, and the library available."""
    return (jax.default_backend() == "cpu" and q.ndim == 4 and q.shape[1] == 1 and q.dtype == jnp.float32
            and k.dtype == jnp.float32 and q.shape[-1] % 16 == 0 and library.available())


def decode_attention(q, k, v, q_pos, live, window) -> jax.Array:
    """Row b's query at `q_pos[b]` over slots s < `live[b]` with s <= q_pos[b] (and q_pos - s < window
    where `window` > 0). q [B, N, H], k, v [B, K, S, H] fp32; q_pos, live [B] int32 -> [B, N, H] fp32."""
    b, n, h = q.shape
    if (q.dtype, k.dtype, v.dtype) != (jnp.float32,) * 3 or k.ndim != 4 or k.shape != v.shape \
            or k.shape[0] != b or k.shape[3] != h or n % k.shape[1] or h % 16 or q_pos.shape != (b,) \
            or live.shape != (b,):
        raise InvalidInputError(f"decode_attention takes q [B, N, H], k, v [B, K, S, H] fp32 (H % 16 == 0) and "
                                f"q_pos, live [B]; got q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, v {v.shape}, "
                                f"q_pos {q_pos.shape}, live {live.shape}")
    if not library.available():
        raise InvalidInputError(f"pdx's CPU decode attention is unavailable: {library.reason()}")
    window = jnp.asarray(window, jnp.int32).reshape(())
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k, v, q_pos.astype(jnp.int32), live.astype(jnp.int32), window)


def reference(q, k, v, q_pos, live, window) -> jax.Array:
    """What `decode_attention` computes, in jnp (a row that sees no slot gives zeros)."""
    b, n, h = q.shape
    kv = k.shape[1]
    slot = jnp.arange(k.shape[2])[None]  # [1, S]
    window = jnp.asarray(window)
    seen = (slot < live[:, None]) & (slot <= q_pos[:, None]) & ((window <= 0) | (q_pos[:, None] - slot < window))
    qg = q.reshape(b, kv, n // kv, h) / math.sqrt(h)
    s = jnp.where(seen[:, None, None], jnp.einsum("bkgh,bksh->bkgs", qg, k), -jnp.inf)
    p = jnp.where(seen[:, None, None], jax.nn.softmax(s, axis=-1), 0.0)  # a row that sees nothing: NaN -> 0
    return jnp.einsum("bkgs,bksh->bkgh", p, v).reshape(b, n, h)
