"""The attention entry point of the models: new tokens, optionally after a KV cache, via the kernels.

Keys come in two segments that share one softmax: the cache (slot s holds position s, valid iff
`s < lengths[b]`) and the T new tokens (at `q_pos`, valid where `valid`). The reference path is the
models' original code (`masks.visibility` + `gqa.attention` over the two segments). The Pallas
path runs flash attention over the new tokens and decode attention (few rows) or flash attention
(many rows) over the cache, each returning its softmax partial, and merges them by log-sum-exp,
so the cache is never copied to concatenate it with the new keys. On CPU causal queries over a
cache that holds them (decode steps, prefill chunks) run `pdx.kernels_cpu.cached_attention` (each
query's visible slots only) where that library is available.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdx import masks
from pdx.errors import require
from pdx.kernels_cpu import cached_attention as cpu_attention
from pdx.kernels_pallas import _core, decode_attention, flash_attention, gqa
from pdx.masks import MaskMode


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    valid: jax.Array,
    mode: MaskMode,
    window: jax.Array | int,
    cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    *,
    cache_visible: jax.Array | None = None,
    new_in_cache: bool = False,
    new_mask: jax.Array | None = None,
    rows: jax.Array | None = None,
    impl: str | None = None,
) -> jax.Array:
    """`q [B, T, N, H]` over new keys `k, v [B, K, T, H]` and an optional `cache = (k, v [B, K, S, H],
    lengths [B])` -> `[B, T, N, H]`. `cache_visible [B, S]` overrides `slot < lengths` as the set of
    cached slots that may be attended (dLLM dual cache). `new_in_cache`: the caller already wrote
    the new keys into the cache at slots `lengths[b] + t` (`valid` a per-row prefix, slot = position),
    so one pass over the cache's first `lengths + valid.sum(-1)` slots covers both segments with no
    merge (not with `new_mask`). `new_mask [B, T, T]` (optional) is ANDed with the visibility among
    the new tokens (speculative tree verify: a node sees only its ancestors). `rows [T]` (with
    `new_in_cache`, causal, B = 1): packed queries, token t of cache row `rows[t]` (out of range:
    padding, zeros) at slot `q_pos[0, t]`, seeing that row's slots up to its own. `impl` as in
    `_core.resolve` (None: the module setting)."""
    path, interpret = _core.resolve(impl, q)
    if rows is not None:
        require(new_in_cache and mode.kind == "causal" and q.shape[0] == 1,
                "packed rows take causal queries of one sequence already written into the cache")
        return _attend_packed(q, cache, q_pos[0], valid[0], rows, window, path)
    if new_in_cache:
        require(new_mask is None, "new_in_cache cannot take a new_mask (tree nodes' positions are not their slots)")
        ck, cv, lengths = cache
        live = lengths + valid.sum(-1, dtype=lengths.dtype)
        if path == "reference" and mode.kind == "causal" and cpu_attention.applies(q, ck):
            # decode steps and prefill chunks on CPU: XLA ran a 128-token chunk's small score tiles at
            # ~40 GFLOP/s (SmolLM2: 15% of a one-prompt prefill, 25% of a 16-prompt one)
            b, t, n, h = q.shape
            rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t)).reshape(-1)
            out = cpu_attention.cached_attention(q.reshape(b * t, n, h), ck, cv, rows, q_pos.reshape(-1), live, window)
            return out.reshape(b, t, n, h)
        if path == "reference" and q.shape[1] > 1:  # prefill chunks, verify steps: the live blocks only
            return gqa.attention_live(q, ck, cv, q_pos, live, mode, window)  # (one decode row: a loop costs more)
        slot_pos, slot_valid = decode_attention.slots(live, ck.shape[2])
        if path == "reference":
            return gqa.attention(q, [(ck, cv, masks.visibility(q_pos, slot_pos, slot_valid, mode, window))])
        out = flash_attention.pallas(q, ck, cv, q_pos, slot_pos, slot_valid, mode, window, interpret=interpret)
        return out.astype(q.dtype)
    if path == "reference":
        visible = masks.visibility(q_pos, q_pos, valid, mode, window)  # [B, T, T]
        segments = [(k, v, visible if new_mask is None else visible & new_mask)]
        if cache is not None:
            ck, cv, lengths = cache
            slot_pos, slot_valid = decode_attention.slots(lengths, ck.shape[2])
            slot_valid = slot_valid if cache_visible is None else cache_visible
            segments.insert(0, (ck, cv, masks.visibility(q_pos, slot_pos, slot_valid, mode, window)))
        return gqa.attention(q, segments)
    out, lse = flash_attention.pallas(q, k, v, q_pos, q_pos, valid, mode, window, mask=new_mask, return_lse=True,
                                      interpret=interpret)
    if cache is None:
        return out
    ck, cv, lengths = cache
    t, n = q.shape[1], q.shape[2]
    if cache_visible is None and (n // ck.shape[1]) * t <= decode_attention.MAX_ROWS:
        cached = decode_attention.pallas(q, ck, cv, q_pos, lengths, mode, window, return_lse=True,
                                         interpret=interpret)
    else:
        slot_pos, slot_valid = decode_attention.slots(lengths, ck.shape[2])
        slot_valid = slot_valid if cache_visible is None else cache_visible
        cached = flash_attention.pallas(q, ck, cv, q_pos, slot_pos, slot_valid, mode, window, return_lse=True,
                                        interpret=interpret)
    o, _ = _core.merge(jnp.stack([cached[0], out]), jnp.stack([cached[1], lse]), axis=0)
    return o.astype(q.dtype)


def packed_is_fast(head_dim: int) -> bool:
    """Whether packed fp32 queries (`attend(..., rows=...)`) over an fp32 cache run a kernel here
    rather than the jnp spec, which gathers every query's cache row (prefill packing pays only with
    the kernel)."""
    q = jax.ShapeDtypeStruct((1, 1, 1, head_dim), jnp.float32)
    return _core.resolve(None, q)[0] == "reference" and cpu_attention.applies(q, q)


def _attend_packed(q, cache, q_pos, valid, rows, window, path):
    """`attend` of packed queries `q [1, T, N, H]`: each over its own cache row (see `attend`)."""
    ck, cv, lengths = cache
    live = lengths.at[rows].max(jnp.where(valid, q_pos + 1, 0), mode="drop")  # [B]: the rows after the writes
    args = (q[0], ck, cv, rows, q_pos, live, window)
    if path == "reference" and cpu_attention.applies(q, ck):
        return cpu_attention.cached_attention(*args)[None].astype(q.dtype)
    return cpu_attention.reference(*args)[None].astype(q.dtype)
