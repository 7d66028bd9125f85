"""pdx's CPU bf16 gemv (an XLA FFI custom call) against its jnp reference, and where dense uses it."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pdx.errors import InvalidInputError
from pdx.kernels_cpu import gemv
from pdx.models import layers

pytestmark = pytest.mark.skipif(not gemv.available(), reason=f"CPU gemv unavailable: {gemv.reason()}")


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


def test_inside_a_while_loop():
    x, w = _operands((2,), 96, 96)
    w = (w.astype(jnp.float32) / 16).astype(jnp.bfloat16)  # keep the iterates bounded

    def run(f):
        return jax.jit(lambda x: lax.fori_loop(0, 5, lambda _, h: jnp.tanh(f(h, w)), x))(x)

    np.testing.assert_allclose(run(gemv.gemv_bf16), run(gemv.reference), rtol=1e-5, atol=1e-5)


def test_gradients_are_the_products():
    x, w = _operands((3,), 40, 24)

    def loss(f):
        return jax.grad(lambda x: (f(x, w) ** 2).sum())(x)

    np.testing.assert_allclose(loss(gemv.gemv_bf16), loss(gemv.reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x,w", [(jnp.zeros((2, 8)), jnp.zeros((4, 9), jnp.bfloat16)),
                                 (jnp.zeros((2, 8)), jnp.zeros((4, 8))),
                                 (jnp.zeros((2, 8), jnp.bfloat16), jnp.zeros((4, 8), jnp.bfloat16)),
                                 (jnp.zeros((2, 8)), jnp.zeros((2, 4, 8), jnp.bfloat16))])
def test_bad_operands_are_refused(x, w):
    with pytest.raises(InvalidInputError, match="gemv_bf16 takes"):
        gemv.gemv_bf16(x, w)


@pytest.mark.parametrize("rows,uses", [(1, True), (gemv.MAX_ROWS, True), (gemv.MAX_ROWS + 1, False)])
def test_dense_uses_it_for_few_bf16_rows(rows, uses):
    x, w = _operands((rows,), 32, 48)
    hlo = jax.jit(lambda x, w: layers.dense("...i,oi->...o", x, w)).lower(x, w).as_text()
    assert (gemv.TARGET in hlo) == uses
    assert gemv.TARGET not in jax.jit(lambda x, w: layers.dense("...i,oi->...o", x, w)).lower(
        x, w.astype(jnp.float32)).as_text()  # fp32 weights: XLA's dot


def test_turned_off_by_the_environment():
    code = "from pdx.kernels_cpu import gemv; print(gemv.available(), gemv.reason(), gemv.mode())"
    env = {**os.environ, "PDX_CPU_KERNELS": "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False turned off by PDX_CPU_KERNELS off"


def test_the_library_is_built_once_per_cache(tmp_path):
    code = "from pdx.kernels_cpu import gemv; assert gemv.available(); print(gemv._build()[0])"
    env = {**os.environ, "PDX_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop("PDX_NO_CACHE", None)
    paths = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True).stdout.strip() for _ in range(2)]
    assert paths[0] == paths[1] and paths[0].startswith(str(tmp_path / "kernels"))
    assert os.listdir(tmp_path / "kernels") == [os.path.basename(paths[0])]  # no temporary left behind
