"""Shared model layers: values against their plain formulas, and the compiled forms XLA CPU is kept to
(no whole-weight copies or conversions inside decoding loops)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pdx.models import layers


def _loop_hlo(body, *args) -> str:
    """The compiled HLO of `body(i, *args)` run at each step `i` of a while loop with a traced trip
    count (`body` must use `i`, or XLA hoists it out of the loop)."""
    def looped(n, *a):
        return lax.fori_loop(0, n, lambda i, acc: acc + body(i, *a).sum(), jnp.zeros((), jnp.float32))
    return jax.jit(looped).lower(jnp.int32(2), *args).compile().as_text()


def test_bf16_embedding_rows_widen_exactly_without_converting_the_table():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((300, 24)), jnp.float32).astype(jnp.bfloat16)
    tokens = jnp.asarray([[0, 5, 299], [7, 7, 1]], jnp.int32)
    got = jax.jit(layers.embed)(table, tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, np.asarray(table.astype(jnp.float32))[np.asarray(tokens)])
    hlo = _loop_hlo(lambda i, table, tokens: layers.embed(table, (tokens + i) % 300), table, tokens)
    assert not re.search(r"f32\[300,24\]\S* (convert|fusion)\(", hlo), "the whole table was widened"


def test_dense_in_a_loop_reads_the_weight_in_place():
    x = jnp.ones((1, 64, 128), jnp.float32)  # 64 rows: the plain GEMM path, not the weights-first one
    for dtype in (jnp.float32, jnp.bfloat16):
        ws = [jnp.ones((128, 128), dtype) / 128 for _ in range(3)]  # exact in bf16
        np.testing.assert_allclose(layers.dense("btd,fd->btf", x, ws[0]), jnp.ones((1, 64, 128)), rtol=1e-6)

        def chain(i, x, *ws):  # each product feeds the next, as a layer stack's do
            x = x + i
            for w in ws:
                x = layers.dense("btd,fd->btf", x, w)
            return x
        hlo = _loop_hlo(chain, x, *ws)
        assert not re.search(r"\[128,128\]\S* (copy|transpose)\(", hlo), "a weight was transposed"


def test_half_table_rope_matches_the_full_width_formula():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 3, 16)), jnp.float32)
    positions = jnp.asarray([[0, 1, 2, 3, 4], [7, 9, 11, 13, 100]], jnp.int32)
    cos, sin = layers.rope_tables(positions, layers.rope_inv_freq(16, 10000.0))
    assert cos.shape == (2, 5, 8)
    full_cos, full_sin = (jnp.concatenate([t, t], -1)[:, :, None] for t in (cos, sin))
    rotated = jnp.concatenate([-x[..., 8:], x[..., :8]], axis=-1)  # HF Llama's rotate_half
    np.testing.assert_allclose(layers.apply_rope(x, cos, sin), x * full_cos + rotated * full_sin, rtol=1e-6,
                               atol=1e-6)
