"""Real SmolLM2-135M-Instruct weights: pdx vs transformers (both loading the same Q4_1 GGUF), fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pdx.models import transformer as tf

PROMPTS = ["HumanEval/0", "HumanEval/2"] + [pytest.param(t, marks=pytest.mark.slow)
                                             for t in ("HumanEval/17", "HumanEval/53", "HumanEval/100")]
NEW_TOKENS = 64
BUCKET = 320  # every prompt + continuation right-padded to one length: one compile
ATOL = 2e-3  # observed max |diff| ~1e-4 on logits of magnitude ~35


@pytest.fixture(scope="module")
def forward_fn():
    return jax.jit(tf.forward, static_argnums=1)


@pytest.mark.parametrize("task_id", PROMPTS)
def test_logits_and_greedy_continuation_match_transformers(smollm2_any_layout, hf_smollm2, humaneval, forward_fn,
                                                           task_id):
    smollm2 = smollm2_any_layout
    ids = smollm2.tokenizer.encode(humaneval[task_id]["prompt"])
    with torch.no_grad():
        out = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  min_new_tokens=NEW_TOKENS, pad_token_id=2)
        seq = out[0].tolist()
        ref = hf_smollm2(torch.tensor([seq])).logits[0].numpy()  # [T, V]
    assert len(seq) == len(ids) + NEW_TOKENS and len(seq) <= BUCKET
    tokens = np.zeros((1, BUCKET), np.int32)
    tokens[0, : len(seq)] = seq
    logits, _ = forward_fn(smollm2.params, smollm2.cfg, jnp.asarray(tokens), jnp.arange(BUCKET)[None])
    ours = np.asarray(logits[0, : len(seq)])
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    # Teacher-forced greedy: pdx's argmax at every generated position is the token transformers chose
    # (EOS excluded from the argmax on both sides, as `min_new_tokens` does for transformers).
    gen = slice(len(ids) - 1, len(seq) - 1)
    ours, ref = ours[gen].copy(), ref[gen].copy()
    ours[:, smollm2.cfg.eos_token_ids], ref[:, smollm2.cfg.eos_token_ids] = -np.inf, -np.inf
    top2 = np.sort(ref, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0] > 1e-5).all(), "a reference tie: compare only up to it"
    assert ours.argmax(-1).tolist() == seq[len(ids):]
