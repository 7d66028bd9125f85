"""The random tiny Llama the dLLM parity tests decode with (pdx and the PyTorch reference), and the check."""

import numpy as np
import torch

import pdx
from pdx.decoding.diffusion import core
from tests.reference import llada_torch

MASK, EOS, PAD = 63, 2, 0
PROMPTS = [[5, 17, 9, 33, 41], [7, 3, 12, 60, 22, 11, 48, 30, 19, 27, 4]]


def build(path):
    """A random tiny Llama with peaked logits (so confidences spread over (0, 1)), saved to `path` and
    loaded by pdx: (pdx model, transformers model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, mask_token_id=MASK,
                         eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)
    ref = LlamaForCausalLM(config).eval()
    ref.save_pretrained(path)
    return pdx.load_model(path), ref


def check_against_reference(ref, result, **kw):
    """pdx's `result` on PROMPTS (16 new tokens, blocks of 8) commits the reference's tokens at its steps."""
    p = core.build_canvas(PROMPTS, 16, 8, MASK, PAD)[3]
    gen, steps = llada_torch.decode(ref, PROMPTS, prompt_width=p, gen_length=16, block_size=8, mask_id=MASK,
                                    eos_ids=(EOS,), pad_id=PAD, **kw)
    tokens, _ = core.finish_rows(gen, MASK, (EOS,), PAD)
    np.testing.assert_array_equal(result.tokens, tokens)
    np.testing.assert_array_equal(result.stats["commit_step"], steps)
    assert result.stats["nfe"] == steps.max() + 1
