"""The shipped tiny dLLMs (checkpoints/tiny_dllm): easy tasks keep their accuracy under threshold decoding with
the dual cache at <= 0.1 NFE per token; the hard ones are solved one token per step, and sudoku breaks in
parallel; reverse needs one block over the whole answer."""

import os

import numpy as np
import pytest

import pdx
from pdx.decoding.diffusion import fast_dllm, llada
from pdx.train import tasks

CKPT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "checkpoints", "tiny_dllm", "bidirectional")
N = 64


def _decode(task: str, block: int = 16, **threshold_options):
    """(accuracy, NFE per generated token) of 1 token per step and of threshold decoding with the dual cache."""
    model = pdx.load_model(os.path.join(CKPT, task))
    prompts = [p for p, _ in tasks.held_out(task, N)]
    base = llada.generate(model, prompts, max_new_tokens=32, steps=32, block_size=block, prompt_bucket=32)
    fast = fast_dllm.generate(model, prompts, max_new_tokens=32, block_size=block, cache="dual", prompt_bucket=32,
                              **threshold_options)
    out = []
    for result in (base, fast):
        acc = np.mean([tasks.solved(task, p, result.row(i)) for i, p in enumerate(prompts)])
        out.append((float(acc), float(np.sum(result.stats["row_nfe"]) / result.lengths.sum())))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task, block", [("copy", 16), ("sort", 16), ("reverse", 32)])
def test_easy_task_threshold_dual_cache_keeps_accuracy_at_a_tenth_of_the_nfe(task, block):
    (base_acc, base_nfe), (fast_acc, fast_nfe) = _decode(task, block, threshold=0.9)
    assert base_acc >= 0.85 and base_nfe > 1.0  # 32 forwards for <= 32 tokens
    assert fast_acc >= base_acc and fast_nfe <= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("task", ["add", "repeat"])
def test_hard_task_is_solved_one_token_per_step(task):
    (base_acc, _), _ = _decode(task, threshold=0.9)
    assert base_acc >= 0.9


@pytest.mark.slow
def test_sudoku_is_solved_one_token_per_step_and_breaks_in_parallel():
    (base_acc, _), (fast_acc, fast_nfe) = _decode("sudoku", threshold=0.7)
    assert base_acc >= 0.9
    assert fast_acc < base_acc - 0.05 and fast_nfe < 0.5  # cells decoded together violate each other's constraints


@pytest.mark.slow
def test_reverse_fails_in_semi_autoregressive_blocks():
    """The reverse model gets its first slot right only once the second half (where the answer ends and EOS
    starts) is decoded: 16-token semi-autoregressive blocks decode slot 0 before that and miss it; one 32-token
    block lets the end be decoded first."""
    (block16, _), _ = _decode("reverse", 16, threshold=0.9)
    (block32, _), _ = _decode("reverse", 32, threshold=0.9)
    assert block16 < 0.2 and block32 >= 0.9
