"""Mamba-2 state space duality (SSD): the chunked scan for prefill and the exact O(1) recurrence for decode.

Per head h the SSM is, with a scalar decay per step (A_h < 0, dt_t > 0):

    state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t B_t^T      # [P, N]
    y_t     = state_t C_t                                     # [P]

Heads come in `G` groups of `R = H / G` heads that share B and C (head h uses group h // R, as
`repeat_interleave` in the reference), so the einsums below keep the group axis `g` and the
head-in-group axis `r` apart instead of materialising B and C per head.

`ssd_chunked` evaluates this over a whole sequence in chunks of Q positions (the Mamba-2 paper's
minimal SSD algorithm): quadratic attention-like diagonal blocks inside each chunk, one state per
chunk, a linear recurrence across chunks, then the state-to-output term. `ssd_step` is one
recurrence step. A position with dt = 0 leaves the state untouched (decay exp(0) = 1, input 0):
that is how padding is kept out of the state.

Layout letters: b batch, t/l/s positions (l, s inside a chunk), c chunk, g group, r head in group,
h head (= g r), p head dim, n state size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def discretize_dt(dt: jax.Array, dt_bias: jax.Array, limit: tuple[float, float] = (0.0, float("inf"))) -> jax.Array:
    """Step sizes `softplus(dt + dt_bias)` clamped to `limit`, in fp32: `[..., H]` -> `[..., H]`.

    transformers and mamba_ssm clamp only in their chunked path, not in the single-token step. pdx
    clamps in both, so prefill, decode and speculative verify agree; with the default (0, inf),
    which released checkpoints use, the clamp is the identity and both agree with the reference.
    """
    dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    return jnp.clip(dt, limit[0], limit[1])


def _segsum(a: jax.Array) -> jax.Array:
    """`out[..., l, s] = sum_{s < k <= l} a[..., k]` for s <= l, -inf above the diagonal: `[..., Q]` -> `[..., Q, Q]`.

    Summing masked copies (not differencing one cumsum) keeps long chunks exact in fp32.
    """
    q = a.shape[-1]
    strict = jnp.tril(jnp.ones((q, q), bool), -1)
    s = jnp.cumsum(jnp.where(strict, a[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((q, q), bool)), s, -jnp.inf)


def ssd_chunked(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    chunk_size: int,
    initial_state: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Run the SSM over a sequence of any length; returns `(y [B, T, H, P], final_state [B, H, P, N] fp32)`.

    x: [B, T, H, P]; dt: [B, T, H] (already discretized, 0 at padding); A: [H] (negative);
    B, C: [B, T, G, N]; initial_state: [B, H, P, N] or None (zeros). The length is padded with
    dt = 0 up to a multiple of the chunk, which changes neither outputs nor the final state; a
    sequence shorter than `chunk_size` runs as one chunk of its own length.
    """
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    q = min(chunk_size, t)
    c = -(-t // q)
    pad = c * q - t
    f32 = jnp.float32

    def chunks(a):  # [B, T, ...] -> [B, C, Q, ...], zero-padded
        a = jnp.pad(a.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return a.reshape(b, c, q, *a.shape[2:])

    dt = chunks(dt).reshape(b, c, q, g, r)  # [B, C, Q, G, R]
    xdt = chunks(x).reshape(b, c, q, g, r, p) * dt[..., None]  # [B, C, Q, G, R, P]
    B, C = chunks(B), chunks(C)  # [B, C, Q, G, N]
    a = jnp.moveaxis(dt * A.astype(f32).reshape(g, r), 2, -1)  # [B, C, G, R, Q]: log-decay of each step
    a_cum = jnp.cumsum(a, axis=-1)  # [B, C, G, R, Q]

    with jax.named_scope("ssd_diagonal"):  # outputs from inputs of the same chunk
        decay = jnp.exp(_segsum(a))  # [B, C, G, R, L, S]
        scores = jnp.einsum("bclgn,bcsgn->bcgls", C, B)  # [B, C, G, L, S]
        y = jnp.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay, xdt)

    with jax.named_scope("ssd_chunk_states"):  # each chunk's inputs, decayed to the chunk's end
        to_end = jnp.exp(a_cum[..., -1:] - a_cum)  # [B, C, G, R, Q]
        states = jnp.einsum("bclgn,bcgrl,bclgrp->bcgrpn", B, to_end, xdt)  # [B, C, G, R, P, N]

    with jax.named_scope("ssd_inter_chunk"):  # linear recurrence over chunk boundaries
        s0 = jnp.zeros((b, g, r, p, n), f32) if initial_state is None else initial_state.astype(f32).reshape(
            b, g, r, p, n)

        def carry_over(s, inputs):
            chunk_decay, chunk_state = inputs  # [B, G, R], [B, G, R, P, N]
            return s * chunk_decay[..., None, None] + chunk_state, s

        final, starts = lax.scan(carry_over, s0, (jnp.moveaxis(jnp.exp(a_cum[..., -1]), 1, 0),
                                                  jnp.moveaxis(states, 1, 0)))
        starts = jnp.moveaxis(starts, 0, 1)  # [B, C, G, R, P, N]: state entering each chunk

    with jax.named_scope("ssd_state_output"):  # outputs from the state entering the chunk
        y = y + jnp.einsum("bclgn,bcgrpn,bcgrl->bclgrp", C, starts, jnp.exp(a_cum))

    y = y.reshape(b, c * q, h, p)[:, :t]
    return y.astype(x.dtype), final.reshape(b, h, p, n)


def ssd_step(
    state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One exact recurrence step, O(1) in the context length: returns `(y [B, H, P], state [B, H, P, N])`.

    state: [B, H, P, N] fp32; x: [B, H, P]; dt: [B, H] (discretized; 0 leaves the state as is);
    A: [H]; B, C: [B, G, N].
    """
    b, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    f32 = jnp.float32
    dt = dt.astype(f32).reshape(b, g, r)
    decay = jnp.exp(dt * A.astype(f32).reshape(g, r))  # [B, G, R]
    xdt = x.astype(f32).reshape(b, g, r, p) * dt[..., None]  # [B, G, R, P]
    s = state.astype(f32).reshape(b, g, r, p, n) * decay[..., None, None]
    s = s + jnp.einsum("bgrp,bgn->bgrpn", xdt, B.astype(f32))
    y = jnp.einsum("bgrpn,bgn->bgrp", s, C.astype(f32))
    return y.reshape(b, h, p).astype(x.dtype), s.reshape(b, h, p, n)
