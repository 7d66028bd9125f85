"""Layers of decoder-hybrid-decoder models (SambaY / Phi-4-mini-flash): LayerNorm with bias, GLU MLP,
differential attention over key segments, a sliding-window ring-buffer KV cache, and the Gated Memory Unit.

None of them uses positional encoding: order reaches attention only through the masks (and through
the Mamba layers' recurrence). Weights are `[out, in]` as everywhere in pdx.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pdx import masks
from pdx.models import layers as nn


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with bias over the last axis, computed in fp32 and cast back: `[..., D]`."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def glu_mlp(x: jax.Array, fc1, fc2) -> jax.Array:
    """Phi's gated MLP: `fc2(y * silu(gate))` with `(gate, y) = split(fc1(x))`; fc1 `[2F, D]`, fc2 `[D, F]`."""
    gate, y = jnp.split(nn.dense("btd,fd->btf", x, fc1), 2, axis=-1)  # [B, T, F] each
    return nn.dense("btf,df->btd", y * jax.nn.silu(gate), fc2)


def gmu(h: jax.Array, memory: jax.Array, in_proj, out_proj) -> jax.Array:
    """Gated Memory Unit: `out_proj(silu(in_proj(h)) * memory)`; h `[B, T, D]`, memory `[B, T, Di]`.

    It reuses the memory (a Mamba layer's pre-gate SSM output at the same position) instead of
    attending: O(D Di) per token whatever the context length.
    """
    g = nn.dense("btd,id->bti", h, in_proj)  # [B, T, Di]
    return nn.dense("bti,di->btd", jax.nn.silu(g) * memory.astype(g.dtype), out_proj)


def lambda_init(depth: int) -> float:
    """Differential attention's per-layer constant, `0.8 - 0.6 exp(-0.3 depth)` (depth = layer index from 0)."""
    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def diff_lambda(lq1, lk1, lq2, lk2, lam_init) -> jax.Array:
    """The re-parameterised scalar `exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init` (fp32)."""
    f = lambda a: a.astype(jnp.float32)
    return jnp.exp(jnp.sum(f(lq1) * f(lk1))) - jnp.exp(jnp.sum(f(lq2) * f(lk2))) + lam_init


def diff_attention(
    q: jax.Array,
    segments: list[tuple[jax.Array, jax.Array, jax.Array]],
    lam: jax.Array,
    lam_init: jax.Array | float,
    subln: jax.Array,
    eps: float = 1e-5,
) -> jax.Array:
    """Differential attention (Phi-4-mini-flash layout) of `q [B, T, N, H]` over key segments.

    Heads are striped in pairs: query heads 2i / 2i+1 form the two softmax maps of pair i, over
    kv heads 2j / 2j+1 (GQA: pair i reads kv pair i // (N / K)). Both maps read the pair's values
    concatenated to 2H channels; the result `(A1 - lam A2) V` goes through a per-pair RMSNorm
    (`subln [2H]`), is scaled by `1 - lam_init`, and is split back into heads 2i, 2i+1.
    Each segment is `(k [B, K, S, H], v [B, K, S, H], visible [B, T, S])`; all segments share one
    softmax per map. Returns `[B, T, N, H]`.
    """
    b, t, n, h = q.shape
    kv = segments[0][0].shape[1]
    g = n // kv
    qg = q.reshape(b, t, kv // 2, g, 2, h) * (1.0 / math.sqrt(h))  # [B, T, K/2, G, 2, H]
    scores, values = [], []
    for k, v, visible in segments:
        s = k.shape[2]
        kp = k.reshape(b, kv // 2, 2, s, h).astype(q.dtype)  # [B, K/2, 2, S, H]
        sc = jnp.einsum("btkgch,bkcsh->bkgcts", qg, kp).astype(jnp.float32)  # [B, K/2, G, 2, T, S]
        scores.append(jnp.where(visible[:, None, None, None], sc, masks.NEG_INF))
        # values stay [B, K/2, 2, S, H] (a view of the cache): the pair's 2H channels are (even head, odd head)
        values.append(v.reshape(b, kv // 2, 2, s, h).astype(q.dtype))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q.dtype)
    out, start = 0, 0
    for vp in values:
        p = probs[..., start : start + vp.shape[3]]
        out = out + jnp.einsum("bkgcts,bkesh->btkgceh", p, vp)  # [B, T, K/2, G, 2 maps, 2 value heads, H]
        start += vp.shape[3]
    out = out.reshape(b, t, kv // 2, g, 2, 2 * h)
    attn = out[..., 0, :].astype(jnp.float32) - lam * out[..., 1, :].astype(jnp.float32)  # [B, T, K/2, G, 2H]
    attn = nn.rms_norm(attn, subln, eps) * (1.0 - lam_init)
    return attn.reshape(b, t, n, h).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Sliding-window ring buffer: W slots per row; the token at position p lives in slot p % W.


def ring_positions(lengths: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """Positions `[B, W]` held by each ring slot after `lengths [B]` tokens, and their validity `[B, W]`.

    Slot s holds the latest position p < length with p % W == s (none while length <= s).
    """
    last = lengths[:, None] - 1  # [B, 1]
    pos = last - jnp.mod(last - jnp.arange(window)[None, :], window)  # [B, W]
    return pos, pos >= 0


def ring_write(buf: jax.Array, new: jax.Array, lengths: jax.Array, valid: jax.Array) -> jax.Array:
    """Write `new [B, K, T, H]` (positions lengths[b] + t) into `buf [B, K, W, H]`.

    Only each row's last W valid tokens are written (older ones would be overwritten in the same
    chunk, and a scatter with repeated slots has no defined order), so every slot is written once.
    """
    w, t = buf.shape[2], new.shape[2]
    n_valid = valid.sum(-1, dtype=jnp.int32)[:, None]  # [B, 1]
    steps = jnp.arange(t)[None, :]  # [1, T]
    keep = valid & (steps >= n_valid - w)  # [B, T]
    slots = jnp.where(keep, jnp.mod(lengths[:, None] + steps, w), w)  # [B, T]; w = out of bounds: dropped
    rows = jnp.arange(buf.shape[0])[:, None]
    return buf.at[rows, :, slots].set(new.astype(buf.dtype).transpose(0, 2, 1, 3), mode="drop")
