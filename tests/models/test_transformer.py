"""The transformer on tiny random configs: HF parity per architecture variant, cache, mask modes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pdx
from pdx.errors import ConfigError, InvalidInputError
from pdx.masks import BIDIRECTIONAL, MaskMode
from pdx.models import transformer as tf
from pdx.models.quant import quantize_params

ATOL = 1e-4  # fp32, tiny models: logits of magnitude ~1

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=128)
VARIANTS = {
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)),
    "llama-mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-bias": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True)),
    "llama-headdim": ("llama", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=24)),
    "llama3-rope": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2)),
    "mistral-window": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5)),
}


def save_hf(tmp_path, model_type: str, extra: dict, seed: int = 0, **save_kwargs):
    """A random transformers model saved with `save_pretrained`; returns (dir, torch model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **BASE, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # make norms and biases non-trivial so a wrong mapping shows up
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path, **save_kwargs)
    return tmp_path, model


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tmp_path, variant):
    model_type, extra = VARIANTS[variant]
    path, ref_model = save_hf(tmp_path, model_type, extra)
    model = pdx.load_model(path)
    tokens = np.random.default_rng(0).integers(0, 96, (2, 12))
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    ours, _ = tf.forward(model.params, model.cfg, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(12), (2, 12)))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    path, ref_model = save_hf(tmp_path, "llama", VARIANTS["llama-gqa"][1], max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    model = pdx.load_model(path)
    tokens = np.arange(10)[None]
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    ours, _ = tf.forward(model.params, model.cfg, jnp.asarray(tokens), jnp.arange(10)[None])
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)


def _hf_with_mask(ref_model, tokens, allowed):
    """transformers logits under an explicit 4D boolean mask `allowed [T, T]` (query, key)."""
    mask = torch.tensor(allowed)[None, None].expand(tokens.shape[0], 1, *allowed.shape)
    with torch.no_grad():
        return ref_model(torch.tensor(tokens), attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("mode", ["bidirectional", "block_causal"])
def test_mask_modes_match_transformers_with_explicit_mask(tmp_path, mode):
    path, ref_model = save_hf(tmp_path, "llama", VARIANTS["llama-gqa"][1])
    model = pdx.load_model(path)
    t = 12
    tokens = np.random.default_rng(1).integers(0, 96, (2, t))
    q, k = np.arange(t)[:, None], np.arange(t)[None, :]
    if mode == "bidirectional":
        allowed, mask_mode = np.ones((t, t), bool), BIDIRECTIONAL
    else:
        allowed, mask_mode = (k // 4) <= (q // 4), MaskMode("block_causal", 4)
    ref = _hf_with_mask(ref_model, tokens, allowed)
    ours, _ = tf.forward(model.params, model.cfg, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(t), (2, t)),
                         mask_mode=mask_mode)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)


def test_block_causal_limits(tiny_cfg):
    params = tf.init_params(tiny_cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, tiny_cfg.vocab_size)
    pos = jnp.arange(8)[None]
    run = lambda mode: np.asarray(tf.forward(params, tiny_cfg, tokens, pos, mask_mode=mode)[0])  # noqa: E731
    np.testing.assert_allclose(run(MaskMode("block_causal", 1)), run("causal"), atol=1e-6)
    np.testing.assert_allclose(run(MaskMode("block_causal", 8)), run("bidirectional"), atol=1e-6)
    assert not np.allclose(run("causal"), run("bidirectional"), atol=1e-3)


@pytest.mark.parametrize("window", [0, 3])
def test_prefill_then_decode_matches_full_forward(tiny_cfg, window):
    cfg = dataclasses.replace(tiny_cfg, layer_windows=(window,) * tiny_cfg.num_layers if window else None)
    params = tf.init_params(cfg, jax.random.PRNGKey(0), scale=0.2)
    n, m = 7, 5
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, n + m), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(n + m), (2, n + m))
    full, _ = tf.forward(params, cfg, tokens, pos)
    cache = tf.init_cache(cfg, 2, 16)
    step = jax.jit(tf.forward, static_argnums=1, donate_argnums=4)
    logits, cache = step(params, cfg, tokens[:, :n], pos[:, :n], cache)
    outs = [logits]
    for i in range(n, n + m):
        logits, cache = step(params, cfg, tokens[:, i : i + 1], pos[:, i : i + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5)
    assert cache.lengths.tolist() == [n + m] * 2


@pytest.mark.parametrize("per_layer", [False, True])
def test_refill_equals_a_cacheless_pass_and_writes_its_keys(tiny_cfg, per_layer):
    """A refill (dLLM cache refresh) attends to no cached slot, whatever the cache held: its logits equal
    the cacheless pass's, and it leaves the keys that pass computed, so a later query sees them."""
    params = tf.init_params(tiny_cfg, jax.random.PRNGKey(0), scale=0.2)
    params = tf.unstack_layers(params) if per_layer else params
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, tiny_cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    plain, _ = tf.forward(params, tiny_cfg, tokens, pos, mask_mode=BIDIRECTIONAL)
    stale = tf.init_cache(tiny_cfg, 2, 8, per_layer=per_layer)
    stale = jax.tree.map(lambda a: a + 3.0 if a.dtype == jnp.float32 else a, stale)  # garbage it must not read
    logits, cache = tf.forward(params, tiny_cfg, tokens, pos, stale, mask_mode=BIDIRECTIONAL, refill=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), atol=1e-5)
    # the last token again, against every refilled slot: the same logits as in the plain pass
    cache = tf.KVCache(cache.k, cache.v, jnp.full((2,), 7, jnp.int32))
    again, _ = tf.forward(params, tiny_cfg, tokens[:, 7:], pos[:, 7:], cache,
                          mask_mode=BIDIRECTIONAL, cache_visible=jnp.broadcast_to(jnp.arange(8) < 7, (2, 8)))
    np.testing.assert_allclose(np.asarray(again[:, 0]), np.asarray(plain[:, 7]), atol=1e-5)
    with pytest.raises(InvalidInputError, match="refill"):
        tf.forward(params, tiny_cfg, tokens, pos, mask_mode=BIDIRECTIONAL, refill=True)


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes on CI
def test_cache_rows_of_different_lengths(tiny_cfg):
    """Right-padded prefill (lengths advance by valid tokens), then decode: each row matches its own full forward."""
    params = tf.init_params(tiny_cfg, jax.random.PRNGKey(0), scale=0.2)
    seqs = [[5, 9, 3, 7, 1, 2], [4, 8, 6]]
    extra = [[11, 12], [13, 14]]
    cache = tf.init_cache(tiny_cfg, 2, 16)
    padded = jnp.array([s + [0] * (6 - len(s)) for s in seqs])
    valid = jnp.arange(6)[None] < jnp.array([[len(s)] for s in seqs])
    logits, cache = tf.forward(params, tiny_cfg, padded, jnp.broadcast_to(jnp.arange(6), (2, 6)), cache, valid=valid)
    assert cache.lengths.tolist() == [len(s) for s in seqs]
    for j in range(2):
        tok = jnp.array([[e[j]] for e in extra])
        logits, cache = tf.forward(params, tiny_cfg, tok, cache.lengths[:, None], cache)
        for b, s in enumerate(seqs):
            full_seq = jnp.array([s + extra[b][: j + 1]])
            ref, _ = tf.forward(params, tiny_cfg, full_seq, jnp.arange(full_seq.shape[1])[None])
            np.testing.assert_allclose(np.asarray(logits[b, 0]), np.asarray(ref[0, -1]), atol=1e-5)


def test_padding_is_masked_with_valid(tiny_cfg):
    params = tf.init_params(tiny_cfg, jax.random.PRNGKey(0), scale=0.2)
    tokens = jnp.array([[3, 4, 5, 0, 0]])
    valid = jnp.array([[True, True, True, False, False]])
    pos = jnp.arange(5)[None]
    padded, _ = tf.forward(params, tiny_cfg, tokens, pos, mask_mode=BIDIRECTIONAL, valid=valid)
    alone, _ = tf.forward(params, tiny_cfg, tokens[:, :3], pos[:, :3], mask_mode=BIDIRECTIONAL)
    np.testing.assert_allclose(np.asarray(padded[:, :3]), np.asarray(alone), atol=1e-5)


def test_bfloat16_weights_close_to_fp32(tiny_cfg):
    params = tf.init_params(tiny_cfg, jax.random.PRNGKey(0), scale=0.2)
    tokens = jnp.arange(10)[None] % tiny_cfg.vocab_size
    pos = jnp.arange(10)[None]
    ref, _ = tf.forward(params, tiny_cfg, tokens, pos)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    ours, _ = tf.forward(bf16, tiny_cfg, tokens, pos)
    assert ours.dtype == jnp.float32
    err = np.abs(np.asarray(ours) - np.asarray(ref))
    assert err.mean() < 0.03 and err.max() < 0.3  # bf16 has ~3 significant digits; logits are ~O(4)


@pytest.mark.parametrize("per_layer_cache", [True, False])
def test_unstacked_layers_match_scan(tiny_cfg, per_layer_cache):
    """The unrolled per-layer form (fast CPU decode) computes exactly what the scanned form does, with
    either cache layout (per-layer buffers or one stacked array), and returns the cache as it came."""
    params = tf.init_params(tiny_cfg, jax.random.PRNGKey(0), scale=0.2)
    flat = tf.unstack_layers(params)
    assert isinstance(flat["layers"], list) and len(flat["layers"]) == tiny_cfg.num_layers
    assert {"wqkv", "w_gate_up"} <= set(flat["layers"][0]) and not {"wq", "w_up"} & set(flat["layers"][0])
    tokens = jnp.array([[3, 1, 4, 1, 5, 9], [9, 2, 6, 5, 3, 5]])
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    valid = jnp.array([[True] * 5 + [False], [True] * 3 + [False] * 3])  # ragged prefill
    results = {}
    for name, p in (("scan", params), ("unrolled", flat)):
        cache = tf.init_cache(tiny_cfg, 2, 12, per_layer=per_layer_cache)
        logits, cache = tf.forward(p, tiny_cfg, tokens, pos, cache, valid=valid)
        step, cache = tf.forward(p, tiny_cfg, jnp.array([[7], [8]]), cache.lengths[:, None], cache)
        assert cache.per_layer == per_layer_cache and cache.lengths.tolist() == [6, 4]
        results[name] = (logits, step, np.asarray(cache.k)[:, 0, :, :4])  # the slots both rows filled
    for ref, out in zip(results["scan"], results["unrolled"]):
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)  # fusion order differs slightly
    restacked = tf.stack_layers(flat)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), restacked, params))


def test_fused_layer_round_trip_with_biases_and_int8(tiny_cfg):
    """`fuse_layer`/`split_layer` keep every value: q/k/v biases and int8 weights with their scales."""
    cfg = dataclasses.replace(tiny_cfg, attention_bias=True)
    params = tf.init_params(cfg, jax.random.PRNGKey(1), scale=0.2)
    layer = jax.tree.map(lambda a: a[0], params["layers"])
    for p in (layer, quantize_params(layer)):
        fused = tf.fuse_layer(p)
        assert {"wqkv", "bqkv", "w_gate_up"} <= set(fused) and "bq" not in fused
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), tf.split_layer(fused), p))
    tokens, pos = jnp.array([[3, 1, 4, 1]]), jnp.arange(4)[None]
    np.testing.assert_allclose(np.asarray(tf.forward(tf.unstack_layers(params), cfg, tokens, pos)[0]),
                               np.asarray(tf.forward(params, cfg, tokens, pos)[0]), atol=1e-5)


def test_config_and_mask_errors(tiny_cfg):
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        dataclasses.replace(tiny_cfg, num_kv_heads=3)
    with pytest.raises(ConfigError, match="layer_windows"):
        dataclasses.replace(tiny_cfg, layer_windows=(4,))
    with pytest.raises(InvalidInputError, match="unknown mask mode"):
        MaskMode("diagonal")
    with pytest.raises(InvalidInputError, match="block_size"):
        MaskMode("block_causal")


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
@pytest.mark.parametrize("head_dim", [16, 8])  # 16: the CPU kernel (where built); 8: the jnp spec
def test_packed_prefill_equals_the_padded_batch(tiny_cfg, layout, head_dim):
    """Three prompts packed into one sequence (cache_rows, with padding) give each cache row the keys,
    length and last-token logits that the right-padded batch gives, and decoding goes on the same."""
    cfg = dataclasses.replace(tiny_cfg, head_dim=head_dim, layer_windows=(0, 3))
    params = tf.init_params(cfg, jax.random.PRNGKey(1), scale=0.2)
    params = tf.unstack_layers(params) if layout == "per_layer" else params
    seqs = [[5, 9, 3, 7, 1, 2], [4, 8, 6], [10, 11, 12, 13]]
    width = max(map(len, seqs))
    padded = jnp.array([s + [0] * (width - len(s)) for s in seqs])
    valid = jnp.arange(width)[None] < jnp.array([[len(s)] for s in seqs])
    new = lambda: tf.init_cache(cfg, 3, 16, per_layer=layout == "per_layer")  # noqa: E731
    want, want_cache = tf.forward(params, cfg, padded, jnp.broadcast_to(jnp.arange(width), (3, width)), new(),
                                  valid=valid, logits="last")
    order = [(1, i) for i in range(3)] + [(0, i) for i in range(6)] + [(2, i) for i in range(4)]  # rows interleave
    tokens = jnp.array([[seqs[r][i] for r, i in order] + [0, 0]])
    rows = jnp.array([[r for r, _ in order] + [-1, -1]])
    pos = jnp.array([[i for _, i in order] + [0, 0]])
    got, cache = tf.forward(params, cfg, tokens, pos, new(), valid=rows >= 0, cache_rows=rows, logits="last")
    assert got.shape == (3, 1, cfg.vocab_size) and cache.lengths.tolist() == [6, 3, 4]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    for a, b in ((cache.k, want_cache.k), (cache.v, want_cache.v)):
        a, b = np.asarray(a), np.asarray(b)  # [L, B, K, S, H] either way
        for r, s in enumerate(seqs):
            np.testing.assert_allclose(a[:, r, :, : len(s)], b[:, r, :, : len(s)], atol=1e-5)
    step = jnp.array([[7], [8], [9]])
    after, _ = tf.forward(params, cfg, step, cache.lengths[:, None], cache)
    ref, _ = tf.forward(params, cfg, step, want_cache.lengths[:, None], want_cache)
    np.testing.assert_allclose(np.asarray(after), np.asarray(ref), atol=1e-5)


def test_packed_rows_are_checked(tiny_cfg):
    params = tf.init_params(tiny_cfg, jax.random.PRNGKey(0))
    tokens, pos = jnp.zeros((1, 4), jnp.int32), jnp.arange(4)[None]
    rows = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(InvalidInputError, match="cache_rows"):
        tf.forward(params, tiny_cfg, tokens, pos, cache_rows=rows)  # no cache
    with pytest.raises(InvalidInputError, match="cache_rows"):
        tf.forward(params, tiny_cfg, tokens, pos, tf.init_cache(tiny_cfg, 2, 8), cache_rows=rows,
                   mask_mode=BIDIRECTIONAL)
