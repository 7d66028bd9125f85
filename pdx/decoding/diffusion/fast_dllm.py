"""Fast-dLLM (Wu et al. 2025): confidence-aware parallel decoding (threshold or factor rule) with
block-wise prefix / dual KV caches refreshed at every block start."""

from __future__ import annotations

from pdx.decoding import registry
from pdx.decoding.diffusion import core, policies
from pdx.decoding.result import GenerationResult
from pdx.errors import require


@registry.strategy("fast-dllm")
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 32, seed: int = 0, block_size: int = 32,
             threshold: float = 0.9, factor: float | None = None, cache: str = "dual", temperature: float = 0.0,
             remasking: str = "low_confidence", cfg_scale: float = 0.0, attention: str = "bidirectional",
             prompt_bucket: int = 16) -> GenerationResult:
    """Commit every masked token of the current block whose confidence is >= `threshold` (at least
    one per step); with `factor` set, use the factor rule instead. Threshold, factor and temperature
    are traced: changing them reuses the compiled program."""
    core.check_shape(max_new_tokens, block_size)
    if factor is None:
        core.validate_threshold(threshold)
        policy = policies.Threshold()
    else:
        require(factor > 0, f"factor must be > 0, got {factor}")
        policy = policies.Factor()
    return core.run(model, prompts, max_new_tokens=max_new_tokens, seed=seed, block_size=block_size, policy=policy,
                    remasking=remasking, cache=cache, attention=attention, temperature=temperature,
                    threshold=threshold, factor=factor or 1.0, cfg_scale=cfg_scale, prompt_bucket=prompt_bucket)
