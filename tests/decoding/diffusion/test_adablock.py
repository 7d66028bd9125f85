"""AdaBlock: row-wise adaptive blocks against a PyTorch transcription of the authors' loop (no cache),
the fixed-block fallback equal to Fast-dLLM with every cache, batch invariance with every cache (each
row's blocks are its own), traced knobs, bad options."""

import numpy as np
import pytest

from pdx.decoding.diffusion import adablock, core, fast_dllm
from pdx.errors import InvalidInputError
from tests.decoding.diffusion.test_interface import CompileCounter
from tests.decoding.diffusion.tiny_llama import EOS, MASK, PAD, PROMPTS
from tests.reference import dllm_rules_torch as rules

RUN = dict(max_new_tokens=16, block_size=8, threshold=0.4)
DELIMITERS = [53, 57, 0]  # tokens the tiny Llama predicts often: blocks end early in some rows, not others


def test_matches_torch_transcription_step_by_step(models):
    model, ref = models
    out = adablock.generate(model, PROMPTS, delimiter_threshold=0.05, delimiters=DELIMITERS, cache="none", **RUN)
    p = core.build_canvas(PROMPTS, 16, 8, MASK, PAD)[3]
    gen, steps, ends = rules.adablock_decode(ref, PROMPTS, prompt_width=p, gen_length=16, default_block=8,
                                             mask_id=MASK, eos_ids=(EOS,), pad_id=PAD, tau=0.4, tau_delimiter=0.05,
                                             delimiters=DELIMITERS)
    np.testing.assert_array_equal(out.tokens, core.finish_rows(gen, MASK, (EOS,), PAD)[0])
    np.testing.assert_array_equal(out.stats["commit_step"], steps)
    np.testing.assert_array_equal(np.asarray(out.stats["block_ends"]), ends)
    assert sorted(set(np.flatnonzero(ends[1]))) != [7, 15]  # some block is not on the 8-slot grid


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_no_confident_delimiter_is_fast_dllm(models, cache):
    model, _ = models
    out = adablock.generate(model, PROMPTS, delimiter_threshold=1.0, delimiters=DELIMITERS, cache=cache, **RUN)
    fixed = fast_dllm.generate(model, PROMPTS, cache=cache, **RUN)
    np.testing.assert_array_equal(out.tokens, fixed.tokens)
    assert out.stats["row_nfe"] == fixed.stats["row_nfe"]  # a row's steps are the same; it just does not wait
    assert out.stats["nfe"] <= fixed.stats["nfe"]  # for the others' blocks to end before starting its next


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_row_alone_equals_row_in_padded_batch(models, cache):
    model, _ = models
    prompts = PROMPTS + [list(range(3, 23))]
    options = dict(delimiter_threshold=0.05, delimiters=DELIMITERS, cache=cache, **RUN)
    batch = adablock.generate(model, prompts, **options)
    for i, prompt in enumerate(prompts):
        alone = adablock.generate(model, [prompt], **options)
        assert alone.row(0) == batch.row(i) and alone.stats["row_nfe"][0] == batch.stats["row_nfe"][i]
        assert alone.stats["block_ends"][0] == batch.stats["block_ends"][i]


def test_knobs_are_traced(models):
    model, _ = models
    adablock.generate(model, PROMPTS, delimiters=DELIMITERS, cache="dual", **RUN)
    compiles = CompileCounter()
    compiles.active = True
    adablock.generate(model, PROMPTS, delimiters=DELIMITERS, cache="dual", **(RUN | dict(threshold=0.7)),
                      delimiter_threshold=0.9)
    compiles.active = False
    assert compiles.count == 0


@pytest.mark.parametrize("bad, match", [
    (dict(delimiters=[64]), r"delimiters must be token ids in \[0, 64\)"),
    (dict(delimiters=[]), "delimiters must be token ids"),
    (dict(delimiter_threshold=1.5), "option 'delimiter_threshold' must be <= 1"),
    (dict(max_new_tokens=2, block_size=1), "must be at least 4"),
    (dict(attention="block_causal"), "takes no option 'attention'"),
])
def test_bad_options_raise_before_compiling(models, bad, match):
    compiles = CompileCounter()
    compiles.active = True
    with pytest.raises(InvalidInputError, match=match):
        adablock.generate(models[0], PROMPTS, **(RUN | bad))
    compiles.active = False
    assert compiles.count == 0
