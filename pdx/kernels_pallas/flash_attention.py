"""Block-sparse flash attention for prefill / verify: every mask mode, GQA, padding, tree masks.

Queries at positions `q_pos [B, T]` attend to keys at `k_pos [B, S]` (valid where `k_valid`) under a
`MaskMode` (causal, bidirectional, block-causal), a sliding window with optional sink tokens, and an
optional explicit mask `[B, T, S]` (e.g. the ancestor mask of a speculative tree) ANDed on top.

- `reference`: the attention the models use (`pdx.models.masks.visibility` + `attention`).
- `pallas`: blocked online softmax over the tiles the block map keeps (see `block_mask`), with a
  custom VJP whose backward is a blocked jnp pass over key blocks (recomputes the probabilities
  from the saved log-sum-exp, so memory stays O(T * block_k)).
- `dispatch`: picks the path (see `_core.resolve`; force with `impl=` or `_core.set_impl`).

Rows that see no key at all (only padding) return 0 from the kernel; the reference returns the
mean of v there. Both are padding outputs that callers discard.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from pdx import masks
from pdx.kernels_pallas import _core, gqa
from pdx.kernels_pallas.block_mask import block_map
from pdx.masks import NEG_INF, MaskMode


def reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    k_valid: jax.Array,
    mode: MaskMode = masks.CAUSAL,
    window: jax.Array | int = 0,
    sinks: jax.Array | int = 0,
    mask: jax.Array | None = None,
    *,
    return_lse: bool = False,
):
    """`q [B, T, N, H]` over `k, v [B, K, S, H]` -> `[B, T, N, H]` (and lse `[B, T, N]` fp32 if asked)."""
    visible = masks.visibility(q_pos, k_pos, k_valid, mode, window, sinks)  # [B, T, S]
    if mask is not None:
        visible &= mask
    out = gqa.attention(q, [(k, v, visible)])
    if not return_lse:
        return out
    return out, reference_lse(q, k, visible)


def reference_lse(q: jax.Array, k: jax.Array, visible: jax.Array) -> jax.Array:
    """Log-sum-exp `[B, T, N]` of the scaled, masked scores (NEG_INF for rows that see nothing)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h) * (1.0 / math.sqrt(h))  # [B, T, K, G, H]
    s = jnp.einsum("btkgh,bksh->btkgs", qg, k.astype(q.dtype)).astype(jnp.float32)  # [B, T, K, G, S]
    vis = visible[:, :, None, None]
    lse = jax.nn.logsumexp(jnp.where(vis, s, NEG_INF), axis=-1)
    return jnp.where(vis.any(-1), lse, NEG_INF).reshape(b, t, n)


@dataclasses.dataclass(frozen=True)
class _Static:
    mode: MaskMode
    block_q: int
    block_k: int
    interpret: bool
    variant: str


def _forward(st: _Static, q, k, v, q_pos, q_real, k_pos, k_valid, mask, window, sinks):
    """Padded inputs -> (o [B, T, N, H], lse [B, T, N]), live tiles [B, T/bq, S/bk]."""
    live = block_map(q_pos, q_real, k_pos, k_valid, st.mode, window, sinks, st.block_q, st.block_k, mask)
    o, lse = _core.blocked_attention(
        q.transpose(0, 2, 1, 3), k, v, q_pos, k_pos, k_valid, mask, live, window, sinks, mode=st.mode,
        block_q=st.block_q, block_k=st.block_k, num_splits=1, out_dtype=q.dtype, interpret=st.interpret,
        variant=st.variant)
    return (o[:, :, 0].transpose(0, 2, 1, 3), lse[:, :, 0, :, 0].transpose(0, 2, 1)), live


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, q_pos, q_real, k_pos, k_valid, mask, window, sinks):
    return _forward(st, q, k, v, q_pos, q_real, k_pos, k_valid, mask, window, sinks)[0]


def _flash_fwd(st, q, k, v, q_pos, q_real, k_pos, k_valid, mask, window, sinks):
    (o, lse), live = _forward(st, q, k, v, q_pos, q_real, k_pos, k_valid, mask, window, sinks)
    return (o, lse), (q, k, v, o, lse, q_pos, k_pos, k_valid, mask, window, sinks, live.any((0, 1)))


def _flash_bwd(st, res, cotangents):
    """Blocked backward: scan over key blocks, recomputing p = exp(s - lse) per block; key blocks that
    no query tile sees (`alive [S/bk]` False) are skipped.

    dV_j = P_j^T dO;  dS_j = P_j * (dO V_j^T - rowsum(dO * O) + dlse);  dQ += dS_j K_j;  dK_j = dS_j^T Q.
    """
    q, k, v, o, lse, q_pos, k_pos, k_valid, mask, window, sinks, alive = res
    do, dlse = cotangents
    b, t, n, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g, bk = n // kv_heads, st.block_k
    scale = 1.0 / math.sqrt(h)
    qs = (q * jnp.asarray(scale, q.dtype)).astype(jnp.float32).reshape(b, t, kv_heads, g, h)  # [B, T, K, G, H]
    do = do.astype(jnp.float32).reshape(b, t, kv_heads, g, h)
    delta = (do * o.astype(jnp.float32).reshape(b, t, kv_heads, g, h)).sum(-1)  # [B, T, K, G]
    shift = (dlse.reshape(b, t, kv_heads, g) - delta).transpose(0, 2, 3, 1)[..., None]  # [B, K, G, T, 1]
    lse = lse.reshape(b, t, kv_heads, g).transpose(0, 2, 3, 1)[..., None]  # [B, K, G, T, 1]
    blocks = lambda x, axis: jnp.moveaxis(  # noqa: E731  split `axis` (length S) into [S/bk, ..., bk, ...]
        x.reshape(x.shape[:axis] + (s // bk, bk) + x.shape[axis + 1:]), axis, 0)
    xs = (blocks(k, 2), blocks(v, 2), blocks(k_pos, 1), blocks(k_valid, 1), None if mask is None else blocks(mask, 2))

    def step(dq, x):
        alive_j, *block = x
        skip = lambda dq, kj, *_: (dq, (jnp.zeros(kj.shape, jnp.float32),) * 2)  # noqa: E731
        return jax.lax.cond(alive_j, grads, skip, dq, *block)

    def grads(dq, kj, vj, kpos, kvalid, mask_j):
        kj, vj = kj.astype(jnp.float32), vj.astype(jnp.float32)  # [B, K, bk, H]
        visible = masks.visibility(q_pos, kpos, kvalid, st.mode, window, sinks)  # [B, T, bk]
        if mask_j is not None:
            visible &= mask_j
        scores = jnp.einsum("btkgh,bksh->bkgts", qs, kj)  # [B, K, G, T, bk]
        p = jnp.where(visible[:, None, None], jnp.exp(scores - lse), 0.0)
        ds = p * (jnp.einsum("btkgh,bksh->bkgts", do, vj) + shift)
        dk = jnp.einsum("bkgts,btkgh->bksh", ds, qs)  # qs already carries the scale
        dv = jnp.einsum("bkgts,btkgh->bksh", p, do)
        return dq + jnp.einsum("bkgts,bksh->btkgh", ds, kj), (dk, dv)

    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(qs), (alive, *xs))
    unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, kv_heads, s, h)  # noqa: E731  [S/bk, B, K, bk, H] -> [B, K, S, H]
    dq = (dq * scale).reshape(b, t, n, h).astype(q.dtype)
    return dq, unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    k_valid: jax.Array,
    mode: MaskMode = masks.CAUSAL,
    window: jax.Array | int = 0,
    sinks: jax.Array | int = 0,
    mask: jax.Array | None = None,
    *,
    block_q: int = 128,
    block_k: int = 128,
    return_lse: bool = False,
    interpret: bool = False,
    variant: str | None = None,
):
    """Same contract as `reference`, computed by the block-sparse Pallas kernel (differentiable in q, k, v).

    Block sizes are static; lengths not divisible by them are padded (padded keys are invalid).
    `window` and `sinks` may be traced. `variant`: kernel layout, 'tpu' or 'gpu' (default: the backend's).
    """
    b, t, n, h, kv_heads, s = _core.check_qkv(q, k, v)
    for name, x, shape in (("q_pos", q_pos, (b, t)), ("k_pos", k_pos, (b, s)), ("k_valid", k_valid, (b, s)),
                           ("mask", mask, (b, t, s))):
        _core.check_shape(name, x, shape)
    variant = _core.layout(variant)
    _core.check_blocks(block_q, block_k, interpret, variant)
    bq, bk = _core.tile(t, block_q, variant), _core.tile(s, block_k, variant)
    tp, sp = _core.round_up(t, bq), _core.round_up(s, bk)
    pad_q = lambda x: _core.pad_axis(x, 1, tp)  # noqa: E731  [B, T, ...] -> [B, Tp, ...]
    pad_k = lambda x, axis=1: _core.pad_axis(x, axis, sp)  # noqa: E731  keys axis -> Sp
    if mask is not None:
        mask = pad_k(pad_q(mask.astype(bool)), 2)
    st = _Static(mode, bq, bk, interpret, variant)
    o, lse = _flash(st, pad_q(q), pad_k(k, 2), pad_k(v, 2), pad_q(q_pos.astype(jnp.int32)),
                    pad_q(jnp.ones((b, t), bool)), pad_k(k_pos.astype(jnp.int32)), pad_k(k_valid.astype(bool)), mask,
                    jnp.asarray(window, jnp.int32), jnp.asarray(sinks, jnp.int32))
    o, lse = o[:, :t], lse[:, :t]
    return (o, lse) if return_lse else o


def dispatch(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    k_valid: jax.Array,
    mode: MaskMode = masks.CAUSAL,
    window: jax.Array | int = 0,
    sinks: jax.Array | int = 0,
    mask: jax.Array | None = None,
    *,
    return_lse: bool = False,
    impl: str | None = None,
    block_q: int = 128,
    block_k: int = 128,
):
    """`reference` or `pallas` by backend, or as forced by `impl` / `_core.set_impl` (see `_core.resolve`)."""
    path, interpret = _core.resolve(impl, q)
    args = (q, k, v, q_pos, k_pos, k_valid, mode, window, sinks, mask)
    if path == "reference":
        return reference(*args, return_lse=return_lse)
    return pallas(*args, block_q=block_q, block_k=block_k, return_lse=return_lse, interpret=interpret)
