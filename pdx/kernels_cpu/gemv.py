"""Products of a few fp32 rows with bf16 or int8 weights on XLA CPU, at memory bandwidth:

    gemv_bf16(x, w)         x [..., K] fp32 @ w [N, K]^T (bf16)                -> [..., N] fp32
    gemv_int8(x, q, scale)  (x [..., K] fp32 @ q [N, K]^T (int8)) * scale [N]  -> [..., N] fp32

XLA CPU multiplies such a weight by a few rows of activations at 1-2 GB/s (its bf16/int8 dot, or an
upcast copy), so decode at batch 1-8 gained nothing from smaller weights. `gemv.cc` streams the
weight at memory bandwidth instead (fp32 math on the weight's values: the result is the fp32
product up to summation order), from `pdx.kernels_cpu.library` (built on first use).

`pdx.models.layers.dense` uses it on CPU for bf16 weights under fp32 activations with up to
`MAX_ROWS` rows, and `pdx.models.quant` for int8 weights, where they measured faster than XLA's
dot; elsewhere, or where the library is unavailable, XLA's dot runs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pdx.errors import InvalidInputError
from pdx.kernels_cpu import library

TARGETS = ("pdx_gemv_bf16", "pdx_gemv_int8")
# SmolLM2 bf16 decode tok/s, XLA dot -> this kernel: 1 row 35.8 -> 55.2, 2: 57 -> 90, 4: 108 -> 141,
# 8: 177 -> 203, 16: 265 -> 243 (XLA's AMX GEMM wins from 16 rows).
MAX_ROWS = 8


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether `x @ w^T` should run here (the caller checks the weight's dtype): CPU, fp32
    activations, a 2-D weight, at most `MAX_ROWS` rows, and the kernel available."""
    rows = math.prod(x.shape[:-1])
    return (jax.default_backend() == "cpu" and x.dtype == jnp.float32 and w.ndim == 2 and rows <= MAX_ROWS
            and library.available())


def _check(x, w, dtype, name, args):
    if x.dtype != jnp.float32 or w.dtype != dtype or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise InvalidInputError(f"{name} takes x [..., K] float32 and {args}, got x {x.shape} {x.dtype} and "
                                f"the weight {w.shape} {w.dtype}")
    if not library.available():
        raise InvalidInputError(f"pdx's CPU gemv is unavailable: {library.reason()}")


def gemv_bf16(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., K] fp32`, `w [N, K] bf16` -> `[..., N] fp32` (requires `library.available()`)."""
    _check(x, w, jnp.bfloat16, "gemv_bf16", "w [N, K] bfloat16")
    return _gemv_bf16(x, w)


def gemv_int8(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """`x [..., K] fp32`, `q [N, K] int8`, `scale [N] fp32` -> `[..., N] fp32` (requires `library.available()`)."""
    _check(x, q, jnp.int8, "gemv_int8", "q [N, K] int8 with scale [N] float32")
    if scale.shape != q.shape[:1] or scale.dtype != jnp.float32:
        raise InvalidInputError(f"gemv_int8's scale must be [{q.shape[0]}] float32, got {scale.shape} {scale.dtype}")
    return _gemv_int8(x, q, scale)


def reference(x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """What `gemv_bf16` (`scale` None) and `gemv_int8` compute, in jnp: the fp32 product."""
    y = jnp.einsum("...k,nk->...n", x, w.astype(jnp.float32))
    return y if scale is None else y * scale


def _call(target, x, *weight):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape[:-1] + weight[0].shape[:1], jnp.float32))(x, *weight)


# Differentiable (training, tests): the tangent maps are the jnp products. int8 weights are constants.
@jax.custom_jvp
def _gemv_bf16(x, w):
    return _call(TARGETS[0], x, w)


@_gemv_bf16.defjvp
def _gemv_bf16_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return _gemv_bf16(x, w), reference(dx, w) + reference(x, dw.astype(jnp.bfloat16))


@jax.custom_jvp
def _gemv_int8(x, q, scale):
    return _call(TARGETS[1], x, q, scale)


@_gemv_int8.defjvp
def _gemv_int8_jvp(primals, tangents):
    (x, q, scale), (dx, _, dscale) = primals, tangents
    return _gemv_int8(x, q, scale), reference(dx, q, scale) + reference(x, q, dscale)
