"""Building blocks shared by the model families: dense, RMSNorm, RoPE, SwiGLU, masked attention.

Weights are stored PyTorch-style, output dimension first (`[out, in]`): on XLA CPU a gemv that
streams contiguous rows runs ~15% faster than the `[in, out]` layout (measured on SmolLM2 geometry).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from pdx.kernels_cpu import gemv

# On XLA CPU, a product of more rows than this runs faster plain than weights-first (`_weights_first`):
# at SmolLM2 geometry 64 rows tie and a 16 x 64-token prefill chunk ran 1.4x faster plain.
WEIGHTS_FIRST_MAX_ROWS = 32


def dense(eq: str, x: jax.Array, w) -> jax.Array:
    """`einsum(eq, x, w)` in the activation dtype; `w` may be a `pdx.models.quant.QuantizedWeight`.

    `eq` is always "x[..., in], w[out, in] -> [..., out]". bf16 weights under fp32 activations
    multiply in bf16 with fp32 accumulation (the MXU's way; on XLA CPU the AMX/oneDNN GEMM, about 3x
    fp32's speed from 2 rows up). On CPU, up to `gemv.MAX_ROWS` rows of that run pdx's bf16 gemv
    (`pdx.kernels_cpu.gemv`, fp32 math at memory bandwidth) where it is available; else a single row
    upcasts the weight (XLA's bf16 gemv is slow; the upcast is hoisted out of decode loops). On CPU,
    2 to `WEIGHTS_FIRST_MAX_ROWS` rows of fp32 run weights-first (`w @ x^T`, see `_weights_first`)."""
    if hasattr(w, "dequantized_einsum"):
        return w.dequantized_einsum(eq, x)
    rows = math.prod(x.shape[:-1])
    cpu = jax.default_backend() == "cpu"
    if w.dtype == jnp.bfloat16 and gemv.applies(x, w):
        return gemv.gemv_bf16(x, w)
    if w.dtype == jnp.bfloat16 and x.dtype == jnp.float32 and not (cpu and rows == 1):
        return _matmul(eq, x.astype(jnp.bfloat16), w, jnp.float32)
    w = w.astype(x.dtype) if w.dtype != x.dtype else w
    if 1 < rows <= WEIGHTS_FIRST_MAX_ROWS and w.ndim == 2 and cpu:
        return _weights_first(x, w)
    return _matmul(eq, x, w, None)


def _matmul(eq: str, x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """`einsum(eq, x, w)` with the rows flattened to one axis: XLA CPU multiplies a `[rows, in]` by a
    `[out, in]` weight in place, but a 3-D `[B, T, in]` one inside a loop body (chunked prefill,
    verify, dLLM steps) made it transpose every weight on entering the loop (SmolLM2 bf16: a
    128-token prefill chunk 0.12 -> 0.25 s)."""
    if w.ndim != 2:
        return jnp.einsum(eq, x, w, preferred_element_type=out_dtype)
    y = lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _weights_first(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., in] @ w[out, in]^T` as `(w @ x^T)^T`: XLA CPU's GEMM runs a few rows (speculative
    verify, batched decode) 1.1-1.7x faster with the weight as the left operand (measured on
    SmolLM2: a 4-token forward 62 -> 37 ms, 8 tokens 76 -> 50 ms; one row is a gemv either way).
    The barrier keeps XLA from folding the transpose back into the dot."""
    y = lax.dot_general(w, x.reshape(-1, x.shape[-1]), (((1,), (1,)), ((), ())))  # [out, rows]
    return lax.optimization_barrier(y).T.reshape(*x.shape[:-1], w.shape[0])


def embed(table, tokens: jax.Array) -> jax.Array:
    """Rows of the embedding table `[V, D]` for `tokens`, in fp32 whatever the storage (bf16 or int8
    weights keep an fp32 residual stream); the table may be quantized."""
    if hasattr(table, "rows"):
        return table.rows(tokens)
    if table.dtype == jnp.bfloat16:
        # Gather the 16-bit patterns, then widen (bf16 -> fp32 is a shift): XLA CPU gathers bf16 by
        # converting the whole table to fp32 first (113 MB for SmolLM2, 45 ms per decode call); the
        # integer view costs at most a 16-bit copy of it.
        bits = jnp.take(lax.bitcast_convert_type(table, jnp.uint16), tokens, axis=0)
        return lax.bitcast_convert_type(bits.astype(jnp.uint32) << 16, jnp.float32)
    return jnp.take(table, tokens, axis=0).astype(jnp.float32)


def last_valid(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """`x [B, T, ...]` at each row's last valid position (`valid [B, T]` a per-row prefix; None: the
    last one) -> `[B, 1, ...]`; rows without a valid token give position 0."""
    if valid is None:
        return x[:, -1:]
    last = jnp.maximum(valid.sum(-1) - 1, 0)  # [B]
    return jnp.take_along_axis(x, last.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)


def lm_head(params: dict, cfg, x: jax.Array) -> jax.Array:
    """Logits `[..., V]` in fp32 from final hidden states `[..., D]`: the tied embedding table, or
    `params["lm_head"]` when `cfg.tie_embeddings` is off (every family's config has that field)."""
    w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return dense("...d,vd->...v", x, w).astype(jnp.float32)


def lm_head_rows(params: dict, cfg, ids: jax.Array) -> jax.Array:
    """fp32 rows `[n, D]` of the output embedding for token `ids [n]` (`lm_head` restricted to them)."""
    return embed(params["embed"] if cfg.tie_embeddings else params["lm_head"], ids)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32 and cast back, as Llama does."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (`rope_type: llama3` in HF configs)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
    """Inverse frequencies `[head_dim // 2]`, with the Llama-3 scaling rule applied if given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables `[B, T, head_dim / 2]` for positions `[B, T]` (HF Llama's half-split layout
    repeats them over both halves). Half tables: XLA CPU fuses the tables into every layer's rope,
    so each layer evaluates them again (7% of a SmolLM2 prefill pass at full width)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x [B, T, N, H]` by the half tables `[B, T, H/2]`: `(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def swiglu(x: jax.Array, w_gate, w_up, w_down) -> jax.Array:
    """`down(silu(gate(x)) * up(x))` with weights `[F, D]`, `[F, D]`, `[D, F]`; `w_up=None` means
    `w_gate` is the fused `[2F, D]` gate-then-up matrix (one matmul instead of two)."""
    if w_up is None:
        gate, up = jnp.split(dense("btd,fd->btf", x, w_gate), 2, axis=-1)
    else:
        gate, up = dense("btd,fd->btf", x, w_gate), dense("btd,fd->btf", x, w_up)
    return dense("btf,df->btd", jax.nn.silu(gate) * up, w_down)
