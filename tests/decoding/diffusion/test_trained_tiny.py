"""The shipped tiny dLLMs (checkpoints/tiny_dllm) solve their easy task, alone and with parallel decoding."""

import os

import pytest

import pdx
from pdx.decoding.diffusion import fast_dllm, llada
from pdx.train import tasks

CKPT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "checkpoints", "tiny_dllm", "bidirectional", "copy")


@pytest.mark.slow
def test_copy_model_parallel_decoding_keeps_accuracy():
    model = pdx.load_model(CKPT)
    data = tasks.held_out("copy", 32)
    prompts = [p for p, _ in data]
    base = llada.generate(model, prompts, max_new_tokens=32, steps=32, block_size=16, prompt_bucket=32)
    fast = fast_dllm.generate(model, prompts, max_new_tokens=32, block_size=16, threshold=0.9, cache="dual",
                              prompt_bucket=32)
    for result in (base, fast):
        assert sum(result.row(i) == a + [tasks.EOS] for i, (_, a) in enumerate(data)) >= 30
    assert sum(fast.stats["row_nfe"]) / fast.lengths.sum() < 0.25 * sum(base.stats["row_nfe"]) / base.lengths.sum()
