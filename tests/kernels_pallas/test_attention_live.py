"""`gqa.attention_live` (online softmax over the live key blocks only) equals `gqa.attention` over the
whole cache for every query that sees a key: ragged lengths, GQA, windows, block-causal, a cache whose
size is not a multiple of the block, padded queries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx import masks
from pdx.kernels_pallas import decode_attention, gqa
from pdx.masks import CAUSAL, MaskMode
from tests.kernels_pallas.helpers import qkv


@pytest.mark.parametrize("n, kv, t, s, lengths, mode, window, block", [
    (4, 2, 1, 256, [200, 37, 1], CAUSAL, 0, 64),  # a decode step
    (9, 3, 16, 256, [130, 16, 70], CAUSAL, 0, 64),  # prefill chunks of three rows
    (4, 1, 8, 96, [96, 40, 8], CAUSAL, 24, 64),  # sliding window; 96 slots: blocks of 32
    (4, 2, 8, 128, [64, 24, 8], MaskMode("block_causal", 4), 0, 16),
])
def test_live_blocks_match_full_attention(n, kv, t, s, lengths, mode, window, block):
    b = len(lengths)
    q, k, v = qkv(b, t, s, n, kv, 32, jnp.float32, seed=3)
    lengths = jnp.asarray(lengths, jnp.int32)
    q_pos = lengths[:, None] - t + jnp.arange(t)  # the last t positions of each row, already in the cache
    q_pos = jnp.maximum(q_pos, 0)
    slot_pos, slot_valid = decode_attention.slots(lengths, s)
    visible = masks.visibility(q_pos, slot_pos, slot_valid, mode, window)  # [B, T, S]
    want = gqa.attention(q, [(k, v, visible)])
    got = jax.jit(lambda *a: gqa.attention_live(*a, mode, window, block=block))(q, k, v, q_pos, lengths)
    sees = np.asarray(visible.any(-1))  # [B, T]
    np.testing.assert_allclose(np.asarray(got)[sees], np.asarray(want)[sees], atol=2e-5, rtol=1e-5)


def test_no_live_slot_gives_zeros_not_nan():
    q, k, v = qkv(2, 4, 64, 4, 2, 16, jnp.float32, seed=0)
    out = gqa.attention_live(q, k, v, jnp.zeros((2, 4), jnp.int32), jnp.zeros((2,), jnp.int32), CAUSAL, 0)
    assert np.all(np.asarray(out) == 0)
