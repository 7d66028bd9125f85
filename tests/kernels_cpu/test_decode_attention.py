"""pdx's CPU decode attention (an XLA FFI custom call) against its jnp reference, and where attend uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx import masks
from pdx.errors import InvalidInputError
from pdx.kernels_cpu import decode_attention as da
from pdx.kernels_cpu import library
from pdx.kernels_pallas import attend, gqa

pytestmark = pytest.mark.skipif(not library.available(), reason=f"CPU kernels unavailable: {library.reason()}")


def _operands(b, n, kv, s, h, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = (jax.random.normal(ks[i], shape) for i, shape in enumerate([(b, n, h), (b, kv, s, h), (b, kv, s, h)]))
    live = jax.random.randint(ks[3], (b,), 1, s + 1)
    return q, k, v, live


@pytest.mark.parametrize("b,n,kv,s,h", [(1, 9, 3, 64, 64), (5, 9, 3, 200, 64), (3, 4, 4, 37, 16), (2, 8, 2, 70, 32)])
@pytest.mark.parametrize("window", [0, 7])
def test_matches_the_reference(b, n, kv, s, h, window):
    q, k, v, live = _operands(b, n, kv, s, h)
    got = da.decode_attention(q, k, v, live - 1, live, window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(da.reference(q, k, v, live - 1, live, window)),
                               atol=2e-6, rtol=1e-5)


def test_a_query_before_the_live_end_and_a_traced_window():
    q, k, v, live = _operands(4, 6, 2, 50, 32, seed=1)
    pos = jnp.maximum(live - 5, 0)  # slots past the query's position stay hidden (causal)
    fn = jax.jit(da.decode_attention)
    for window in [0, 3]:
        np.testing.assert_allclose(np.asarray(fn(q, k, v, pos, live, jnp.int32(window))),
                                   np.asarray(da.reference(q, k, v, pos, live, window)), atol=2e-6, rtol=1e-5)


def test_a_row_that_sees_nothing_gives_zeros():
    q, k, v, _ = _operands(2, 4, 2, 16, 16)
    out = da.decode_attention(q, k, v, jnp.array([3, 5]), jnp.array([0, 6]), 0)
    assert (np.asarray(out[0]) == 0).all() and np.abs(np.asarray(out[1])).sum() > 0


def test_bad_operands_are_refused():
    q, k, v, live = _operands(2, 4, 2, 16, 16)
    with pytest.raises(InvalidInputError, match="decode_attention takes"):
        da.decode_attention(q[..., :12], k[..., :12], v[..., :12], live - 1, live, 0)
    with pytest.raises(InvalidInputError, match="decode_attention takes"):
        da.decode_attention(q, k.astype(jnp.bfloat16), v, live - 1, live, 0)


def _attend_hlo_and_out(q, k, v, lengths, mode):
    """attend's new_in_cache path on one step (the new key already written at slot `lengths`)."""
    q_pos, valid = lengths[:, None], jnp.ones((q.shape[0], 1), bool)
    fn = jax.jit(lambda q, k, v, lengths: attend.attend(q, k[:, :, :1], v[:, :, :1], lengths[:, None], valid, mode,
                                                        0, (k, v, lengths), new_in_cache=True, impl="reference"))
    return fn.lower(q, k, v, lengths).as_text(), fn(q, k, v, lengths), q_pos


@pytest.mark.parametrize("mode, uses", [(masks.CAUSAL, True), (masks.BIDIRECTIONAL, False)])
def test_attend_runs_it_for_a_causal_decode_step(mode, uses):
    q, k, v, live = _operands(3, 6, 2, 48, 32, seed=2)
    lengths = live - 1  # slots before the new token's
    hlo, out, q_pos = _attend_hlo_and_out(q[:, None], k, v, lengths, mode)
    assert (da.TARGET in hlo) == uses
    slot_pos = jnp.broadcast_to(jnp.arange(48), (3, 48))
    visible = masks.visibility(q_pos, slot_pos, slot_pos < live[:, None], mode, 0)
    want = gqa.attention(q[:, None], [(k, v, visible)])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-6, rtol=1e-5)
