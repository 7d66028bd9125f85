"""Attention patterns, shared by the kernels and the models (a leaf: imports nothing from pdx but errors).

Every attention call is described by query positions, key positions and key validity; the mask
mode turns those into a boolean `[B, T, S]` visibility mask. `NEG_INF` is the masked score.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pdx.errors import InvalidInputError

NEG_INF = -1e30  # finite, so fully masked rows give a uniform softmax instead of NaN


@dataclasses.dataclass(frozen=True)
class MaskMode:
    """Static description of an attention pattern.

    kind: "causal", "bidirectional" (dLLM) or "block_causal" (block diffusion: causal across
    blocks of `block_size` positions, bidirectional inside one). A per-layer sliding window
    (from the model config) is applied on top of any kind.
    """

    kind: str = "causal"
    block_size: int = 0

    def __post_init__(self):
        if self.kind not in ("causal", "bidirectional", "block_causal"):
            raise InvalidInputError(
                f"unknown mask mode {self.kind!r}; use 'causal', 'bidirectional' or MaskMode('block_causal', n)"
            )
        if (self.kind == "block_causal") != (self.block_size > 0):
            raise InvalidInputError("block_size > 0 is required for, and only for, mask mode 'block_causal'")


CAUSAL = MaskMode("causal")
BIDIRECTIONAL = MaskMode("bidirectional")


def as_mask_mode(mode: str | MaskMode) -> MaskMode:
    return mode if isinstance(mode, MaskMode) else MaskMode(mode)


def pair_visible(
    q: jax.Array, k: jax.Array, mode: MaskMode, window: jax.Array | int, sinks: jax.Array | int = 0
) -> jax.Array:
    """Elementwise mask rule on broadcastable query/key positions (the Pallas kernels apply it per block).

    `window` is the sliding-window length (a key is visible iff `q - k < window`); 0 means none.
    The first `sinks` positions stay visible outside the window (StreamingLLM sink tokens).
    """
    if mode.kind == "causal":
        visible = k <= q
    elif mode.kind == "block_causal":
        visible = (k // mode.block_size) <= (q // mode.block_size)
    else:
        visible = jnp.ones(jnp.broadcast_shapes(jnp.shape(q), jnp.shape(k)), bool)
    window = jnp.asarray(window)
    return visible & ((window <= 0) | (q - k < window) | (k < sinks))


def visibility(
    q_pos: jax.Array,
    k_pos: jax.Array,
    k_valid: jax.Array,
    mode: MaskMode,
    window: jax.Array | int,
    sinks: jax.Array | int = 0,
) -> jax.Array:
    """Boolean `[B, T, S]`: may the query at `q_pos [B, T]` see the key at `k_pos [B, S]`?

    `window` and `sinks` may be traced, so layers with different windows share one scanned
    program; see `pair_visible` for the rule.
    """
    return pair_visible(q_pos[:, :, None], k_pos[:, None, :], mode, window, sinks) & k_valid[:, None, :]
