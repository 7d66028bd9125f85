"""dLLM strategy interface: one compile per shape bucket, traced knobs, input validation, registry."""

import dataclasses

import jax
import numpy as np
import pytest

from pdx.decoding import registry
from pdx.decoding.diffusion import fast_dllm, llada
from pdx.errors import InvalidInputError, UnsupportedError
from pdx.model import Model
from pdx.models import transformer as tf

CFG = tf.Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=16, mask_token_id=31, eos_token_ids=(1,), pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    return Model(CFG, tf.init_params(CFG, jax.random.PRNGKey(0), scale=0.5), None, tf)


class CompileCounter:
    """Counts XLA backend compilations while active."""

    def __init__(self):
        self.count, self.active = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


@pytest.fixture(scope="module")
def compiles():
    return CompileCounter()


def test_knobs_do_not_recompile(model, compiles):
    run = lambda **kw: fast_dllm.generate(model, [[3, 4, 5]], max_new_tokens=8, block_size=4, **kw)  # noqa: E731
    first = run(threshold=0.9)
    assert first.stats["compile_s"] > 0
    compiles.active = True
    outs = [run(threshold=0.3), run(threshold=0.9, temperature=1.0, seed=3), run(threshold=0.9)]
    compiles.active = False
    assert compiles.count == 0 and all(o.stats["compile_s"] == 0 for o in outs)
    assert outs[2].row(0) == first.row(0)  # same knobs, same tokens
    assert outs[0].stats["nfe"] <= first.stats["nfe"]  # a lower threshold never needs more steps
    assert outs[1].row(0) != first.row(0)  # Gumbel noise at temperature 1 changes the samples


def test_bad_input_raises_before_compiling(model, compiles):
    compiles.active = True
    no_mask = dataclasses.replace(model, cfg=dataclasses.replace(CFG, mask_token_id=None))
    with pytest.raises(UnsupportedError, match="mask_token_id"):
        llada.generate(no_mask, [[3]], max_new_tokens=8)
    with pytest.raises(InvalidInputError, match="multiple of block_size"):
        llada.generate(model, [[3]], max_new_tokens=10, block_size=4)
    with pytest.raises(InvalidInputError, match="at least the number of blocks"):
        llada.generate(model, [[3]], max_new_tokens=16, block_size=4, steps=2)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(InvalidInputError, match=r"option 'threshold' must be (> 0|<= 1)"):
            fast_dllm.generate(model, [[3]], max_new_tokens=8, block_size=4, threshold=bad)
    with pytest.raises(InvalidInputError, match="cache"):
        fast_dllm.generate(model, [[3]], max_new_tokens=8, block_size=4, cache="full")
    with pytest.raises(InvalidInputError, match="mask token"):
        fast_dllm.generate(model, [[3, 31]], max_new_tokens=8, block_size=4)
    compiles.active = False
    assert compiles.count == 0


def test_random_remasking_is_seeded(model):
    run = lambda seed: llada.generate(model, [[3, 4]], max_new_tokens=8, steps=8, block_size=4,  # noqa: E731
                                      remasking="random", seed=seed).stats["commit_step"]
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))  # a different commit order


def test_registry_resolves_strategies():
    assert registry.get("llada") is llada.generate
    assert registry.get("fast-dllm") is fast_dllm.generate
