"""CD4LM's confidence-adaptive decoding, CAD (Liang et al. 2026), the training-free rule alone (its
distilled student belongs with the trained accelerators).

Per step, inside the current block (the authors' `generate_block`): while less than `eos_ratio` of
the generated slots are decoded, a position whose candidate is an EOS token may not commit; of the
others, the k most confident commit, k = clip(#{confidence >= tau}, 1, max_per_step). If every masked
position of the block is held back that way, the leftmost commits (the reference's deadlock guard).
The reference's softmax over max-shifted logits clipped to [-50, 50] changes probabilities below
e^-50 only, which no commit decision reads. Defaults are the paper's runs: tau 0.95, at most 32 per
step, EOS held back for the first 30%.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pdx.decoding import registry
from pdx.decoding.diffusion import core, policies
from pdx.decoding.result import GenerationResult


@dataclasses.dataclass(frozen=True)
class ConfidenceAdaptive(policies.Stateless):
    """Knobs: `threshold` (tau), `max_per_step`, `eos_ratio`. `eos_ids`: the tokens held back early."""

    eos_ids: tuple[int, ...]

    def commit(self, ctx: policies.StepContext, knobs: dict) -> jax.Array:
        early = ctx.decoded < knobs["eos_ratio"]  # [B]
        held = early[:, None] & jnp.isin(ctx.x0, jnp.asarray(self.eos_ids, jnp.int32))  # [B, K]
        valid = ctx.masked & ~held
        conf = jnp.where(valid, ctx.confidence, -jnp.inf)
        above = jnp.sum(valid & (conf >= knobs["threshold"]), axis=-1)  # [B]
        k = jnp.minimum(jnp.maximum(above, 1), knobs["max_per_step"].astype(jnp.int32))
        chosen = policies.top_k_mask(conf, k) & valid
        leftmost = ctx.masked & (jnp.cumsum(ctx.masked, axis=-1) == 1)
        return jnp.where(jnp.any(valid, axis=-1, keepdims=True), chosen, leftmost)


@registry.strategy("cd4lm-cad")
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 32, seed: int = 0, block_size: int = 32,
             threshold: float = 0.95, max_per_step: int = 32, eos_ratio: float = 0.3, cache: str = "none",
             temperature: float = 0.0, cfg_scale: float = 0.0, attention: str = "bidirectional",
             prompt_bucket: int = 16) -> GenerationResult:
    """CAD decoding; `threshold`, `max_per_step` and `eos_ratio` are traced."""
    core.check_shape(max_new_tokens, block_size)
    core.validate_threshold(threshold)
    policy = ConfidenceAdaptive(tuple(model.cfg.eos_token_ids))
    return core.run(model, prompts, max_new_tokens=max_new_tokens, seed=seed, block_size=block_size, policy=policy,
                    cache=cache, attention=attention, temperature=temperature, threshold=threshold,
                    cfg_scale=cfg_scale, prompt_bucket=prompt_bucket,
                    knobs=dict(max_per_step=max_per_step, eos_ratio=eos_ratio))
