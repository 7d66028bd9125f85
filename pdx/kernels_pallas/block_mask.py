"""Block-level attention masks: which (query block, key block) tiles have any visible pair.

The Pallas kernels skip every tile this map marks empty (no compute; on TPU no DMA either, since the
key/value block index is held on the last needed block). The map is computed from per-block bounds
of the positions, so it costs O(T/bq * S/bk) instead of O(T * S); it may keep a tile that turns out to
be empty (window + sinks), never drops one that is not, and exact masking happens inside the tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdx.masks import MaskMode

_BIG = 2**29  # sentinel position bound for empty blocks (small enough that differences fit in int32)


def block_map(
    q_pos: jax.Array,
    q_real: jax.Array,
    k_pos: jax.Array,
    k_valid: jax.Array,
    mode: MaskMode,
    window: jax.Array | int,
    sinks: jax.Array | int,
    block_q: int,
    block_k: int,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Boolean `[B, T/bq, S/bk]`: may any query of block i see any key of block j?

    q_pos, q_real: [B, T] (q_real False for padding rows); k_pos, k_valid: [B, S]; T and S are
    multiples of the block sizes. `mask [B, T, S]` is an optional explicit mask (tree verify).
    """
    b, t = q_pos.shape
    s = k_pos.shape[1]
    qb, qr = q_pos.reshape(b, t // block_q, block_q), q_real.reshape(b, t // block_q, block_q)
    kb, kv = k_pos.reshape(b, s // block_k, block_k), k_valid.reshape(b, s // block_k, block_k)
    qmin = jnp.where(qr, qb, _BIG).min(-1)[:, :, None]  # [B, nq, 1]
    qmax = jnp.where(qr, qb, -_BIG).max(-1)[:, :, None]
    kmin = jnp.where(kv, kb, _BIG).min(-1)[:, None, :]  # [B, 1, nk]
    kmax = jnp.where(kv, kb, -_BIG).max(-1)[:, None, :]
    live = (qmax >= qmin) & (kmax >= kmin)
    if mode.kind == "causal":
        live &= kmin <= qmax
    elif mode.kind == "block_causal":
        live &= (kmin // mode.block_size) <= (qmax // mode.block_size)
    window = jnp.asarray(window)
    live &= (window <= 0) | (qmin - kmax < window) | (kmin < sinks)
    if mask is not None:
        live &= mask.reshape(b, t // block_q, block_q, s // block_k, block_k).any((2, 4))
    return live


def fetch_index(live: jax.Array) -> jax.Array:
    """Key block to fetch at each grid step `[B, nq, nk]` int32: j itself where live, else the last
    live block before j (or the first live one), so skipped steps repeat an index and cost no DMA."""
    j = jnp.arange(live.shape[-1], dtype=jnp.int32)
    last = jax.lax.cummax(jnp.where(live, j, -1), axis=live.ndim - 1)
    first = jnp.argmax(live, axis=-1).astype(jnp.int32)[..., None]
    return jnp.where(last >= 0, last, first)


def skip_stats(
    q_len: int,
    kv_len: int,
    mode: MaskMode,
    window: int = 0,
    sinks: int = 0,
    block_q: int = 128,
    block_k: int = 128,
    lengths: jax.Array | None = None,
) -> dict:
    """Fraction of tiles a kernel skips when `q_len` queries attend to `kv_len` keys.

    `lengths [B]` are per-row valid key counts (default all `kv_len`). Query i of row b sits at
    position `lengths[b] - q_len + i` (the row's newest tokens: a prefill, or a decode / verify step),
    key j at position j. Returns total/computed tiles and the skipped fraction.
    """
    lengths = jnp.asarray([kv_len] if lengths is None else lengths, jnp.int32)
    b = lengths.shape[0]
    tq, tk = -(-q_len // block_q) * block_q, -(-kv_len // block_k) * block_k
    q_pos = lengths[:, None] - q_len + jnp.arange(tq, dtype=jnp.int32)  # [B, Tq]
    k_pos = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk))
    q_real = jnp.arange(tq)[None] < q_len
    live = block_map(q_pos, jnp.broadcast_to(q_real, (b, tq)), k_pos, k_pos < lengths[:, None], mode, window,
                     sinks, block_q, block_k)
    total, computed = live.size, int(live.sum())
    return {"tiles": total, "computed": computed, "skipped_fraction": 1.0 - computed / total}
