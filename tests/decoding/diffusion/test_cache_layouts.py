"""dLLM cached decoding on both parameter layouts.

`pdx.load_model` unstacks the layers on CPU (a list of per-layer dicts, run unrolled), and that path
writes each layer's new keys into the KV cache *before* attending, relying on the attention mask to
hide the window's own slots; the stacked layout (`lax.scan`) writes after. A dual cache also attends
to cached slots past the write offset (the suffix), so the two must still agree token for token, and
under block-causal attention (where caching is exact) both must match the uncached decode.
"""

import jax
import numpy as np
import pytest

from pdx.decoding.diffusion import fast_dllm, llada
from pdx.model import Model
from pdx.models import transformer as tf

MASK, EOS, PAD = 63, 2, 0
# Three prompt lengths: the padded batch left-pads rows differently, so cache lengths differ per row.
PROMPTS = [[5, 17, 9, 33, 41], [7, 3, 12, 60, 22, 11, 48, 30, 19, 27, 4], list(range(3, 23))]


@pytest.fixture(scope="module")
def layouts():
    """The same random tiny transformer with stacked and with unstacked (per-layer list) params."""
    cfg = tf.Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=16, mask_token_id=MASK, eos_token_ids=(EOS,), pad_token_id=PAD)
    stacked = tf.init_params(cfg, jax.random.PRNGKey(7), scale=0.3)  # peaked logits: confidences spread out
    unstacked = tf.unstack_layers(stacked)
    assert isinstance(unstacked["layers"], list) and len(unstacked["layers"]) == 3
    assert not isinstance(stacked["layers"], list)
    return Model(cfg, stacked, None, tf, "stacked"), Model(cfg, unstacked, None, tf, "unstacked")


def _same(a, b):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.stats["commit_step"], b.stats["commit_step"])
    assert list(a.stats["row_nfe"]) == list(b.stats["row_nfe"])


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
@pytest.mark.parametrize("cache", ["dual", pytest.param("prefix", marks=pytest.mark.slow)])
def test_threshold_cache_unstacked_equals_stacked(layouts, attention, cache):
    stacked, unstacked = layouts
    kw = dict(max_new_tokens=24, block_size=8, threshold=0.2, cache=cache, attention=attention)
    a, b = fast_dllm.generate(stacked, PROMPTS, **kw), fast_dllm.generate(unstacked, PROMPTS, **kw)
    assert max(max(row) for row in a.stats["committed_per_step"]) > 1  # parallel commits happen
    _same(a, b)
    if attention == "block_causal":  # caching is exact here: both layouts equal the uncached decode
        _same(a, fast_dllm.generate(unstacked, PROMPTS, **(kw | dict(cache="none"))))


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes on CI
def test_llada_dual_cache_unstacked_equals_stacked_and_exact_when_block_causal(layouts):
    stacked, unstacked = layouts
    kw = dict(max_new_tokens=24, steps=12, block_size=8, attention="block_causal")
    a = llada.generate(stacked, PROMPTS, cache="dual", **kw)
    _same(a, llada.generate(unstacked, PROMPTS, cache="dual", **kw))
    _same(a, llada.generate(unstacked, PROMPTS, cache="none", **kw))
    bi = dict(kw, attention="bidirectional")
    _same(llada.generate(stacked, PROMPTS, cache="dual", **bi), llada.generate(unstacked, PROMPTS, cache="dual", **bi))
