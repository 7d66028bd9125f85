"""Which masked tokens to commit in a denoising step: the plug-in point for dLLM strategies.

A policy is a frozen (hashable, static under jit) dataclass with
`init_state(batch, block, vocab) -> pytree` (what it carries across steps, in the loop's state) and
`step(ctx: StepContext, knobs: dict, state) -> (commit bool [B, K], tokens int [B, K], state)`, given the
step's block logits, candidate tokens and confidences; `knobs` holds the traced scalars (temperature,
threshold, factor, ...), so changing them does not recompile. The loop ANDs `commit` with the masked
positions of active rows and writes `tokens` there. A stateless rule subclasses `Stateless` and only
defines `commit(ctx, knobs) -> bool [B, K]` (its tokens are the candidates).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pdx.decoding.diffusion.schedule import linear_schedule


class StepContext(NamedTuple):
    """What a policy sees at one denoising step (K = block size, V = vocab)."""

    logits: jax.Array  # [B, K, V] fp32 (after classifier-free guidance; the mask token's logit -inf)
    x0: jax.Array  # [B, K] candidate tokens (argmax, with Gumbel noise when temperature > 0)
    confidence: jax.Array  # [B, K] score of each candidate; -inf where the position is not masked
    masked: jax.Array  # [B, K] still-masked positions of active rows
    step: jax.Array  # scalar int32: denoising step inside the current block (0-based)
    noise: jax.Array  # [B, K, V] the Gumbel noise x0 was drawn with, times the temperature (zeros when greedy)
    decoded: jax.Array  # [B] fp32: share of the row's generated slots decoded before this step


class Stateless:
    """Base of the rules that need no memory across steps: `step` is `commit` with the candidates."""

    def init_state(self, batch: int, block: int, vocab: int):
        return ()

    def step(self, ctx: StepContext, knobs: dict, state):
        return self.commit(ctx, knobs), ctx.x0, state


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
