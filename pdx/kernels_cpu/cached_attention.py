"""Attention on XLA CPU over the live slots of a KV cache, for queries already written into it:

    cached_attention(q [P, N, H], k, v [B, K, S, H], rows [P], q_pos [P], live [B], window,
                     starts [P] = 0) -> [P, N, H]   (fp32)

Query p belongs to cache row `rows[p]` at position `q_pos[p]` (slot = position) and sees that row's
slots `starts[p] <= s <= q_pos[p]` below `live`: a decode step (one query per row), a prefill
chunk (T per row, flattened) or tokens of several rows packed into one sequence. XLA's jnp
attention over a cache reads all S slots, live or not (at 16 rows about 40% of a SmolLM2 decode
step), and runs a prefill chunk's small score tiles at a fraction of its GEMM speed;
`cached_attention.cc` reads each (query, kv head)'s visible slots once for the G query heads that
share them (`pdx.kernels_cpu.library`). `reference` is the jnp spec."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pdx.errors import InvalidInputError
from pdx.kernels_cpu import library

TARGET = "pdx_cached_attention"


def applies(q: jax.Array, k: jax.Array) -> bool:
    """Whether causal queries `q [..., N, H]` over the cache `k [B, K, S, H]` should run here: CPU,
    fp32, H a whole number of SIMD registers, and the library available."""
    return (jax.default_backend() == "cpu" and q.dtype == jnp.float32 and k.dtype == jnp.float32
            and q.shape[-1] % 16 == 0 and library.available())


def cached_attention(q, k, v, rows, q_pos, live, window, starts=None) -> jax.Array:
    """Query p (of row `rows[p]`, at `q_pos[p]`) over slots `starts[p] <= s < live[rows[p]]` with
    s <= q_pos[p] (and q_pos - s < window where `window` > 0); a query that sees nothing, or whose
    row is out of range, gives zeros. q [P, N, H], k, v [B, K, S, H] fp32; rows, q_pos, starts [P],
    live [B] int32 -> [P, N, H] fp32."""
    p, n, h = q.shape
    starts = jnp.zeros((p,), jnp.int32) if starts is None else starts
    if (q.dtype, k.dtype, v.dtype) != (jnp.float32,) * 3 or k.ndim != 4 or k.shape != v.shape \
            or k.shape[3] != h or n % k.shape[1] or h % 16 or rows.shape != (p,) or q_pos.shape != (p,) \
            or starts.shape != (p,) or live.shape != (k.shape[0],):
        raise InvalidInputError(f"cached_attention takes q [P, N, H], k, v [B, K, S, H] fp32 (H % 16 == 0), "
                                f"rows, q_pos, starts [P] and live [B]; got q {q.shape} {q.dtype}, k {k.shape} "
                                f"{k.dtype}, v {v.shape}, rows {rows.shape}, q_pos {q_pos.shape}, starts "
                                f"{starts.shape}, live {live.shape}")
    if not library.available():
        raise InvalidInputError(f"pdx's CPU cached attention is unavailable: {library.reason()}")
    window = jnp.asarray(window, jnp.int32).reshape(())
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    i32 = jnp.int32
    return call(q, k, v, rows.astype(i32), q_pos.astype(i32), starts.astype(i32), live.astype(i32), window)


def reference(q, k, v, rows, q_pos, live, window, starts=None) -> jax.Array:
    """What `cached_attention` computes, in jnp (gathers each query's row: a spec, not a fast path)."""
    p, n, h = q.shape
    b, kv, s_len, _ = k.shape
    starts = jnp.zeros((p,), jnp.int32) if starts is None else starts
    in_range = (rows >= 0) & (rows < b)
    r = jnp.clip(rows, 0, b - 1)
    slot = jnp.arange(s_len)[None]  # [1, S]
    window = jnp.asarray(window)
    seen = ((slot >= starts[:, None]) & (slot < live[r][:, None]) & (slot <= q_pos[:, None])
            & ((window <= 0) | (q_pos[:, None] - slot < window)) & in_range[:, None])  # [P, S]
    qg = q.reshape(p, kv, n // kv, h) / math.sqrt(h)
    s = jnp.where(seen[:, None, None], jnp.einsum("pkgh,pksh->pkgs", qg, k[r]), -jnp.inf)
    probs = jnp.where(seen[:, None, None], jax.nn.softmax(s, axis=-1), 0.0)  # a query that sees nothing: NaN -> 0
    return jnp.einsum("pkgs,pksh->pkgh", probs, v[r]).reshape(p, n, h)
