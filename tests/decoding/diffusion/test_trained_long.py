"""The shipped long-canvas tiny dLLMs (fill-256/512, agree-256/512; bidirectional and block diffusion),
the re-posed choice models and the same-vocabulary AR model: each loads and solves its tasks on held-out
instances one token per step, and the AR model's greedy output is a step-by-step AR loop's."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import pdx
from pdx.decoding import ar
from pdx.decoding.diffusion import fast_dllm, llada
from pdx.train import tasks
from scripts.train_tiny_ar import RUNS as AR_RUNS
from scripts.train_tiny_ar import UNFINISHED as AR_UNFINISHED
from scripts.train_tiny_dllm import RUNS, UNFINISHED

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "checkpoints")
BLOCK = 32  # the long tasks' block (scripts/train_tiny_dllm.py)
AR_LEAST = {}  # measured accuracy floors of AR models that do not reach 90% (the rest must)


def _accuracy(name: str, result, prompts) -> float:
    return float(np.mean([tasks.solved(name, p, result.row(i)) for i, p in enumerate(prompts)]))


SHIPPED = [run for run in RUNS if run[1] in tasks.LONG and run not in UNFINISHED]  # what train_tiny_dllm.py ships


def test_every_finished_run_ships_its_checkpoint():
    for attention, name in RUNS:
        shipped = os.path.isfile(os.path.join(ROOT, "tiny_dllm", attention, name, "meta.json"))
        assert shipped == ((attention, name) not in UNFINISHED), (attention, name)


@pytest.mark.slow
@pytest.mark.parametrize("attention, name", SHIPPED)
def test_long_task_is_solved_one_token_per_step(attention, name):
    task = tasks.get(name)
    model = pdx.load_model(os.path.join(ROOT, "tiny_dllm", attention, name))
    prompts = [p for p, _ in tasks.held_out(name, 8 if task.gen_len == 256 else 4)]
    cache = "prefix" if attention == "block_causal" else "none"  # block diffusion's prefix cache is exact
    out = llada.generate(model, prompts, max_new_tokens=task.gen_len, block_size=BLOCK, attention=attention,
                         cache=cache, prompt_bucket=task.prompt_len)
    assert out.stats["forward_passes"] >= task.gen_len - BLOCK  # one token per step (EOS may end a row early)
    assert _accuracy(name, out, prompts) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("attention, least", [("bidirectional", 0.9), ("block_causal", 0.85)])  # measured: 100, 88%
def test_choice_is_solved_one_token_per_step_and_under_a_threshold(attention, least):
    model = pdx.load_model(os.path.join(ROOT, "tiny_dllm", attention, "choice"))
    prompts = [p for p, _ in tasks.held_out("choice", 128)]
    options = dict(max_new_tokens=32, block_size=16, prompt_bucket=32, attention=attention)
    assert _accuracy("choice", llada.generate(model, prompts, steps=32, **options), prompts) >= least
    fast = fast_dllm.generate(model, prompts, threshold=0.9, cache="none", **options)
    assert _accuracy("choice", fast, prompts) >= least - 0.05  # the threshold keeps the first letter alone


AR_SHIPPED = [name for name in AR_RUNS if name not in AR_UNFINISHED]


def test_every_finished_ar_run_ships_its_checkpoint():
    for name in AR_RUNS:
        shipped = os.path.isfile(os.path.join(ROOT, "tiny_ar", name, "meta.json"))
        assert shipped == (name not in AR_UNFINISHED), name


@pytest.mark.slow
@pytest.mark.parametrize("name", AR_SHIPPED)
def test_ar_model_greedy_equals_a_step_by_step_loop_and_solves_its_task(name):
    model = pdx.load_model(os.path.join(ROOT, "tiny_ar", name))
    assert model.cfg.mask_token_id is None and model.cfg.vocab_size == tasks.VOCAB_SIZE
    task = tasks.get(name)
    prompts = [p for p, _ in tasks.held_out(name, 8 if task.gen_len > tasks.GEN_LEN else 32)]
    out = ar.generate(model, prompts, max_new_tokens=task.gen_len)
    assert _accuracy(name, out, prompts) >= AR_LEAST.get(name, 0.9)
    past_eos = ar.generate(model, prompts[:2], max_new_tokens=16, stop_token_ids=[])  # short answers end early
    for i, prompt in enumerate(prompts[:2]):
        seq = list(prompt)
        for _ in range(16):  # the whole sequence each step, no cache
            logits, _ = model.family.forward(model.params, model.cfg, jnp.asarray([seq]), jnp.arange(len(seq))[None])
            seq.append(int(jnp.argmax(logits[0, -1])))
        assert past_eos.row(i) == seq[len(prompt):]
