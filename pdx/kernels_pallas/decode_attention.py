"""Decode attention: a few query positions (1..K+1) over a KV cache with per-row lengths.

Cache slot s holds position s and is valid iff `s < lengths[b]`; queries sit at `q_pos [B, T]`
(usually the newest positions, already written to the cache). Mask modes, sliding window and
sink tokens follow `pdx.models.masks.visibility`.

The Pallas path is flash-decoding: the G query heads that share a KV head and the T positions are
folded into G*T rows of one query block, so each KV block is read once per KV head; the cache
length is cut into `num_splits` splits that run in parallel, each giving a softmax partial, and
the partials are merged by log-sum-exp. Blocks past a row's length, or outside its window, are
skipped (no compute, no DMA), so a ragged batch costs what its rows hold, not `max_len`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdx import masks
from pdx.errors import require
from pdx.kernels_pallas import _core, flash_attention
from pdx.kernels_pallas.block_mask import block_map
from pdx.masks import MaskMode

MAX_ROWS = 512  # G * T query rows per KV head held in one block


def slots(lengths: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Slot positions and validity `[B, size]` of a cache with per-row `lengths [B]`."""
    pos = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (lengths.shape[0], size))
    return pos, pos < lengths[:, None]


def reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    lengths: jax.Array,
    mode: MaskMode = masks.CAUSAL,
    window: jax.Array | int = 0,
    sinks: jax.Array | int = 0,
    *,
    return_lse: bool = False,
):
    """`q [B, T, N, H]` over the cache `k, v [B, K, S, H]` -> `[B, T, N, H]` (and lse `[B, T, N]`)."""
    k_pos, k_valid = slots(lengths, k.shape[2])
    return flash_attention.reference(q, k, v, q_pos, k_pos, k_valid, mode, window, sinks, return_lse=return_lse)


def pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    lengths: jax.Array,
    mode: MaskMode = masks.CAUSAL,
    window: jax.Array | int = 0,
    sinks: jax.Array | int = 0,
    *,
    block_k: int = 128,
    num_splits: int = 4,
    return_lse: bool = False,
    interpret: bool = False,
    variant: str | None = None,
):
    """Same contract as `reference`, by the split-K Pallas kernel (forward only: decoding needs no grads).
    `variant`: kernel layout, 'tpu' or 'gpu' (default: the backend's)."""
    b, t, n, h, kv_heads, s = _core.check_qkv(q, k, v)
    _core.check_shape("q_pos", q_pos, (b, t))
    _core.check_shape("lengths", lengths, (b,))
    g = n // kv_heads
    require(g * t <= MAX_ROWS, f"decode attention folds G*T = {g * t} query rows per KV head, at most {MAX_ROWS}; "
                               "use flash_attention for long query blocks")
    require(num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")
    variant = _core.layout(variant)
    _core.check_blocks(16, block_k, interpret, variant)
    bk = _core.tile(s, block_k, variant)
    splits = min(num_splits, -(-s // bk))
    sp = _core.round_up(s, bk * splits)
    rows = _core.tile(g * t, MAX_ROWS, variant)  # all rows in one block
    # Fold: row r = g * T + t of KV head k holds query head k * G + g at position t.
    qf = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)
    qf = _core.pad_axis(qf, 2, rows)  # [B, K, R, H]
    row_pos = _core.pad_axis(jnp.tile(q_pos.astype(jnp.int32), (1, g)), 1, rows)  # [B, R]
    row_real = jnp.broadcast_to(jnp.arange(rows) < g * t, (b, rows))
    k_pos, k_valid = slots(lengths.astype(jnp.int32), sp)
    window, sinks = jnp.asarray(window, jnp.int32), jnp.asarray(sinks, jnp.int32)
    live = block_map(row_pos, row_real, k_pos, k_valid, mode, window, sinks, rows, bk)  # [B, 1, S/bk]
    o, lse = _core.blocked_attention(
        qf, _core.pad_axis(k, 2, sp), _core.pad_axis(v, 2, sp), row_pos, k_pos, k_valid, None, live, window, sinks,
        mode=mode, block_q=rows, block_k=bk, num_splits=splits, out_dtype=jnp.float32, interpret=interpret,
        variant=variant)
    o, lse = _core.merge(o, lse[..., 0], axis=2)  # [B, K, R, H], [B, K, R]
    unfold = lambda x: x[:, :, : g * t].reshape(b, kv_heads, g, t, *x.shape[3:]).transpose(  # noqa: E731
        0, 3, 1, 2, *range(4, x.ndim + 1)).reshape(b, t, n, *x.shape[3:])
    o = unfold(o).astype(q.dtype)
    return (o, unfold(lse)) if return_lse else o


def dispatch(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    lengths: jax.Array,
    mode: MaskMode = masks.CAUSAL,
    window: jax.Array | int = 0,
    sinks: jax.Array | int = 0,
    *,
    return_lse: bool = False,
    impl: str | None = None,
    block_k: int = 128,
    num_splits: int = 4,
):
    """`reference` or `pallas` by backend, or as forced by `impl` / `_core.set_impl` (see `_core.resolve`)."""
    path, interpret = _core.resolve(impl, q)
    args = (q, k, v, q_pos, lengths, mode, window, sinks)
    if path == "reference":
        return reference(*args, return_lse=return_lse)
    return pallas(*args, block_k=block_k, num_splits=num_splits, return_lse=return_lse, interpret=interpret)
