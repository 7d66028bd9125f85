"""LocalLeap (Kong et al. 2025, "Accelerating Diffusion LLM Inference via Local Determinism
Propagation"): high-confidence anchors license their neighbours at a relaxed threshold.

Per step, inside the current block (the authors' `get_transfer_index`): anchors are the still-masked
positions with confidence >= tau; a masked position commits if its confidence is >= tau, or >= tau' and
it lies within r positions of an anchor; the most confident masked position always commits. One hop
per step: a neighbour committed at tau' does not anchor others in the same step. With no anchor the
rule is Fast-dLLM's threshold rule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pdx.decoding import registry
from pdx.decoding.diffusion import core, policies
from pdx.decoding.result import GenerationResult
from pdx.errors import require


@dataclasses.dataclass(frozen=True)
class LocalLeap(policies.Stateless):
    """Knobs: `threshold` (tau), `relaxed_threshold` (tau'), `radius` (r, in positions)."""

    def commit(self, ctx: policies.StepContext, knobs: dict) -> jax.Array:
        conf, k = ctx.confidence, ctx.confidence.shape[-1]  # [B, K], -inf where not masked
        anchor = ctx.masked & (conf >= knobs["threshold"])  # [B, K]
        offsets = jnp.abs(jnp.arange(k)[:, None] - jnp.arange(k)[None, :])  # [K, K]
        near = jnp.any(anchor[:, None, :] & (offsets <= knobs["radius"])[None], axis=-1)  # [B, K]
        rule = anchor | (near & (conf >= knobs["relaxed_threshold"]))
        return rule | policies.top_k_mask(conf, jnp.ones(conf.shape[:1], jnp.int32))


@registry.strategy("localleap")
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 32, seed: int = 0, block_size: int = 32,
             threshold: float = 0.9, relaxed_threshold: float = 0.75, radius: int = 4, cache: str = "none",
             temperature: float = 0.0, cfg_scale: float = 0.0, attention: str = "bidirectional",
             prompt_bucket: int = 16) -> GenerationResult:
    """LocalLeap decoding (defaults: the authors' tau = 0.9, tau' = 0.75, r = 4); every knob is traced."""
    core.check_shape(max_new_tokens, block_size)
    core.validate_threshold(threshold)
    require(0 < relaxed_threshold <= threshold,
            f"relaxed_threshold must be in (0, threshold = {threshold}], got {relaxed_threshold}")
    return core.run(model, prompts, max_new_tokens=max_new_tokens, seed=seed, block_size=block_size,
                    policy=LocalLeap(), cache=cache, attention=attention, temperature=temperature,
                    threshold=threshold, cfg_scale=cfg_scale, prompt_bucket=prompt_bucket,
                    knobs=dict(relaxed_threshold=relaxed_threshold, radius=radius))
