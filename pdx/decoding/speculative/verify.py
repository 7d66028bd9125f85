"""Acceptance rules: exact match for greedy, lossless rejection sampling otherwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pdx.decoding.sampling import SamplingParams, filter_logits


def leading_true(mask: jax.Array) -> jax.Array:
    """Number of leading True values per row of `mask [B, K]`."""
    return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=-1), axis=-1)


def verify_greedy(logits: jax.Array, drafts: jax.Array, n_draft: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Accept the longest prefix of `drafts [B, K]` equal to the target's argmax.

    logits [B, K+1, V]: position i scores the token after (last, d_1..d_i). Returns the number
    accepted `n [B]` (<= n_draft) and the token that follows them (correction or bonus) `[B]`.
    """
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, K+1]
    k = drafts.shape[1]
    n = leading_true((drafts == target[:, :k]) & (jnp.arange(k) < n_draft[:, None]))
    return n, jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]


def target_probs(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
    """Sampling distribution `[B, K+1, V]` of the target at every verified position."""
    b, t, v = logits.shape
    return jax.nn.softmax(filter_logits(logits.reshape(b * t, v), sampling), axis=-1).reshape(b, t, v)


def verify_sampling(logits, drafts, n_draft, draft_probs, sampling: SamplingParams, key):
    """Lossless speculative sampling (Leviathan et al.; Chen et al.).

    Draft token d_i, proposed with probability q_i(d_i), is accepted with probability
    min(1, p_i(d_i) / q_i(d_i)); at the first rejection the next token is drawn from
    normalize(max(0, p_i - q_i)); if all n_draft are accepted a bonus token comes from p. The
    output is distributed exactly as sampling from the target alone.

    draft_probs [B, K, V]: the drafter's proposal distributions (one-hot for deterministic drafters).
    """
    b, k = drafts.shape
    p = target_probs(logits, sampling)  # [B, K+1, V]
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, K]
    q_d = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    key_accept, key_next = jax.random.split(key)
    u = jax.random.uniform(key_accept, (b, k))
    n = leading_true((u * q_d < p_d) & (jnp.arange(k) < n_draft[:, None]))
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]  # [B, V]
    q_padded = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
    q_n = jnp.take_along_axis(q_padded, n[:, None, None], axis=1)[:, 0]
    rejected = (n < n_draft)[:, None]
    residual = jnp.where(rejected, jnp.maximum(p_n - q_n, 0.0), p_n)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_n)  # p == q: rejection had prob 0
    nxt = jax.random.categorical(key_next, jnp.log(residual), axis=-1).astype(jnp.int32)
    return n, nxt
