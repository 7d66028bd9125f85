"""pdx's CPU cached attention (an XLA FFI custom call) against its jnp reference, and where attend uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx import masks
from pdx.errors import InvalidInputError
from pdx.kernels_cpu import cached_attention as ca
from pdx.kernels_cpu import library
from pdx.kernels_pallas import attend, gqa

pytestmark = pytest.mark.skipif(not library.available(), reason=f"CPU kernels unavailable: {library.reason()}")


def _operands(b, n, kv, s, h, seed=0, p=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    p = b if p is None else p
    q, k, v = (jax.random.normal(ks[i], shape) for i, shape in enumerate([(p, n, h), (b, kv, s, h), (b, kv, s, h)]))
    live = jax.random.randint(ks[3], (b,), 1, s + 1)
    return q, k, v, live


def _check(q, k, v, rows, q_pos, live, window, starts=None, fn=ca.cached_attention):
    got = fn(q, k, v, rows, q_pos, live, window, starts)
    want = ca.reference(q, k, v, rows, q_pos, live, window, starts)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
    return got


@pytest.mark.parametrize("b,n,kv,s,h", [(1, 9, 3, 64, 64), (5, 9, 3, 200, 64), (3, 4, 4, 37, 16), (2, 8, 2, 70, 32)])
@pytest.mark.parametrize("window", [0, 7])
def test_a_decode_step_matches_the_reference(b, n, kv, s, h, window):
    q, k, v, live = _operands(b, n, kv, s, h)
    _check(q, k, v, jnp.arange(b), live - 1, live, window)


@pytest.mark.parametrize("window", [0, 5])
def test_a_prefill_chunk_of_several_queries_per_row(window):
    b, t, s = 3, 12, 40
    q, k, v, _ = _operands(b, 6, 2, s, 32, seed=3, p=b * t)
    lengths = jnp.array([0, 7, 20])  # each row's chunk starts where its cache ends
    q_pos = (lengths[:, None] + jnp.arange(t)).reshape(-1)
    rows = jnp.repeat(jnp.arange(b), t)
    _check(q, k, v, rows, q_pos, lengths + t, window, fn=jax.jit(ca.cached_attention))


def test_packed_rows_with_segment_starts_and_padding():
    """Tokens of two rows interleaved in one sequence, a query that starts past slot 0, and a padding
    query of no row (-1) that gives zeros."""
    q, k, v, _ = _operands(2, 4, 2, 16, 16, seed=4, p=6)
    rows = jnp.array([1, 0, 1, 0, 0, -1])
    q_pos = jnp.array([0, 0, 1, 1, 2, 0])
    starts = jnp.array([0, 0, 0, 1, 0, 0])
    got = _check(q, k, v, rows, q_pos, jnp.array([3, 2]), 0, starts)
    assert (np.asarray(got[5]) == 0).all() and np.abs(np.asarray(got[:5])).min(axis=(1, 2)).all()


def test_a_query_before_the_live_end_and_a_traced_window():
    q, k, v, live = _operands(4, 6, 2, 50, 32, seed=1)
    pos = jnp.maximum(live - 5, 0)  # slots past the query's position stay hidden (causal)
    for window in [0, 3]:
        _check(q, k, v, jnp.arange(4), pos, live, jnp.int32(window), fn=jax.jit(ca.cached_attention))


def test_a_row_that_sees_nothing_gives_zeros():
    q, k, v, _ = _operands(2, 4, 2, 16, 16)
    out = ca.cached_attention(q, k, v, jnp.arange(2), jnp.array([3, 5]), jnp.array([0, 6]), 0)
    assert (np.asarray(out[0]) == 0).all() and np.abs(np.asarray(out[1])).sum() > 0


def test_bad_operands_are_refused():
    q, k, v, live = _operands(2, 4, 2, 16, 16)
    rows = jnp.arange(2)
    with pytest.raises(InvalidInputError, match="cached_attention takes"):
        ca.cached_attention(q[..., :12], k[..., :12], v[..., :12], rows, live - 1, live, 0)
    with pytest.raises(InvalidInputError, match="cached_attention takes"):
        ca.cached_attention(q, k.astype(jnp.bfloat16), v, rows, live - 1, live, 0)
    with pytest.raises(InvalidInputError, match="cached_attention takes"):
        ca.cached_attention(q, k, v, rows[:1], live - 1, live, 0)


def _attend_hlo_and_out(q, k, v, lengths, mode):
    """attend's new_in_cache path (the T new keys already written at slots `lengths` ...)."""
    b, t = q.shape[:2]
    q_pos, valid = lengths[:, None] + jnp.arange(t), jnp.ones((b, t), bool)
    fn = jax.jit(lambda q, k, v, lengths: attend.attend(q, k[:, :, :t], v[:, :, :t], q_pos, valid, mode,
                                                        0, (k, v, lengths), new_in_cache=True, impl="reference"))
    return fn.lower(q, k, v, lengths).as_text(), fn(q, k, v, lengths), q_pos


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("mode, uses", [(masks.CAUSAL, True), (masks.BIDIRECTIONAL, False)])
def test_attend_runs_it_for_causal_queries_in_the_cache(mode, uses, t):
    b, s = 3, 48
    q = jax.random.normal(jax.random.PRNGKey(5), (b, t, 6, 32))
    _, k, v, live = _operands(b, 6, 2, s, 32, seed=2)
    lengths = jnp.maximum(live - t, 0)  # slots before the new tokens'
    hlo, out, q_pos = _attend_hlo_and_out(q, k, v, lengths, mode)
    assert (ca.TARGET in hlo) == uses
    slot_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    visible = masks.visibility(q_pos, slot_pos, slot_pos < (lengths + t)[:, None], mode, 0)
    want = gqa.attention(q, [(k, v, visible)])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-6, rtol=1e-5)
