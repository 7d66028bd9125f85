"""Random attention inputs and tolerances shared by the kernel tests."""

import jax.numpy as jnp
import numpy as np

# fp32: kernel and reference differ only in summation order (outputs are O(1) averages of v).
ATOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def qkv(b, t, s, n, kv_heads, h, dtype=jnp.float32, seed=0):
    """q [B, T, N, H], k, v [B, K, S, H] with unit-normal entries in `dtype`."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)  # noqa: E731
    return draw(b, t, n, h), draw(b, kv_heads, s, h), draw(b, kv_heads, s, h)


def assert_close(ours, ref, dtype, rows=None):
    """Compare `[B, T, ...]` outputs, optionally only where `rows [B, T]` holds (rows that see a key)."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if rows is not None:
        ours, ref = ours[np.asarray(rows)], ref[np.asarray(rows)]
    np.testing.assert_allclose(ours, ref, atol=ATOL[dtype], rtol=0)
