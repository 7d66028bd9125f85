"""Causal depthwise conv1d with a rolling state, as Mamba blocks use it before the SSM.

The state of a row is its last `K - 1` inputs (oldest first), so a sequence can be fed in pieces:
`causal_conv1d` over a whole chunk (prefill) or `causal_conv1d_step` for one token (decode) give
the same outputs as one pass over the concatenation. Weights are `[C, K]` (PyTorch's depthwise
`[C, 1, K]` squeezed); output t is `sum_k w[:, k] * input[t - K + 1 + k] + bias`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def window_after(padded: jax.Array, n: jax.Array, width: int) -> jax.Array:
    """Rows' last `width` inputs after consuming `n [B]` new ones: `padded [B, width + T, C]` -> `[B, width, C]`.

    `padded` is the old state followed by the T new inputs, so the window ends at index width + n.
    """
    return jax.vmap(lambda row, start: lax.dynamic_slice_in_dim(row, start, width, axis=0))(padded, n)


def causal_conv1d(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    state: jax.Array | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Convolve `x [B, T, C]` after `state [B, K-1, C]` (None: zeros); returns `(y [B, T, C], state [B, K-1, C])`.

    `valid [B, T]` is a per-row prefix of real tokens: the new state holds each row's last K - 1
    real inputs, as if the padding had never been fed.
    """
    b, t, ch = x.shape
    k = weight.shape[-1]
    if state is None:
        state = jnp.zeros((b, k - 1, ch), x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
    w = weight.astype(x.dtype)
    y = sum(padded[:, i : i + t] * w[:, i] for i in range(k))  # [B, T, C]
    if bias is not None:
        y = y + bias.astype(x.dtype)
    if valid is None:
        new_state = padded[:, t:]
    else:
        new_state = window_after(padded, valid.sum(-1, dtype=jnp.int32), k - 1)
    return y, new_state


def causal_conv1d_step(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, state: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One token: `x [B, C]`, `state [B, K-1, C]` -> `(y [B, C], state [B, K-1, C])`, O(1) in the context."""
    window = jnp.concatenate([state.astype(x.dtype), x[:, None]], axis=1)  # [B, K, C]
    y = jnp.einsum("bkc,ck->bc", window, weight.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y, window[:, 1:]
