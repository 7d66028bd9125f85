"""SambaY: components and the whole layout against the PyTorch transcription (tests/reference/sambay_torch.py),
cached decode == full forward (SWA ring wrap-around), AR-engine generation, loader, bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pdx
from pdx.decoding import ar, compiled
from pdx.errors import ConfigError, InvalidInputError, ModelLoadError, UnsupportedError
from pdx.io import sambay_checkpoint as ckpt
from pdx.models import hybrid_layers as hl
from pdx.models import sambay as sb
from tests.reference import sambay_torch as ref

LOGIT_ATOL = 3e-4  # fp32 logits of magnitude ~10 through 8-12 layers; observed max error ~7e-5
ATOL = 1e-5  # single components; observed ~1e-6

HF_CONFIG = dict(model_type="phi4flash", architectures=["Phi4FlashForCausalLM"], vocab_size=64, hidden_size=32,
                 intermediate_size=40, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                 sliding_window=3, mb_per_layer=2, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
                 layer_norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=1, hidden_act="silu")


@pytest.fixture(autouse=True, scope="module")
def torch_one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_dir(path, config: dict, seed: int = 0):
    from safetensors.torch import save_file

    sd = ref.random_state_dict(config, seed)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, state dict, pdx Model) of a random 8-layer SambaY in the Phi-4-mini-flash naming (window 3)."""
    path = tmp_path_factory.mktemp("sambay")
    sd = write_dir(path, HF_CONFIG)
    return path, sd, pdx.load_model(path)


def positions_like(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


fwd = jax.jit(sb.forward, static_argnames=("cfg", "mask_mode", "logits", "trace"))


def test_diff_attention_matches_reference():
    """Striped head pairs, GQA, lambda re-parameterisation, per-pair RMSNorm, (1 - lambda_init), sliding mask."""
    rng = np.random.default_rng(0)
    b, t, n, kv, d, depth = 2, 7, 8, 4, 6, 3
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((b, t, n, d), (b, t, kv, d), (b, t, kv, d)))
    p = {f"inner_cross_attn.{x}": torch.tensor(0.3 * rng.standard_normal(d), dtype=torch.float32)
         for x in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
    p["inner_cross_attn.subln.weight"] = torch.tensor(1 + 0.2 * rng.standard_normal(2 * d), dtype=torch.float32)
    i = np.arange(t)
    for window in (0, 3):
        mask = (i[None] <= i[:, None]) & ((window == 0) | (i[:, None] - i[None] < window))
        want = ref.diff_attn_ref(torch.tensor(q), torch.tensor(k), torch.tensor(v), torch.tensor(mask), p, depth)
        lam_init = hl.lambda_init(depth)
        lam = hl.diff_lambda(*(jnp.asarray(p[f"inner_cross_attn.{x}"].numpy())
                               for x in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")), lam_init)
        vis = jnp.broadcast_to(jnp.asarray(mask), (b, t, t))
        got = hl.diff_attention(jnp.asarray(q), [(jnp.asarray(k).transpose(0, 2, 1, 3),
                                                  jnp.asarray(v).transpose(0, 2, 1, 3), vis)], lam, lam_init,
                                jnp.asarray(p["inner_cross_attn.subln.weight"].numpy()))
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=ATOL, rtol=0)


def test_gmu_matches_reference():
    rng = np.random.default_rng(1)
    h, m = rng.standard_normal((2, 5, 8)).astype(np.float32), rng.standard_normal((2, 5, 16)).astype(np.float32)
    w_in, w_out = rng.standard_normal((16, 8)).astype(np.float32), rng.standard_normal((8, 16)).astype(np.float32)
    want = ref.gmu_ref({"in_proj.weight": torch.tensor(w_in), "out_proj.weight": torch.tensor(w_out)},
                       torch.tensor(h), torch.tensor(m))
    got = hl.gmu(jnp.asarray(h), jnp.asarray(m), jnp.asarray(w_in), jnp.asarray(w_out))
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("variant", ["L8-tied-gqa", pytest.param("L12-untied-mha", marks=pytest.mark.slow)])
def test_layout_logits_match_reference(tmp_path, variant):
    """The whole model loaded from Phi-4-mini-flash-named safetensors vs the transcription, and the 'last' mode."""
    config = HF_CONFIG if variant == "L8-tied-gqa" else HF_CONFIG | dict(
        num_hidden_layers=12, num_key_value_heads=4, tie_word_embeddings=False, sliding_window=5, mamba_dt_rank=3)
    sd = write_dir(tmp_path, config, seed=1)
    model = pdx.load_model(tmp_path)
    assert model.family is sb and model.cfg.num_layers == config["num_hidden_layers"]
    tokens = np.random.default_rng(2).integers(0, 64, (2, 11))
    want = ref.SambaYRef(sd, config)(torch.tensor(tokens)).numpy()
    got, _ = fwd(model.params, model.cfg, jnp.asarray(tokens), positions_like(tokens))
    np.testing.assert_allclose(np.asarray(got), want, atol=LOGIT_ATOL, rtol=0)
    last, _ = fwd(model.params, model.cfg, jnp.asarray(tokens), positions_like(tokens), logits="last")
    np.testing.assert_allclose(np.asarray(last[:, 0]), want[:, -1], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("layout", ["unstacked", pytest.param("stacked", marks=pytest.mark.slow)])
def test_cached_decode_equals_full_forward(tiny, layout):
    """Prefill N = 5 / 4 in two chunks of 3 (the second right-padded), then M = 9 O(1) steps per row: logits
    equal the transcription's uncached forward over the whole sequence; window 3 makes the ring buffers wrap."""
    _, sd, model = tiny
    cfg = model.cfg
    params = sb.stack_layers(model.params) if layout == "stacked" else model.params
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 14)))
    full = ref.SambaYRef(sd, HF_CONFIG)(torch.tensor(np.asarray(tokens))).numpy()  # uncached, every position
    cache = sb.init_cache(cfg, 2, 32)
    lens = np.array([5, 4])  # row 1's prompt is shorter: it decodes from position 4
    got = np.zeros((2, 14, cfg.vocab_size), np.float32)
    logits, cache = fwd(params, cfg, tokens[:, :3], positions_like(tokens[:, :3]), cache)
    got[:, :3] = logits
    chunk_valid = jnp.arange(3)[None] < jnp.asarray(lens - 3)[:, None]  # [2, 3]: 2 and 1 real tokens
    logits, cache = fwd(params, cfg, tokens[:, 3:6], 3 + positions_like(tokens[:, 3:6]), cache, valid=chunk_valid)
    for r in range(2):
        got[r, 3 : lens[r]] = logits[r, : lens[r] - 3]
    np.testing.assert_array_equal(np.asarray(cache.lengths), lens)
    for _ in range(9):
        pos = cache.lengths[:, None]
        tok = jnp.take_along_axis(tokens, pos, axis=1)
        logits, cache = fwd(params, cfg, tok, pos, cache)
        for r in range(2):
            got[r, int(pos[r, 0])] = logits[r, 0]
    for r in range(2):
        n = lens[r] + 9
        np.testing.assert_allclose(got[r, :n], full[r, :n], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
def test_last_mode_prefill_then_decode(tiny):
    """Linear prefill (cross-decoder on the last prompt token only) leaves the same cache as the full prefill."""
    _, _, model = tiny
    cfg = model.cfg
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 9)))
    valid = jnp.arange(9)[None] < jnp.array([[9], [6]])
    c_all = sb.init_cache(cfg, 2, 16)
    l_all, c_all = fwd(model.params, cfg, tokens, positions_like(tokens), c_all, valid=valid)
    l_last, c_last = fwd(model.params, cfg, tokens, positions_like(tokens), sb.init_cache(cfg, 2, 16), valid=valid,
                         logits="last")
    np.testing.assert_allclose(np.asarray(l_last[:, 0]), np.asarray(l_all[jnp.arange(2), jnp.array([8, 5])]),
                               atol=1e-5)
    for a, b in zip(jax.tree.leaves(c_all), jax.tree.leaves(c_last)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_generate_is_batch_invariant_and_compiles_once(tiny):
    """Greedy generation through the AR engine: a prompt alone == the same prompt in a padded batch, and new
    prompt content in the same bucket reuses the compiled programs."""
    _, _, model = tiny
    rng = np.random.default_rng(5)
    prompts = [rng.integers(2, 64, n).tolist() for n in (7, 3, 12)]
    opts = dict(max_new_tokens=24, stop_token_ids=[], prefill_chunk=4)
    alone = ar.generate(model, [prompts[0]], **opts)
    batch = ar.generate(model, prompts, **opts)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[0])
    assert alone.tokens.shape == (1, 24)
    before = compiled.compile_count(ar.decode), compiled.compile_count(ar.prefill)
    again = ar.generate(model, [rng.integers(2, 64, 5).tolist()] + prompts[1:], **opts)
    assert (compiled.compile_count(ar.decode), compiled.compile_count(ar.prefill)) == before
    np.testing.assert_array_equal(again.tokens[1], batch.tokens[1])


def test_cache_size_only_shared_kv_grows(tiny):
    _, _, model = tiny
    small, big = sb.init_cache(model.cfg, 1, 1024), sb.init_cache(model.cfg, 1, 2048)
    grown = sb.cache_bytes(big) - sb.cache_bytes(small)
    assert grown == small.k.nbytes + small.v.nbytes  # one layer's KV per 1024 slots, nothing else
    assert small.swa_k.shape[3] == model.cfg.sliding_window


def test_bad_config_raises():
    with pytest.raises(ConfigError, match="divisible by 4"):
        dataclasses.replace(sb.TINY, num_layers=6)
    for w in (0, -3):
        with pytest.raises(ConfigError, match="sliding_window"):
            dataclasses.replace(sb.TINY, sliding_window=w)
    with pytest.raises(ConfigError, match="even"):
        dataclasses.replace(sb.TINY, num_heads=3, num_kv_heads=1)
    with pytest.raises(ConfigError, match="divisible by 4"):
        ckpt.config_from_hf(HF_CONFIG | dict(num_hidden_layers=10))
    with pytest.raises(ConfigError, match="sliding_window"):
        ckpt.config_from_hf(HF_CONFIG | dict(sliding_window=0))
    with pytest.raises(UnsupportedError, match="mb_per_layer"):
        ckpt.config_from_hf(HF_CONFIG | dict(mb_per_layer=3))


def test_bad_input_raises(tiny):
    _, _, model = tiny
    tokens = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(InvalidInputError, match="token ids"):
        sb.forward(model.params, model.cfg, tokens + 64, positions_like(tokens))
    with pytest.raises(UnsupportedError, match="causal"):
        sb.forward(model.params, model.cfg, tokens, positions_like(tokens), mask_mode="bidirectional")
    with pytest.raises(InvalidInputError, match="rows"):
        sb.forward(model.params, model.cfg, tokens, positions_like(tokens), sb.init_cache(model.cfg, 2, 8))


def test_checkpoint_mismatch_raises(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = write_dir(tmp_path, HF_CONFIG)
    st = str(tmp_path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if k != "model.layers.5.attn.inner_cross_attn.lambda_q1"}, st)
    with pytest.raises(ModelLoadError, match="missing tensor 'model.layers.5.attn.inner_cross_attn.lambda_q1'"):
        pdx.load_model(tmp_path)
    save_file(sd | {"model.layers.2.attn.A_log": torch.zeros(64, 5)}, st)
    with pytest.raises(ModelLoadError, match="model.layers.2.attn.A_log.*implies"):
        pdx.load_model(tmp_path)
    save_file(sd | {"model.layers.8.mlp.fc1.weight": torch.zeros(80, 32)}, st)
    with pytest.raises(ModelLoadError, match="does not explain"):
        pdx.load_model(tmp_path)
    save_file(sd, st)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG | dict(intermediate_size=48)))
    with pytest.raises(ModelLoadError, match="mlp.fc1.weight"):
        pdx.load_model(tmp_path)
    assert set(load_file(st)) == set(sd)


def test_save_roundtrip(tiny, tmp_path):
    """`sambay_checkpoint.save` writes the naming `load` reads (used for pdx-trained checkpoints)."""
    _, _, model = tiny
    ckpt.save(tmp_path, model.cfg, model.params)
    cfg2, params2 = ckpt.load(tmp_path)
    assert cfg2 == model.cfg
    for a, b in zip(jax.tree.leaves(sb.stack_layers(model.params)), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes on CI
def test_rollback_to_any_prefix_equals_feeding_the_prefix(tiny):
    """After a traced 5-token forward (window 3: the ring buffers wrap within it), `rollback` to n tokens
    per row equals a forward over only those n tokens from the same cache: every buffer and the next logits."""
    _, _, model = tiny
    cfg, params = model.cfg, model.params
    rng = np.random.default_rng(5)
    prompt = jnp.asarray(rng.integers(0, 64, (2, 4)), jnp.int32)
    draft = jnp.asarray(rng.integers(0, 64, (2, 5)), jnp.int32)
    _, cache = fwd(params, cfg, prompt, positions_like(prompt), sb.init_cache(cfg, 2, 16))
    _, after, trace = fwd(params, cfg, draft, 4 + positions_like(draft), cache, trace=True)
    rollback = jax.jit(sb.rollback, static_argnums=1)
    nxt = jnp.asarray([[7], [9]], jnp.int32)
    for n in ([0, 5], [1, 3], [4, 2]):
        keep = jnp.asarray(n)
        got = rollback(params, cfg, cache, after, trace, keep)
        _, want = fwd(params, cfg, draft, 4 + positions_like(draft), cache, valid=jnp.arange(5)[None] < keep[:, None])
        assert got.lengths.tolist() == want.lengths.tolist() == [4 + k for k in n]
        for name in ("conv", "ssm", "swa_k", "swa_v"):
            np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), atol=1e-5)
        step_got, _ = fwd(params, cfg, nxt, got.lengths[:, None], got)
        step_want, _ = fwd(params, cfg, nxt, want.lengths[:, None], want)
        np.testing.assert_allclose(np.asarray(step_got), np.asarray(step_want), atol=1e-5)
