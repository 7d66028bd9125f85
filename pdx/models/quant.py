"""Weight-only int8 quantization: symmetric, one fp32 scale per output channel.

A `QuantizedWeight` stands in for an `[..., out, in]` weight anywhere `layers.dense` takes one;
the matmul runs on the dequantized weight and the per-channel scale multiplies its output.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pdx.kernels_cpu import gemv
from pdx.models.layers import dense


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
    q: jax.Array  # int8 [..., out, in]
    scale: jax.Array  # fp32 [..., out]

    @property
    def shape(self):
        return self.q.shape

    def dequantized_einsum(self, eq: str, x: jax.Array) -> jax.Array:
        """`einsum(eq, x, w)`; the weight's output channel must be the result's last axis. Up to
        `gemv.MAX_ROWS` rows on CPU run pdx's int8 gemv, which reads the int8 bytes; otherwise the
        weight goes through `layers.dense` in the activation dtype, except that more than
        `gemv.MAX_ROWS` fp32 rows (prefill) take it as bf16 (exact for int8; the activations then
        multiply in bf16 with fp32 accumulation, on the GEMM), and the scale multiplies the output.
        So decode-sized products keep fp32 numerics whether or not the kernel can run here."""
        if gemv.applies(x, self.q):
            return gemv.gemv_int8(x, self.q, self.scale)
        wide = x.dtype == jnp.float32 and math.prod(x.shape[:-1]) > gemv.MAX_ROWS
        w = self.q.astype(jnp.bfloat16 if wide else x.dtype)  # bf16 holds every int8 exactly
        return dense(eq, x, w) * self.scale.astype(x.dtype)

    def rows(self, ids: jax.Array) -> jax.Array:
        """Dequantized rows `w[ids]` (embedding lookup), shape `ids.shape + (in,)`, fp32."""
        return jnp.take(self.q, ids, axis=0).astype(jnp.float32) * jnp.take(self.scale, ids, axis=0)[..., None]


def quantize_int8(w: jax.Array) -> QuantizedWeight:
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-1) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / scale[..., None]), -127, 127).astype(jnp.int8)
    return QuantizedWeight(q=q, scale=scale)


# Param names that are matrices (quantized); norms and biases stay fp32.
MATRICES = ("embed", "lm_head", "wq", "wk", "wv", "wqkv", "wo", "w_gate", "w_up", "w_gate_up", "w_down")


def quantize_params(params: dict) -> dict:
    """Quantize every weight matrix of a transformer param tree (stacked or unstacked layers)."""

    def visit(tree):
        if isinstance(tree, dict):
            return {k: quantize_int8(v) if k in MATRICES else visit(v) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(visit(v) for v in tree)
        return tree

    return visit(params)
