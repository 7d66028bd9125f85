"""pdx's CPU bf16/int8 gemv (XLA FFI custom calls) against their jnp reference, and where dense uses them."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pdx.errors import InvalidInputError
from pdx.kernels_cpu import gemv, library
from pdx.models import layers, quant

pytestmark = pytest.mark.skipif(not library.available(), reason=f"CPU kernels unavailable: {library.reason()}")


def _operands(lead, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32).astype(jnp.bfloat16)
    return x, w


@pytest.mark.parametrize("lead,k,n", [((1,), 576, 1536), ((3,), 37, 7), ((4,), 64, 1), ((5,), 576, 200),
                                      ((8,), 16, 130), ((2, 3), 100, 65), ((1, 1), 1536, 576)])
def test_matches_reference(lead, k, n):
    x, w = _operands(lead, k, n)
    got = jax.jit(gemv.gemv_bf16)(x, w)
    assert got.shape == (*lead, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, gemv.reference(x, w), rtol=2e-5, atol=2e-5 * np.sqrt(k))
    qw = quant.quantize_int8(w.astype(jnp.float32))
    got = jax.jit(gemv.gemv_int8)(x, qw.q, qw.scale)
    np.testing.assert_allclose(got, gemv.reference(x, qw.q, qw.scale), rtol=2e-5, atol=2e-5 * np.sqrt(k))


def test_inside_a_while_loop():
    x, w = _operands((2,), 96, 96)
    w = (w.astype(jnp.float32) / 16).astype(jnp.bfloat16)  # keep the iterates bounded

    def run(f):
        return jax.jit(lambda x: lax.fori_loop(0, 5, lambda _, h: jnp.tanh(f(h, w)), x))(x)

    np.testing.assert_allclose(run(gemv.gemv_bf16), run(gemv.reference), rtol=1e-5, atol=1e-5)


def test_gradients_are_the_products():
    x, w = _operands((3,), 40, 24)

    qw = quant.quantize_int8(w.astype(jnp.float32))

    def grads(f, *weight):
        return jax.grad(lambda x, s: (f(x, *weight[:-1], s) ** 2).sum(), argnums=(0, 1))(x, weight[-1])

    for got, want in zip(grads(gemv.gemv_bf16, w), grads(gemv.reference, w)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads(gemv.gemv_int8, qw.q, qw.scale), grads(gemv.reference, qw.q, qw.scale)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("x,w", [(jnp.zeros((2, 8)), jnp.zeros((4, 9), jnp.bfloat16)),
                                 (jnp.zeros((2, 8)), jnp.zeros((4, 8))),
                                 (jnp.zeros((2, 8), jnp.bfloat16), jnp.zeros((4, 8), jnp.bfloat16)),
                                 (jnp.zeros((2, 8)), jnp.zeros((2, 4, 8), jnp.bfloat16))])
def test_bad_operands_are_refused(x, w):
    with pytest.raises(InvalidInputError, match="gemv_bf16 takes"):
        gemv.gemv_bf16(x, w)
    with pytest.raises(InvalidInputError, match="gemv_int8 takes"):
        gemv.gemv_int8(x, w.astype(jnp.int8) if w.dtype == jnp.bfloat16 else w, jnp.ones(w.shape[:1]))


def test_int8_scale_must_match():
    x, q = jnp.zeros((2, 8)), jnp.zeros((4, 8), jnp.int8)
    for scale in (jnp.ones(3), jnp.ones(4, jnp.bfloat16)):
        with pytest.raises(InvalidInputError, match="scale must be"):
            gemv.gemv_int8(x, q, scale)


@pytest.mark.parametrize("rows,uses", [(1, True), (gemv.MAX_ROWS, True), (gemv.MAX_ROWS + 1, False)])
def test_dense_uses_them_for_few_rows(rows, uses):
    x, w = _operands((rows,), 32, 48)
    def hlo(w):
        return jax.jit(lambda x, w: layers.dense("...i,oi->...o", x, w)).lower(x, w).as_text()

    bf16, int8 = gemv.TARGETS
    assert (bf16 in hlo(w)) == uses
    assert (int8 in hlo(quant.quantize_int8(w.astype(jnp.float32)))) == uses
    assert not any(t in hlo(w.astype(jnp.float32)) for t in gemv.TARGETS)  # fp32 weights: XLA's dot


def test_turned_off_by_the_environment():
    code = "from pdx.kernels_cpu import library; print(library.available(), library.reason(), library.mode())"
    env = {**os.environ, "PDX_CPU_KERNELS": "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False turned off by PDX_CPU_KERNELS off"


def test_the_library_is_built_once_per_cache(tmp_path):
    code = "from pdx.kernels_cpu import library; assert library.available(); print(library._build()[0])"
    env = {**os.environ, "PDX_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop("PDX_NO_CACHE", None)
    paths = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True).stdout.strip() for _ in range(2)]
    assert paths[0] == paths[1] and paths[0].startswith(str(tmp_path / "kernels"))
    assert os.listdir(tmp_path / "kernels") == [os.path.basename(paths[0])]  # no temporary left behind
