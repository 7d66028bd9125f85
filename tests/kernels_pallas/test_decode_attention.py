"""Decode attention: the split-K Pallas kernel (interpret mode) against the reference over a ragged cache.

Tolerances: fp32 atol 2e-5, bf16 atol 3e-2 (helpers.ATOL); lse 50x that.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx.errors import InvalidInputError
from pdx.kernels_pallas import decode_attention as da
from pdx.masks import CAUSAL, MaskMode
from tests.kernels_pallas.helpers import ATOL, assert_close, qkv

F32, BF16 = jnp.float32, jnp.bfloat16

# name: (N, K, H, T, dtype, mode, window, sinks, lengths, S, block_k, num_splits). Queries are the last T
# positions of each row (already in the cache), as in a decode or verify step.
CASES = {
    "mha-1tok-ragged": (2, 2, 64, 1, F32, CAUSAL, 0, 0, [200, 37, 1], 200, 32, 3),
    "gqa4-verify5-h128": (8, 2, 128, 5, F32, CAUSAL, 0, 0, [160, 99, 5], 160, 32, 2),
    "gqa2-window-sinks": (4, 2, 64, 3, F32, CAUSAL, 24, 4, [200, 120, 30], 200, 32, 4),
    "mqa-block-causal": (4, 1, 64, 4, F32, MaskMode("block_causal", 4), 0, 0, [96, 64, 12], 100, 32, 2),
    "bf16-gqa2-one-split": (4, 2, 128, 2, BF16, CAUSAL, 0, 0, [130, 70, 9], 130, 64, 1),
}
SLOW_CASES = {"mqa-block-causal", "bf16-gqa2-one-split", "gqa2-window-sinks"}
PARAMS = [pytest.param(c, "tpu", marks=pytest.mark.slow) if c in SLOW_CASES else (c, "tpu") for c in CASES]


@pytest.mark.parametrize("case, variant", PARAMS + [("gqa2-window-sinks", "gpu")])
def test_decode_matches_reference(case, variant):
    """Both kernel layouts: 'tpu' (Mosaic grid with scratch) and 'gpu' (Triton loop over key tiles)."""
    n, kv, h, t, dtype, mode, window, sinks, lengths, s, bk, splits = CASES[case]
    b = len(lengths)
    q, k, v = qkv(b, t, s, n, kv, h, dtype, seed=4)
    lengths = jnp.asarray(lengths, jnp.int32)
    q_pos = lengths[:, None] - t + jnp.arange(t)
    kernel = jax.jit(lambda *a: da.pallas(*a, mode, window, sinks, block_k=bk, num_splits=splits, return_lse=True,
                                          interpret=True, variant=variant))
    ours, lse = kernel(q, k, v, q_pos, lengths)
    ref, ref_lse = da.reference(q, k, v, q_pos, lengths, mode, window, sinks, return_lse=True)
    seen = q_pos >= 0  # a query at position >= 0 sees at least itself
    assert ours.shape == q.shape and ours.dtype == dtype
    assert_close(ours, ref, dtype, seen)
    np.testing.assert_allclose(np.asarray(lse)[np.asarray(seen)], np.asarray(ref_lse)[np.asarray(seen)],
                               atol=50 * ATOL[dtype], rtol=0)


def test_garbage_past_length_is_ignored():
    """Slots past a row's length (stale cache contents) must not change the output."""
    q, k, v = qkv(2, 1, 64, 2, 1, 64, seed=5)
    lengths = jnp.array([40, 17])
    q_pos = lengths[:, None] - 1
    run = jax.jit(lambda k, v: da.pallas(q, k, v, q_pos, lengths, block_k=16, num_splits=2, interpret=True))
    stale = jnp.arange(64)[None, None, :, None] >= lengths[:, None, None, None]
    np.testing.assert_array_equal(np.asarray(run(k, v)), np.asarray(run(jnp.where(stale, 1e4, k), jnp.where(stale,
                                                                                                           -7.0, v))))


def test_invalid_inputs_raise_clear_errors():
    q, k, v = qkv(1, 1, 32, 2, 2, 64)
    lengths, q_pos = jnp.array([32]), jnp.array([[31]])
    with pytest.raises(InvalidInputError, match="lengths must have shape"):
        da.pallas(q, k, v, q_pos, jnp.array([32, 3]), interpret=True)
    with pytest.raises(InvalidInputError, match="at most 512"):
        big_q = jnp.zeros((1, 300, 4, 64))
        da.pallas(big_q, k[:, :1], v[:, :1], jnp.zeros((1, 300), jnp.int32), lengths, interpret=True)
    with pytest.raises(InvalidInputError, match="head_dim must be one of"):
        da.pallas(q[..., :48], k[..., :48], v[..., :48], q_pos, lengths, interpret=True)
    with pytest.raises(InvalidInputError, match="block_k must be a positive multiple of 8"):
        da.pallas(q, k, v, q_pos, lengths, block_k=20, interpret=True)
