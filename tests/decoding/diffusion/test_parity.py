"""dLLM decoding vs the PyTorch reference (tests/reference/llada_torch.py) on the same random Llama.

Parity is exact: the same committed tokens at the same steps (`commit_step`), for LLaDA's fixed
schedule (with classifier-free guidance), threshold and factor decoding, and for the prefix / dual
caches under block-causal attention, where caching is exact.
"""

import jax
import numpy as np
import pytest

from pdx.decoding.diffusion import core, fast_dllm, llada
from tests.decoding.diffusion.tiny_llama import EOS, MASK, PAD, PROMPTS, check_against_reference


def test_llada_schedule_with_guidance_matches_torch(models):
    model, ref = models
    result = llada.generate(model, PROMPTS, max_new_tokens=16, steps=6, block_size=8, cfg_scale=0.5)
    check_against_reference(ref, result, mode="schedule", steps=3, cfg_scale=0.5)
    assert result.stats["steps_per_block"] == [3, 3]
    for row, length in zip(result.stats["committed_per_step"], result.lengths):  # [steps] per row
        schedule = [3, 3, 2] * 2  # linear schedule of 8 tokens over 3 steps, per block
        stopped = sum(row) < 16  # a row stops once its EOS and everything before it are decoded
        assert row == schedule or (stopped and row[: row.index(0)] == schedule[: row.index(0)] and length < 16)


def test_threshold_matches_torch(models):
    model, ref = models
    result = fast_dllm.generate(model, PROMPTS, max_new_tokens=16, block_size=8, threshold=0.15, cache="none")
    check_against_reference(ref, result, mode="threshold", knob=0.15)
    assert max(max(row) for row in result.stats["committed_per_step"]) > 1  # some steps commit several tokens


@pytest.mark.parametrize("cache,mode,knob", [("dual", "factor", 2.0), ("prefix", "threshold", 0.15)])
def test_block_causal_caches_match_torch_without_cache(models, cache, mode, knob):
    """Block-causal attention: earlier blocks never see later ones, so both caches are exact."""
    model, ref = models
    kw = dict(factor=knob) if mode == "factor" else dict(threshold=knob)
    result = fast_dllm.generate(model, PROMPTS, max_new_tokens=16, block_size=8, cache=cache,
                                attention="block_causal", **kw)
    check_against_reference(ref, result, mode=mode, knob=knob, attention="block_causal")


def test_bidirectional_caches_are_approximate_but_close(models):
    """Bidirectional: the caches freeze the context for a block; tokens may differ from the exact run."""
    model, _ = models
    exact = fast_dllm.generate(model, PROMPTS, max_new_tokens=16, block_size=8, threshold=0.15, cache="none")
    dual = fast_dllm.generate(model, PROMPTS, max_new_tokens=16, block_size=8, threshold=0.15, cache="dual")
    # The first block's first step is a full pass in both, so its commits agree exactly.
    first = exact.stats["commit_step"] == 0
    np.testing.assert_array_equal(first, dual.stats["commit_step"] == 0)
    first &= np.arange(16) < np.minimum(exact.lengths, dual.lengths)[:, None]  # not padding after an EOS
    np.testing.assert_array_equal(exact.tokens[first], dual.tokens[first])


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes on CI
def test_batch_invariance(models):
    """Each prompt alone gives the same tokens as inside a padded batch (with a longer third prompt)."""
    model, _ = models
    prompts = PROMPTS + [list(range(3, 23))]  # 20 tokens: the batch canvas is 16 columns wider
    batch = fast_dllm.generate(model, prompts, max_new_tokens=16, block_size=8, threshold=0.15, cache="dual")
    for i, p in enumerate(prompts):
        alone = fast_dllm.generate(model, [p], max_new_tokens=16, block_size=8, threshold=0.15, cache="dual")
        assert alone.row(0) == batch.row(i)
        assert alone.stats["row_nfe"][0] == batch.stats["row_nfe"][i]


def test_eos_stop_rule():
    gen = jax.numpy.array([[4, EOS, MASK, MASK], [MASK, EOS, 5, 5], [4, 5, 6, 7]])
    assert core.eos_stop(gen, MASK, (EOS,)).tolist() == [True, False, False]
    tokens, lengths = core.finish_rows(np.asarray(gen), MASK, (EOS,), PAD)
    assert lengths.tolist() == [2, 2, 4] and tokens[0].tolist() == [4, EOS, PAD, PAD]
