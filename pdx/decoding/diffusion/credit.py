"""CreditDecoding (Wang et al. 2025, "Accelerating Parallel Decoding in Diffusion LLMs with Trace
Credits"): a token the model kept predicting at a position earns credit there, and credit raises its
probability, so a stable prediction commits steps earlier than its current confidence alone allows.

Per step, inside the current block (the paper's Eqs. for C_t and the fused logits; details as in the
same group's dInfer `CreditThresholdParallelDecoder`): every credit decays by beta (none on the block's
first step, where credits start at 0); at each masked position the current top-1 token gains p^gamma;
the fused logits are l + alpha * log(1 + C); candidates and confidences come from the fused
distribution, and a masked position commits if its fused confidence is >= min(tau, max - 1e-5) (so the
most confident one always does). Credits are `[B, K, V]` in the loop's state and reset at each block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pdx.decoding import registry
from pdx.decoding.diffusion import core, policies
from pdx.decoding.result import GenerationResult

TIE = 1e-5  # the reference commits every position within this of the best one


@dataclasses.dataclass(frozen=True)
class Credit:
    """Knobs: `threshold` (tau), `alpha` (fusion strength), `beta` (decay), `gamma` (boost exponent)."""

    def init_state(self, batch: int, block: int, vocab: int):
        return jnp.zeros((batch, block, vocab), jnp.float32)

    def step(self, ctx: policies.StepContext, knobs: dict, credit):
        probs = jax.nn.softmax(ctx.logits, axis=-1)  # [B, K, V]
        top = jnp.argmax(probs, axis=-1)  # [B, K]: the raw top-1, no noise
        boost = jnp.where(ctx.masked, jnp.max(probs, axis=-1) ** knobs["gamma"], 0.0)
        credit = jnp.where(ctx.step == 0, 0.0, knobs["beta"] * credit)
        credit += boost[..., None] * jax.nn.one_hot(top, probs.shape[-1], dtype=credit.dtype)
        fused = ctx.logits + knobs["alpha"] * jnp.log1p(credit)
        tokens = jnp.argmax(fused + ctx.noise, axis=-1).astype(jnp.int32)  # [B, K]
        conf = jnp.take_along_axis(jax.nn.softmax(fused, axis=-1), tokens[..., None], axis=-1)[..., 0]
        conf = jnp.where(ctx.masked, conf, -jnp.inf)
        bar = jnp.minimum(jnp.max(conf, axis=-1, keepdims=True) - TIE, knobs["threshold"])  # [B, 1]
        return ctx.masked & (conf >= bar), tokens, credit


@registry.strategy("credit")
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 32, seed: int = 0, block_size: int = 32,
             threshold: float = 0.9, alpha: float = 0.7, beta: float = 0.8, gamma: float = 0.2, cache: str = "none",
             temperature: float = 0.0, cfg_scale: float = 0.0, attention: str = "bidirectional",
             prompt_bucket: int = 16) -> GenerationResult:
    """CreditDecoding (defaults: alpha 0.7, beta 0.8, gamma 0.2, as dInfer ships them); every knob is traced."""
    core.check_shape(max_new_tokens, block_size)
    core.validate_threshold(threshold)
    return core.run(model, prompts, max_new_tokens=max_new_tokens, seed=seed, block_size=block_size, policy=Credit(),
                    cache=cache, attention=attention, temperature=temperature, threshold=threshold,
                    cfg_scale=cfg_scale, prompt_bucket=prompt_bucket, knobs=dict(alpha=alpha, beta=beta, gamma=gamma))
