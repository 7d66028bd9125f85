"""LLaDA reference decoding (Nie et al. 2025): semi-autoregressive blocks, a fixed number of steps
per block with the linear tokens-per-step schedule, low-confidence or random remasking, Gumbel-noise
temperature and classifier-free guidance."""

from __future__ import annotations

from pdx.decoding import registry
from pdx.decoding.diffusion import core, policies
from pdx.decoding.result import GenerationResult


@registry.strategy("llada")
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 32, seed: int = 0, steps: int | None = None,
             block_size: int | None = None, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", cache: str = "none", attention: str = "bidirectional",
             prompt_bucket: int = 16) -> GenerationResult:
    """LLaDA sampling. `steps` defaults to `max_new_tokens` (one token per step, the quality baseline),
    `block_size` to `max_new_tokens` (one block). `cache` ("none" | "prefix" | "dual") runs Fast-dLLM's
    KV caches under the same fixed schedule."""
    block_size = block_size or max_new_tokens
    steps = steps or max_new_tokens
    core.check_shape(max_new_tokens, block_size)
    per_block = core.validate_steps(steps, max_new_tokens, block_size)
    return core.run(model, prompts, max_new_tokens=max_new_tokens, seed=seed, block_size=block_size,
                    policy=policies.Schedule(block_size, per_block), remasking=remasking, cache=cache,
                    attention=attention, temperature=temperature, cfg_scale=cfg_scale, prompt_bucket=prompt_bucket)
