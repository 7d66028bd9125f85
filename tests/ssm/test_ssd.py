"""SSD: the chunked scan against the step recurrence, a NumPy recurrence and transformers' torch chunk scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pdx.ssm.ssd import discretize_dt, ssd_chunked, ssd_step

ATOL = 1e-5  # fp32; outputs and states are O(1)


def random_inputs(seed, b, t, h, p, g, n):
    """x, raw dt, dt_bias, A, B, C, initial state, as the model produces them (NumPy: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    dt_bias = jnp.asarray(rng.uniform(-3.0, 0.0, h), jnp.float32)
    A = -jnp.exp(jnp.asarray(rng.uniform(0.0, 2.5, h), jnp.float32))
    return f(b, t, h, p), f(b, t, h), dt_bias, A, f(b, t, g, n), f(b, t, g, n), f(b, h, p, n)


chunked = jax.jit(ssd_chunked, static_argnums=5)  # one compiled program per test instead of op-by-op dispatch


@jax.jit
def run_steps(x, dt, A, B, C, s0):
    """ssd_step over every position: (y [B, T, H, P], final state)."""
    def step(s, inputs):
        s_y = ssd_step(s, *inputs[:2], A, *inputs[2:])
        return s_y[1], s_y[0]

    final, y = jax.lax.scan(step, s0, tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)))
    return jnp.moveaxis(y, 0, 1), final


def test_step_matches_numpy_recurrence():
    b, h, p, g, n = 2, 4, 3, 2, 5
    x, dt_raw, dt_bias, A, B, C, s0 = random_inputs(0, b, 1, h, p, g, n)
    dt = discretize_dt(dt_raw, dt_bias)[:, 0]
    y, s = jax.jit(ssd_step)(s0, x[:, 0], dt, A, B[:, 0], C[:, 0])
    x, dt, A, B, C, s0 = (np.asarray(a, np.float64) for a in (x[:, 0], dt, A, B[:, 0], C[:, 0], s0))
    ref_s = np.empty_like(s0)
    ref_y = np.empty_like(x)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)  # heads are grouped contiguously, as repeat_interleave does
            ref_s[bi, hi] = np.exp(dt[bi, hi] * A[hi]) * s0[bi, hi] + dt[bi, hi] * np.outer(x[bi, hi], B[bi, gi])
            ref_y[bi, hi] = ref_s[bi, hi] @ C[bi, gi]
    np.testing.assert_allclose(np.asarray(s), ref_s, atol=ATOL)
    np.testing.assert_allclose(np.asarray(y), ref_y, atol=ATOL)


@pytest.mark.parametrize("t,chunk,h,g,n,init", [
    (13, 4, 4, 1, 8, False),  # chunk does not divide the length
    (13, 4, 4, 2, 8, True),  # groups, initial state
    (16, 8, 6, 3, 4, True),  # chunk divides the length
    (5, 16, 4, 4, 16, True),  # shorter than one chunk
    (1, 4, 2, 1, 4, True),
])
def test_chunked_equals_step_by_step(t, chunk, h, g, n, init):
    x, dt_raw, dt_bias, A, B, C, s0 = random_inputs(t + g, 2, t, h, 3, g, n)
    s0 = s0 if init else jnp.zeros_like(s0)
    dt = discretize_dt(dt_raw, dt_bias)
    y, final = chunked(x, dt, A, B, C, chunk, s0 if init else None)
    ref_y, ref_final = run_steps(x, dt, A, B, C, s0)
    assert y.shape == x.shape and final.shape == s0.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=ATOL)
    np.testing.assert_allclose(np.asarray(final), np.asarray(ref_final), atol=ATOL)


@pytest.mark.parametrize("t,chunk,g", [(11, 4, 1), (11, 4, 2), (8, 8, 2)])
def test_chunked_matches_transformers_chunk_scan(t, chunk, g):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    h, p, n = 4, 3, 6
    x, dt_raw, dt_bias, A, B, C, s0 = random_inputs(7, 2, t, h, p, g, n)
    limit = (0.05, 0.5)  # a limit that binds, to check the clamp too
    to_t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    ref_y, ref_final = mamba2_chunk_scan(to_t(x), to_t(dt_raw), to_t(A), to_t(B), to_t(C), chunk, dt_bias=to_t(dt_bias),
                                         initial_states=to_t(s0), dt_softplus=True, dt_limit=limit,
                                         return_final_states=True)
    y, final = chunked(x, discretize_dt(dt_raw, dt_bias, limit), A, B, C, chunk, s0)
    np.testing.assert_allclose(np.asarray(y), ref_y.numpy(), atol=ATOL)
    np.testing.assert_allclose(np.asarray(final), ref_final.numpy(), atol=ATOL)


def test_zero_dt_positions_leave_the_state_untouched():
    """Padding (dt = 0) anywhere in the sequence: same state and outputs at real positions as without it."""
    x, dt_raw, dt_bias, A, B, C, s0 = random_inputs(3, 1, 10, 4, 3, 2, 4)
    dt = discretize_dt(dt_raw, dt_bias)
    keep = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 0], bool)
    y_pad, final_pad = chunked(x, jnp.where(keep[None, :, None], dt, 0.0), A, B, C, 4, s0)
    y, final = chunked(x[:, keep], dt[:, keep], A, B[:, keep], C[:, keep], 4, s0)
    np.testing.assert_allclose(np.asarray(final_pad), np.asarray(final), atol=ATOL)
    # a real position's output needs its own dt; outputs at kept positions match
    np.testing.assert_allclose(np.asarray(y_pad[:, keep]), np.asarray(y), atol=ATOL)


def test_discretize_dt_softplus_bias_and_clamp():
    dt = jnp.array([[-30.0, 0.0, 2.0, 30.0]])
    bias = jnp.array([0.0, 0.5, -1.0, 0.0])
    np.testing.assert_allclose(np.asarray(discretize_dt(dt, bias)), np.log1p(np.exp([[-30.0, 0.5, 1.0, 30.0]])),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(discretize_dt(dt, bias, (0.5, 2.0))),
                               np.clip(np.log1p(np.exp([[-30.0, 0.5, 1.0, 30.0]])), 0.5, 2.0), rtol=1e-6)
