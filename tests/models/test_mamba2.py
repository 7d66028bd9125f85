"""Mamba-2 on tiny random configs: transformers parity (logits, 64 greedy tokens), cache paths, rollback, errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pdx
from pdx.errors import ConfigError, InvalidInputError, UnsupportedError
from pdx.models import mamba2 as m2

ATOL = 1e-4  # fp32 logits of magnitude ~1-5 through 2 layers; observed errors are ~1e-6
STATE_ATOL = 1e-5

BASE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, head_dim=16, expand=2, pad_token_id=0,
            bos_token_id=None, eos_token_id=None)
VARIANTS = {  # name -> transformers Mamba2Config overrides (heads = 2 * 32 / 16 = 4 unless head_dim changes)
    "g1-tied-chunk5": dict(num_heads=4, state_size=16, n_groups=1, chunk_size=5, tie_word_embeddings=True),
    "g2-untied-bias": dict(num_heads=4, state_size=8, n_groups=2, chunk_size=4, use_bias=True,
                           tie_word_embeddings=False),
    "g4-state32-k3": dict(num_heads=8, head_dim=8, state_size=32, n_groups=4, chunk_size=16, conv_kernel=3,
                          tie_word_embeddings=False),
}


@pytest.fixture(autouse=True, scope="module")
def torch_one_thread():
    """transformers' slow path is ~25x slower with 2 torch threads on this shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_hf(variant: str, seed: int = 0, **overrides):
    """A random transformers Mamba2ForCausalLM with non-trivial norms, D, A and biases."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(Mamba2Config(**(BASE | VARIANTS[variant] | overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".D"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "bias" in name and "dt_bias" not in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("A_log"):
                p.add_(0.3 * torch.randn_like(p))
    model.generation_config.eos_token_id = None
    return model


def save_hf(tmp_path, variant: str, seed: int = 0, **overrides):
    model = make_hf(variant, seed, **overrides)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def positions_like(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


@functools.partial(jax.jit, static_argnames=("cfg", "steps"))
def greedy(params, cfg, prompt, steps):
    """Cached greedy decoding: chunked prefill, then `steps - 1` O(1) steps in one fori_loop. Returns [B, steps]."""
    b = prompt.shape[0]
    logits, cache = m2.forward(params, cfg, prompt, positions_like(prompt), m2.init_cache(cfg, b))
    tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    out = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(tok)

    def body(i, carry):
        out, tok, cache = carry
        logits, cache = m2.forward(params, cfg, tok[:, None], cache.lengths[:, None], cache)
        tok = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
        return out.at[:, i].set(tok), tok, cache

    return jax.lax.fori_loop(1, steps, body, (out, tok, cache))[0]


step_fn = jax.jit(m2.forward, static_argnums=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_with_transformers(tmp_path, variant):
    """Logits of a full forward (atol 1e-4) and 64 greedy tokens through both libraries' caches."""
    path, ref_model = save_hf(tmp_path, variant)
    model = pdx.load_model(path)
    assert model.family is m2
    tokens = np.random.default_rng(0).integers(0, 96, (2, 13))  # 13: no chunk size above divides it
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    ours, _ = step_fn(model.params, model.cfg, jnp.asarray(tokens), positions_like(tokens))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)

    prompt = tokens[:, :9]
    with torch.no_grad():
        gen = ref_model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                                 max_new_tokens=64, do_sample=False, use_cache=True, output_logits=True,
                                 return_dict_in_generate=True)
    ref_tokens = gen.sequences[:, 9:].numpy()
    tokens64 = np.asarray(greedy(model.params, model.cfg, jnp.asarray(prompt), 64))
    for row in range(2):
        mismatch = np.flatnonzero(ref_tokens[row] != tokens64[row])
        if mismatch.size:  # allowed only where transformers' own top two logits tie within 1e-5
            top2 = np.sort(gen.logits[mismatch[0]][row].numpy())[-2:]
            assert top2[1] - top2[0] < 1e-5, f"row {row} diverges at token {mismatch[0]} without a tie"


def test_binding_dt_limit_matches_transformers_chunked_forward(tmp_path):
    """A binding time_step_limit: transformers clamps dt in its chunked path; pdx does there and in the step."""
    path, ref_model = save_hf(tmp_path, "g4-state32-k3", time_step_limit=(0.01, 0.2))
    model = pdx.load_model(path)
    assert model.cfg.dt_limit == (0.01, 0.2)
    tokens = np.random.default_rng(0).integers(0, 96, (2, 13))
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    ours, _ = step_fn(model.params, model.cfg, jnp.asarray(tokens), positions_like(tokens))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    """One tiny config for the cache tests, so they share compiled programs ([2, 6] prefill, [2, 1] step)."""
    cfg = m2.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, head_dim=8, state_size=8, n_groups=2,
                    chunk_size=4, tie_embeddings=False)
    return cfg, jax.jit(m2.init_params, static_argnums=(0, 2, 3))(cfg, jax.random.PRNGKey(3), jnp.float32, 0.2)


def feed_one_by_one(params, cfg, tokens, cache, valid=None):
    """Logits [B, T, V] and cache from T single-token (O(1) step) forwards; `valid [B, T]` freezes rows."""
    outs = []
    for i in range(tokens.shape[1]):
        logits, cache = step_fn(params, cfg, tokens[:, i : i + 1], cache.lengths[:, None], cache,
                                valid=None if valid is None else valid[:, i : i + 1])
        outs.append(logits)
    return jnp.concatenate(outs, 1), cache


def test_prefill_pieces_then_decode_match_full_forward(tiny):
    cfg, params = tiny
    n1, n2, m = 6, 5, 4  # chunk_size 4 divides neither piece
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, n1 + n2 + m)), jnp.int32)
    pos = positions_like(tokens)
    full, full_cache = step_fn(params, cfg, tokens, pos, m2.init_cache(cfg, 2))
    logits1, cache = step_fn(params, cfg, tokens[:, :n1], pos[:, :n1], m2.init_cache(cfg, 2))
    logits2, cache = step_fn(params, cfg, tokens[:, n1 : n1 + n2], pos[:, n1 : n1 + n2], cache)
    logits3, cache = feed_one_by_one(params, cfg, tokens[:, n1 + n2 :], cache)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([logits1, logits2, logits3], 1)), np.asarray(full),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(cache.ssm), np.asarray(full_cache.ssm), atol=STATE_ATOL)
    np.testing.assert_allclose(np.asarray(cache.conv), np.asarray(full_cache.conv), atol=STATE_ATOL)
    assert cache.lengths.tolist() == [n1 + n2 + m] * 2


def test_right_padded_batch_equals_rows_alone(tiny):
    """Rows of 6 and 3 tokens right-padded in one prefill, then 2 decode steps: each row as if run alone."""
    cfg, params = tiny
    seqs = [[5, 9, 3, 7, 1, 2], [4, 8, 6]]
    extra = jnp.asarray([[12, 13], [14, 15]], jnp.int32)
    padded = jnp.asarray([s + [0] * (6 - len(s)) for s in seqs], jnp.int32)
    valid = jnp.arange(6)[None] < jnp.asarray([[len(s)] for s in seqs])
    _, cache = step_fn(params, cfg, padded, positions_like(padded), m2.init_cache(cfg, 2), valid=valid)
    assert cache.lengths.tolist() == [len(s) for s in seqs]
    logits, cache = feed_one_by_one(params, cfg, extra, cache)
    for b, s in enumerate(seqs):
        alone = jnp.asarray([s], jnp.int32)
        ref, ref_cache = feed_one_by_one(params, cfg, jnp.concatenate([alone, extra[b : b + 1]], 1),
                                         m2.init_cache(cfg, 1))
        np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(ref[0, len(s) :]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(cache.ssm[:, b]), np.asarray(ref_cache.ssm[:, 0]), atol=STATE_ATOL)
        np.testing.assert_allclose(np.asarray(cache.conv[:, b]), np.asarray(ref_cache.conv[:, 0]), atol=STATE_ATOL)


def test_frozen_rows_keep_their_state_in_a_decode_step(tiny):
    cfg, params = tiny
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6], [4, 5, 6, 7, 8, 9]], jnp.int32)
    _, cache = step_fn(params, cfg, tokens, positions_like(tokens), m2.init_cache(cfg, 2))
    _, stepped = feed_one_by_one(params, cfg, jnp.asarray([[7], [8]], jnp.int32), cache, jnp.asarray([[True], [False]]))
    assert stepped.lengths.tolist() == [7, 6]
    np.testing.assert_array_equal(np.asarray(stepped.ssm[:, 1]), np.asarray(cache.ssm[:, 1]))
    np.testing.assert_array_equal(np.asarray(stepped.conv[:, 1]), np.asarray(cache.conv[:, 1]))
    assert not np.allclose(np.asarray(stepped.ssm[:, 0]), np.asarray(cache.ssm[:, 0]))


def test_unstacked_layers_match_stacked(tiny):
    """Per-layer weights (the fast decode layout) give the same prefill and decode as the stacked ones."""
    cfg, params = tiny
    unstacked = m2.unstack_layers(params)
    assert isinstance(unstacked["layers"], tuple) and len(unstacked["layers"]) == cfg.num_layers
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], jnp.int32)
    results = []
    for p in (params, unstacked):
        logits, cache = step_fn(p, cfg, tokens, positions_like(tokens), m2.init_cache(cfg, 2))
        step_logits, cache = feed_one_by_one(p, cfg, tokens[:, :2], cache)
        results.append((logits, step_logits, cache.ssm, cache.conv))
    for a, b in zip(*results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_decode_step_is_one_program_for_every_position(tiny):
    """The T == 1 cached forward compiles once whatever the context, and it is the recurrence, not a chunk."""
    cfg, params = tiny
    step = jax.jit(m2.forward, static_argnums=1, donate_argnums=4)
    cache = m2.init_cache(cfg, 1)
    tok = jnp.asarray([[3]], jnp.int32)
    for length in (1, 1000, 100_000):
        cache = dataclasses.replace(cache, lengths=jnp.asarray([length], jnp.int32))
        _, cache = step(params, cfg, tok, cache.lengths[:, None], cache)
    assert step._cache_size() == 1
    jaxpr = str(jax.make_jaxpr(m2.forward, static_argnums=1)(params, cfg, tok, tok, cache))
    assert "cumsum" not in jaxpr  # the chunked scan's segment sums never run in a decode step
    chunked = str(jax.make_jaxpr(m2.forward, static_argnums=1)(params, cfg, jnp.ones((1, 2), jnp.int32),
                                                              jnp.ones((1, 2), jnp.int32), cache))
    assert "cumsum" in chunked


def test_verify_states_rewind_to_any_prefix(tiny):
    """After a K+1 = 5 token forward, `rewind` to n tokens per row equals feeding only those n tokens."""
    cfg, params = tiny
    rng = np.random.default_rng(4)
    prompt = jnp.asarray(rng.integers(0, 64, (2, 6)), jnp.int32)
    draft = jnp.asarray(rng.integers(0, 64, (2, 5)), jnp.int32)
    _, cache = step_fn(params, cfg, prompt, positions_like(prompt), m2.init_cache(cfg, 2))
    verify = jax.jit(functools.partial(m2.forward, trace=True), static_argnums=1)
    _, full_cache, trace = verify(params, cfg, draft, 6 + positions_like(draft), cache)
    rewind = jax.jit(m2.rewind, static_argnums=1)
    for n in ([0, 5], [1, 3], [4, 2]):
        got = rewind(params, cfg, cache, trace, jnp.asarray(n))
        _, want = feed_one_by_one(params, cfg, draft, cache, jnp.arange(5)[None] < jnp.asarray(n)[:, None])
        assert got.lengths.tolist() == want.lengths.tolist() == [6 + k for k in n]
        np.testing.assert_allclose(np.asarray(got.conv), np.asarray(want.conv), atol=STATE_ATOL)
        np.testing.assert_allclose(np.asarray(got.ssm), np.asarray(want.ssm), atol=STATE_ATOL)
    full = rewind(params, cfg, cache, trace, jnp.asarray([5, 5]))
    np.testing.assert_allclose(np.asarray(full.ssm), np.asarray(full_cache.ssm), atol=STATE_ATOL)
    np.testing.assert_allclose(np.asarray(full.conv), np.asarray(full_cache.conv), atol=STATE_ATOL)


def test_bad_inputs_raise_pdx_errors(tiny):
    cfg, params = tiny
    tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
    with pytest.raises(UnsupportedError, match="causal"):
        m2.forward(params, cfg, tokens, tokens, mask_mode="bidirectional")
    with pytest.raises(UnsupportedError, match="refill"):
        m2.forward(params, cfg, tokens, tokens, m2.init_cache(cfg, 1), refill=True)
    with pytest.raises(InvalidInputError, match="token ids"):
        m2.forward(params, cfg, jnp.asarray([[1, 64]], jnp.int32), tokens[:, :2])
    with pytest.raises(InvalidInputError, match="token ids"):
        m2.forward(params, cfg, jnp.asarray([[-1, 2]], jnp.int32), tokens[:, :2])
    with pytest.raises(InvalidInputError, match="valid"):
        m2.forward(params, cfg, tokens, tokens, valid=jnp.ones((1, 2), bool))
    with pytest.raises(InvalidInputError, match="rows"):
        m2.forward(params, cfg, tokens, tokens, m2.init_cache(cfg, 2))
    with pytest.raises(ConfigError, match="n_groups"):
        dataclasses.replace(cfg, n_groups=3)
    with pytest.raises(ConfigError, match="conv_kernel"):
        dataclasses.replace(cfg, conv_kernel=1)
    with pytest.raises(ConfigError, match="state_size"):
        dataclasses.replace(cfg, state_size=0)
    with pytest.raises(ConfigError, match="dt_limit"):
        dataclasses.replace(cfg, dt_limit=(0.5, 0.1))


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes on CI
def test_ar_engine_generates_with_mamba2(tmp_path):
    """The AR engine drives Mamba-2 through the protocol: padded batch == each row's own cached greedy loop."""
    from pdx.decoding import ar

    path, _ = save_hf(tmp_path, "g2-untied-bias")
    model = pdx.load_model(path)
    prompts = [[5, 9, 3, 7, 1, 2, 8], [4, 8, 6], [11, 12, 13, 14, 15]]
    out = ar.generate(model, prompts, max_new_tokens=24, stop_token_ids=[])
    for i, p in enumerate(prompts):
        alone = np.asarray(greedy(model.params, model.cfg, jnp.asarray([p]), 24))[0]
        assert out.row(i) == alone.tolist(), i
    sampled = ar.generate(model, prompts, max_new_tokens=8, temperature=0.9, top_p=0.9, seed=1)
    assert sampled.tokens.shape == (3, 8)
