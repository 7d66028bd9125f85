"""Reference grouped-query attention over key segments (jnp): the spec the Pallas kernels are tested against."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

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
        scores.append(jnp.where(visible[:, None, None], s, NEG_INF))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q.dtype)
    out, start = 0, 0
    for k, v, _ in segments:
        p = probs[..., start : start + k.shape[2]]
        # [B, K, G, T, H]: with the output in this order XLA CPU reads v in place; asking for
        # "btkgh" made it transpose every cached v (a whole-buffer copy per layer per step)
        out = out + jnp.einsum("bkgts,bksh->bkgth", p, v.astype(q.dtype))
        start += k.shape[2]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
