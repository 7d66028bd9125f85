"""Logit processing and token choice, with HF-compatible semantics and every knob traced.

Order (as transformers applies them): repetition penalty, then for sampling temperature, top-k,
top-p, min-p. Greedy (temperature == 0) takes the argmax of the penalized logits. All knobs are
arrays, so changing them never recompiles; `lax.cond` skips the vocabulary sort when greedy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pdx.errors import InvalidInputError, require


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    """Traced sampling knobs (scalars, shared by the batch). Neutral values disable each one."""

    temperature: jax.Array  # 0 = greedy
    top_k: jax.Array  # 0 = off
    top_p: jax.Array  # 1 = off
    min_p: jax.Array  # 0 = off
    repetition_penalty: jax.Array  # 1 = off

    @classmethod
    def create(cls, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0) -> SamplingParams:
        """Validated params; raises `InvalidInputError` on out-of-range values."""
        require(temperature >= 0, f"temperature must be >= 0, got {temperature}")
        require(isinstance(top_k, int) and top_k >= 0, f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        require(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
        require(0 <= min_p < 1, f"min_p must be in [0, 1), got {min_p}")
        require(repetition_penalty > 0, f"repetition_penalty must be > 0, got {repetition_penalty}")
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        return cls(f32(temperature), jnp.asarray(top_k, jnp.int32), f32(top_p), f32(min_p), f32(repetition_penalty))


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF rule: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def filter_logits(logits: jax.Array, p: SamplingParams) -> jax.Array:
    """Temperature-scaled logits `[B, V]` with tokens outside top-k / top-p / min-p set to -inf."""
    logits = logits / p.temperature
    order = jnp.argsort(-logits, axis=-1)  # [B, V] descending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])
    keep = (p.top_k <= 0) | (rank < p.top_k)  # [V] -> broadcast
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < p.top_p) | (rank == 0)
    keep &= probs >= p.min_p * probs[:, :1]
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(sorted_logits, inverse, axis=-1)


def choose(logits: jax.Array, key: jax.Array, p: SamplingParams, seen: jax.Array | None = None) -> jax.Array:
    """Next tokens `[B]` from fp32 logits `[B, V]`: greedy when temperature is 0, else sampled."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    return lax.cond(
        p.temperature > 0,
        lambda: jax.random.categorical(key, filter_logits(logits, p), axis=-1).astype(jnp.int32),
        lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
    )


def check_token_ids(prompts: list[list[int]], vocab_size: int) -> None:
    """API-edge validation of prompt token ids."""
    require(isinstance(prompts, (list, tuple)) and len(prompts) > 0, "prompts must be a non-empty list of id lists")
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise InvalidInputError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in ids if not (isinstance(t, int) or hasattr(t, "__index__")) or not 0 <= int(t) < vocab_size]
        if bad:
            raise InvalidInputError(f"prompt {i} has token ids out of range [0, {vocab_size}): {bad[:5]}")
