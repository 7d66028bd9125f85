"""Prophet (Li et al. 2025, "Diffusion Language Models Know the Answer Before Decoding"): early commit.
LLaDA's fixed schedule decodes as usual until the model is sure of the whole remaining answer; then
every masked slot left, later blocks included, takes its current candidate at once ("all-in") and
decoding stops.

Per step (the authors' `generate_earlyexit`): the confidence gap g = top-1 minus top-2 logit (Eq. 4; a
logit gap equals the log-probability gap), averaged over the answer slots, against a threshold that
falls with progress p = (step + 1) / total steps: `early` while p < 0.33, `mid` while p < 0.67, `late`
after (7.5 / 5 / 2.5 by default, the paper's). The authors locate the answer with a task-specific suffix
prompt and average over a fixed 5-token window after it; pdx's workloads have no such anchor, so the
gap is averaged over the slots the all-in would commit (every masked slot from the current block to the
end of the answer), which is what the test decides. The pass reads those slots' logits (`Spec.lookahead`
= the answer), so a dual cache reads no stale suffix here: the window covers it, as in prefix mode.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from pdx.decoding import registry
from pdx.decoding.diffusion import core, policies
from pdx.decoding.result import GenerationResult
from pdx.errors import require

STAGES = (0.33, 0.67)  # progress where the early threshold gives way to the mid one, and the mid to the late


@dataclasses.dataclass(frozen=True)
class Prophet:
    """`base` commits inside the block until the mean gap reaches the stage's threshold (knobs `early`,
    `mid`, `late`); `total_steps` is the step budget progress is measured against."""

    base: policies.Schedule
    total_steps: int

    def init_state(self, batch: int, slots: int, vocab: int):
        return ()

    def step(self, ctx: policies.StepContext, knobs: dict, state):
        commit, tokens, _ = self.base.step(ctx, knobs, ())
        top2 = lax.top_k(ctx.logits, 2)[0]  # [B, A, 2]
        gap = top2[..., 0] - top2[..., 1]  # [B, A]
        left = jnp.sum(ctx.ahead, axis=-1)  # [B]
        mean = jnp.sum(jnp.where(ctx.ahead, gap, 0.0), axis=-1) / jnp.maximum(left, 1)
        progress = (ctx.t + 1) / self.total_steps
        bar = jnp.where(progress < STAGES[0], knobs["early"], jnp.where(progress < STAGES[1], knobs["mid"],
                                                                        knobs["late"]))
        all_in = ((mean >= bar) & (left > 0))[:, None]  # [B, 1]
        return jnp.where(all_in, ctx.ahead, commit), jnp.where(all_in, ctx.x0, tokens), state


@registry.strategy("prophet")
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 32, seed: int = 0, steps: int | None = None,
             block_size: int = 32, early: float = 7.5, mid: float = 5.0, late: float = 2.5, cache: str = "none",
             temperature: float = 0.0, cfg_scale: float = 0.0, attention: str = "bidirectional",
             prompt_bucket: int = 16) -> GenerationResult:
    """Prophet over LLaDA's schedule (`steps` in all, default one token per step); the thresholds are
    traced logit gaps."""
    steps = steps or max_new_tokens
    core.check_shape(max_new_tokens, block_size)
    per_block = core.validate_steps(steps, max_new_tokens, block_size)
    require(early >= mid >= late, f"the thresholds must not rise with progress: early {early}, mid {mid}, late {late}")
    policy = Prophet(policies.Schedule(block_size, per_block), steps)
    return core.run(model, prompts, max_new_tokens=max_new_tokens, seed=seed, block_size=block_size, policy=policy,
                    cache=cache, attention=attention, temperature=temperature, cfg_scale=cfg_scale,
                    prompt_bucket=prompt_bucket, lookahead=max_new_tokens, knobs=dict(early=early, mid=mid, late=late))
