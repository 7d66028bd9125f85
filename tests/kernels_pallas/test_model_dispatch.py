"""The transformer with attention forced to the Pallas kernels (interpret mode) against the reference path.

fp32 logits: tiny random model atol 1e-4 (logits O(1)); SmolLM2 atol 2e-3 (logits O(10), 30 layers of
different summation order) and identical greedy tokens.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx.kernels_pallas import attend as attend_mod
from pdx.kernels_pallas import use_impl
from pdx.masks import CAUSAL, MaskMode
from pdx.models import transformer as tf
from tests.kernels_pallas.helpers import qkv

# One jitted forward per path (distinct functions, so no trace is shared across paths), traced under it.
_JITTED = {impl: jax.jit(lambda *a, **kw: tf.forward(*a, **kw), static_argnames=("cfg", "mask_mode"))
           for impl in ("reference", "pallas")}


def _forward(impl, params, cfg, tokens, positions, cache=None, mask_mode=CAUSAL, valid=None):
    with use_impl(impl):
        return _JITTED[impl](params, cfg=cfg, tokens=tokens, positions=positions, cache=cache, mask_mode=mask_mode,
                             valid=valid)


@pytest.fixture
def cfg64(tiny_cfg):
    """The tiny config at a kernel head dim, one sliding-window layer (the window is traced per layer)."""
    return dataclasses.replace(tiny_cfg, hidden_size=128, head_dim=64, layer_windows=(0, 5))


@pytest.mark.parametrize("mode", [pytest.param(CAUSAL, marks=pytest.mark.slow), MaskMode("block_causal", 4)])
def test_tiny_model_prefill(cfg64, mode):
    params = tf.init_params(cfg64, jax.random.PRNGKey(0), scale=0.2)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, cfg64.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
    valid = jnp.arange(11)[None] < jnp.array([[11], [6]])
    ref, _ = _forward("reference", params, cfg64, tokens, pos, mask_mode=mode, valid=valid)
    ours, _ = _forward("pallas", params, cfg64, tokens, pos, mask_mode=mode, valid=valid)
    rows = np.asarray(valid)  # a padding row may see no key through the window: its output is padding
    np.testing.assert_allclose(np.asarray(ours)[rows], np.asarray(ref)[rows], atol=1e-4, rtol=0)


def test_tiny_model_cache_prefill_then_decode(cfg64):
    """Right-padded prefill into a cache, then decode steps: cache segment + new keys merged by lse."""
    params = tf.init_params(cfg64, jax.random.PRNGKey(0), scale=0.2)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, cfg64.vocab_size)
    valid = jnp.arange(7)[None] < jnp.array([[7], [4]])
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    caches = {impl: tf.init_cache(cfg64, 2, 24) for impl in ("reference", "pallas")}
    for step in range(3):
        logits = {}
        for impl in caches:
            logits[impl], caches[impl] = _forward(impl, params, cfg64, tokens, pos, caches[impl], valid=valid)
        rows = np.asarray(valid)
        np.testing.assert_allclose(np.asarray(logits["pallas"])[rows], np.asarray(logits["reference"])[rows],
                                   atol=1e-4, rtol=0, err_msg=f"step {step}")
        np.testing.assert_array_equal(np.asarray(caches["pallas"].lengths), np.asarray(caches["reference"].lengths))
        lengths = caches["reference"].lengths
        tokens, pos, valid = jnp.argmax(logits["reference"][:, -1:], -1), lengths[:, None], jnp.ones((2, 1), bool)


def test_attend_merges_cache_and_new_keys():
    """attend() directly: GQA 2, a ragged cache (one row empty), 3 new tokens, window 6 with the cache."""
    q, k, v = qkv(3, 3, 3, 4, 2, 64, seed=6)
    _, ck, cv = qkv(3, 1, 40, 4, 2, 64, seed=7)
    lengths = jnp.array([40, 9, 0])
    pos = lengths[:, None] + jnp.arange(3)
    valid = jnp.ones((3, 3), bool)
    args = (q, k, v, pos, valid, CAUSAL, 6, (ck, cv, lengths))
    ref = attend_mod.attend(*args, impl="reference")
    ours = jax.jit(lambda *a: attend_mod.attend(*a, CAUSAL, 6, (ck, cv, lengths), impl="pallas"))(q, k, v, pos, valid)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_same_logits_through_pallas(smollm2):
    """The real SmolLM2: prefill a short prompt into a cache, then one decode step, on both paths."""
    ids = smollm2.tokenizer.encode("def fibonacci(n):")
    t = len(ids)
    tokens, pos = jnp.asarray([ids]), jnp.arange(t)[None]
    out = {}
    for impl in ("reference", "pallas"):
        cache = tf.init_cache(smollm2.cfg, 1, 32)
        logits, cache = _forward(impl, smollm2.params, smollm2.cfg, tokens, pos, cache)
        nxt = jnp.argmax(logits[:, -1:], -1)
        step, _ = _forward(impl, smollm2.params, smollm2.cfg, nxt, jnp.array([[t]]), cache)
        out[impl] = (logits, nxt, step)
    for ours, ref in zip(out["pallas"], out["reference"]):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-3, rtol=0)
    np.testing.assert_array_equal(np.argmax(np.asarray(out["pallas"][2]), -1),
                                  np.argmax(np.asarray(out["reference"][2]), -1))
