"""Reference grouped-query attention over key segments (jnp): the spec the Pallas kernels are tested against."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from pdx.masks import NEG_INF


def attention(q: jax.Array, segments: list[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """Grouped-query attention of `q [B, T, N, H]` over one or more key/value segments.

    Each segment is `(k [B, K, S, H], v [B, K, S, H], visible [B, T, S])`. Scores of all segments
    share one softmax; keeping the cache and the new tokens as separate segments avoids copying
    the cache to concatenate them. Returns `[B, T, N, H]`.
    """
    b, t, n, h = q.shape
    kv_heads = segments[0][0].shape[1]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h) * (1.0 / math.sqrt(h))  # [B, T, K, G, H]
    scores = []
    for k, _, visible in segments:
        s = jnp.einsum("btkgh,bksh->bkgts", qg, k.astype(q.dtype)).astype(jnp.float32)  # [B, K, G, T, S]
        # A mask known at compile time (a fresh cache's first chunk sees none of its slots) let XLA
        # constant-fold the softmax max over [B, K, G, T, S]: 3.5 minutes per layer at 2048 rows. The
        # barrier keeps the mask a runtime value; it costs one [B, T, S] bool buffer.
        scores.append(jnp.where(lax.optimization_barrier(visible)[:, None, None], s, NEG_INF))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q.dtype)
    out, start = 0, 0
    for k, v, _ in segments:
        p = probs[..., start : start + k.shape[2]]
        # [B, K, G, T, H]: with the output in this order XLA CPU reads v in place; asking for
        # "btkgh" made it transpose every cached v (a whole-buffer copy per layer per step)
        out = out + jnp.einsum("bkgts,bksh->bkgth", p, v.astype(q.dtype))
        start += k.shape[2]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# Keys visited per step of `attention_live`: 64 slots read at most 63 dead ones per row and kept the
# loop's overhead (30 layers x live / 64 iterations per decode step) under a millisecond on SmolLM2.
LIVE_BLOCK = 64


def attention_live(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, lengths: jax.Array, mode,
                   window: jax.Array | int, block: int = LIVE_BLOCK) -> jax.Array:
    """`q [B, T, N, H]` over the first `lengths[b]` slots of `k, v [B, K, S, H]` (slot s holds position s),
    visiting only the `block`-slot blocks below `max(lengths)` with an online softmax: a decode step or
    prefill chunk reads the live context, not the whole cache (at 16 rows, half of SmolLM2's decode time
    went to attention over empty slots). Equals `attention` over all slots for every query that sees a
    key; a query that sees none gets a uniform mix of the visited slots. Returns `[B, T, N, H]`."""
    from pdx import masks

    b, t, n, h = q.shape
    kv_heads, size = k.shape[1], k.shape[2]
    g = n // kv_heads
    # At least one block per chunk of queries: a prefill chunk's T x 64 score tiles ran XLA CPU's
    # batched dot at a fifth of its GEMM speed (SmolLM2, 16 x 256 tokens: attention 30% of the pass).
    block = math.gcd(max(block, 1 << (t - 1).bit_length()), size)
    rows = g * t
    qg = (q.reshape(b, t, kv_heads, g, h) * (1.0 / math.sqrt(h))).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, rows, h)
    qg = qg.astype(jnp.float32)  # [B, K, G*T, H], row = g * T + t

    def visit(j, carry):
        m, total, acc = carry  # running max, softmax denominator [B, K, R]; output [B, K, R, H]
        start = j * block
        kb = lax.dynamic_slice_in_dim(k, start, block, axis=2).astype(jnp.float32)  # [B, K, blk, H]
        vb = lax.dynamic_slice_in_dim(v, start, block, axis=2).astype(jnp.float32)
        slot_pos = jnp.broadcast_to(start + jnp.arange(block, dtype=jnp.int32), (b, block))
        seen = masks.visibility(q_pos, slot_pos, slot_pos < lengths[:, None], mode, window)  # [B, T, blk]
        seen = jnp.broadcast_to(seen[:, None, None], (b, 1, g, t, block)).reshape(b, 1, rows, block)
        s = jnp.where(seen, jnp.einsum("bkrh,bksh->bkrs", qg, kb), NEG_INF)  # [B, K, R, blk]
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m - m_new)
        return m_new, total * scale + p.sum(-1), acc * scale[..., None] + jnp.einsum("bkrs,bksh->bkrh", p, vb)

    init = (jnp.full((b, kv_heads, rows), NEG_INF, jnp.float32), jnp.zeros((b, kv_heads, rows), jnp.float32),
            jnp.zeros((b, kv_heads, rows, h), jnp.float32))
    blocks = (jnp.max(lengths) + block - 1) // block
    _, total, acc = lax.fori_loop(0, blocks, visit, init)
    out = jnp.where(total[..., None] > 0, acc / jnp.maximum(total, 1e-30)[..., None], 0.0)  # no block visited: zeros
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
