"""Which masked tokens to commit in a denoising step: the plug-in point for dLLM strategies.

A policy is a frozen (hashable, static under jit) dataclass with
`init_state(batch, slots, vocab) -> pytree` (what it carries across steps, in the loop's state) and
`step(ctx: StepContext, knobs: dict, state) -> (commit bool [B, A], tokens int [B, A], state)`, given the
step's logits, candidate tokens and confidences over the A slots from the block start; `knobs` holds the
traced scalars (temperature, threshold, factor, ...), so changing them does not recompile. The loop ANDs
`commit` with the masked slots ahead (`ctx.ahead`: the block's, unless the strategy has a lookahead) and
writes `tokens` there. A rule with no memory that commits inside the block subclasses `Stateless` and only
defines `commit(ctx, knobs) -> bool [B, A]` (its tokens are the candidates).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pdx.decoding.diffusion.schedule import linear_schedule


class StepContext(NamedTuple):
    """What a policy sees at one denoising step: the A slots from the block start, A = the block size K
    unless the strategy asks for a lookahead (`core.Spec.lookahead`); V = vocab."""

    logits: jax.Array  # [B, A, V] fp32 (after classifier-free guidance; the mask token's logit -inf)
    x0: jax.Array  # [B, A] candidate tokens (argmax, with Gumbel noise when temperature > 0)
    confidence: jax.Array  # [B, A] score of each candidate; -inf where the slot is not masked in the block
    masked: jax.Array  # [B, A] still-masked slots of the current block, in active rows
    step: jax.Array  # int32 denoising step inside the current block (0-based): scalar, or [B] where blocks are per row
    noise: jax.Array  # [B, A, V] the Gumbel noise x0 was drawn with, times the temperature (zeros when greedy)
    decoded: jax.Array  # [B] fp32: share of the row's generated slots decoded before this step
    ahead: jax.Array  # [B, A] still-masked slots from the block start on (the block's and later ones)
    t: jax.Array  # scalar int32: denoising step of the whole decode (0-based)


class Stateless:
    """Base of the rules that need no memory across steps: `step` is `commit` with the candidates."""

    def init_state(self, batch: int, block: int, vocab: int):
        return ()

    def step(self, ctx: StepContext, knobs: dict, state):
        return self.commit(ctx, knobs) & ctx.masked, ctx.x0, state


def top_k_mask(confidence: jax.Array, k: jax.Array) -> jax.Array:
    """Bool `[B, K]`: the `k[b]` highest-confidence positions of each row (ties go to the lower index)."""
    order = jnp.argsort(-confidence, axis=-1, stable=True)  # [B, K]
    ranks = jnp.argsort(order, axis=-1, stable=True)  # rank of each position
    return ranks < k[:, None]


@dataclasses.dataclass(frozen=True)
class Schedule(Stateless):
    """LLaDA: commit a fixed number of tokens per step, the linear schedule of K tokens over `steps` steps."""

    block_size: int
    steps: int

    def commit(self, ctx: StepContext, knobs: dict) -> jax.Array:
        counts = jnp.asarray(linear_schedule(self.block_size, self.steps))  # [steps]
        k = jnp.broadcast_to(counts[jnp.minimum(ctx.step, self.steps - 1)], ctx.masked.shape[:1])
        return top_k_mask(ctx.confidence, k)


@dataclasses.dataclass(frozen=True)
class Threshold(Stateless):
    """Fast-dLLM: commit every masked token with confidence >= `knobs['threshold']`, at least the best one."""

    def commit(self, ctx: StepContext, knobs: dict) -> jax.Array:
        above = ctx.masked & (ctx.confidence >= knobs["threshold"])  # [B, K]
        return top_k_mask(ctx.confidence, jnp.maximum(above.sum(-1), 1))


@dataclasses.dataclass(frozen=True)
class Factor(Stateless):
    """Fast-dLLM factor rule: commit the n best tokens where each i-th best (1-based) has
    confidence >= 1 - factor / (i + 1), i.e. (n + 1)(1 - c_n) < factor; at least one."""

    def commit(self, ctx: StepContext, knobs: dict) -> jax.Array:
        ranked = -jnp.sort(-ctx.confidence, axis=-1)  # [B, K] descending; unmasked (-inf) last
        i = jnp.arange(1, ranked.shape[-1] + 1, dtype=jnp.float32)
        ok = ranked >= 1.0 - knobs["factor"] / (i + 1.0)  # monotone: true on a prefix
        return top_k_mask(ctx.confidence, jnp.maximum(ok.sum(-1), 1))
