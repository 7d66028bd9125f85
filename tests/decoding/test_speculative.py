"""Speculative decoding: identical greedy output to the AR engine, lossless sampling, stats, errors."""

import dataclasses
import itertools
import re
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx.decoding import ar, compiled
from pdx.decoding.speculative import drafters, engine
from pdx.errors import InvalidInputError
from pdx.model import Model
from pdx.models import transformer as tf
from tests.decoding.smollm2_parity import assert_greedy_identical_to_ar
from tests.decoding.test_ar import HUMANEVAL, _chi_square_ok


def tiny(vocab=128, seed=0, layers=3, scale=0.3):
    cfg = dataclasses.replace(tf.SMOLLM2_135M, vocab_size=vocab, hidden_size=64, intermediate_size=96,
                              num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, eos_token_ids=(2,))
    return Model(cfg=cfg, params=tf.init_params(cfg, jax.random.PRNGKey(seed), scale=scale), tokenizer=None, family=tf)


@pytest.fixture(scope="module")
def target():
    return tiny()


PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11], [3, 4, 3, 4, 3, 4, 3, 4, 9]]


# The conformance matrix (tests/decoding/test_conformance.py) checks every drafter's exactness on every
# family; the default suite keeps the self-draft here for its full-acceptance check.
@pytest.mark.parametrize("make", ["self"] + [pytest.param(m, marks=pytest.mark.slow) for m in ("pld", "random",
                                                                                                 "layer_skip")])
def test_greedy_identical_to_ar_tiny(target, make):
    k = 4
    drafter = {"pld": lambda: drafters.PromptLookup(k=k),
               "self": lambda: drafters.draft_model(target, target, k),
               "random": lambda: drafters.draft_model(target, tiny(seed=7, layers=1), k),
               "layer_skip": lambda: drafters.layer_skip(target, [1], k)}[make]()
    ref = ar.generate(target, PROMPTS, max_new_tokens=40, stop_token_ids=[])
    out = engine.generate(target, PROMPTS, drafter=drafter, max_new_tokens=40, stop_token_ids=[])
    for i in range(len(PROMPTS)):
        assert out.row(i) == ref.row(i), i
    if make == "self":
        assert out.stats["accepted"] == out.stats["drafted"] > 0  # the target drafting for itself: all accepted
        assert out.stats["acceptance_by_position"] == [1.0] * k


@pytest.mark.slow  # 22 s (the default suite ran 16 min); tiny-model PLD parity stays in the default suite
def test_greedy_identical_to_ar_smollm2_pld(smollm2, humaneval):
    prompts = [smollm2.tokenizer.encode(humaneval[t]["prompt"]) for t in HUMANEVAL[:2]]
    ref = ar.generate(smollm2, prompts, max_new_tokens=64)
    out = engine.generate(smollm2, prompts, drafter=drafters.PromptLookup(k=4), max_new_tokens=64)
    assert [out.row(i) for i in range(2)] == [ref.row(i) for i in range(2)]
    assert out.stats["target_passes"] < 64  # some drafts were accepted


@pytest.mark.slow
@pytest.mark.parametrize("make", ["pld", "layer_skip"])
def test_greedy_identical_to_ar_smollm2_humaneval(smollm2, humaneval, make):
    drafter = drafters.PromptLookup(k=4) if make == "pld" else drafters.layer_skip(smollm2, list(range(8, 30, 2)), 4)
    assert_greedy_identical_to_ar(smollm2, humaneval, drafter)


def test_stop_tokens_and_lengths_match_ar(target):
    free = ar.generate(target, PROMPTS, max_new_tokens=30, stop_token_ids=[])
    stop = int(free.tokens[1, 5])
    ref = ar.generate(target, PROMPTS, max_new_tokens=30, stop_token_ids=[stop])
    out = engine.generate(target, PROMPTS, drafter=drafters.PromptLookup(k=3), max_new_tokens=30,
                          stop_token_ids=[stop])
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_adaptive_k_and_runtime_k_do_not_recompile(target):
    drafter = drafters.PromptLookup(k=5)
    engine.generate(target, PROMPTS, drafter=drafter, max_new_tokens=20, adaptive=True)
    before = compiled.compile_count(engine.spec_decode), compiled.compile_count(engine.spec_prefill)
    ref = ar.generate(target, [PROMPTS[2]], max_new_tokens=20)
    for k_init in (1, 3, 5):
        out = engine.generate(target, [PROMPTS[2], [7, 7, 1]], drafter=drafter, max_new_tokens=20, adaptive=True,
                              k_init=k_init, seed=k_init)
        assert out.row(0) == ref.row(0)
    # batch bucket 2 was compiled above for ar only; spec compiled once for bucket 4 before
    after = compiled.compile_count(engine.spec_decode), compiled.compile_count(engine.spec_prefill)
    assert after[0] - before[0] <= 1 and after[1] - before[1] <= 1


@dataclasses.dataclass(frozen=True)
class NoDraft:
    """A chain drafter that never proposes: every iteration takes the one-token step."""

    k: int = 3
    KIND: ClassVar[str] = "chain"
    cfg: ClassVar[None] = None

    def arrays(self, model):
        return ()

    def init(self, arrays, plan, prompt_buf, prompt_lens):
        return ()

    def propose(self, arrays, state, hist, pos, k, sampling, key):
        b = hist.shape[0]
        return jnp.zeros((b, self.k), jnp.int32), jnp.zeros((b,), jnp.int32), None, state


@pytest.mark.slow  # 15 s: the default suite ran 15:27; the chain loop's HLO copy count stays in it
def test_a_pass_with_no_draft_is_one_token_step(target):
    ref = ar.generate(target, PROMPTS, max_new_tokens=12, stop_token_ids=[])
    out = engine.generate(target, PROMPTS, drafter=NoDraft(), max_new_tokens=12, stop_token_ids=[])
    assert [out.row(i) for i in range(3)] == [ref.row(i) for i in range(3)]
    assert out.stats["one_token_passes"] == out.stats["target_passes"] == 11  # the first token is prefill's
    pld = engine.generate(target, PROMPTS, drafter=drafters.PromptLookup(k=3), max_new_tokens=12,
                          stop_token_ids=[])  # some rows match an n-gram some of the time: both kinds of pass
    assert [pld.row(i) for i in range(3)] == [ref.row(i) for i in range(3)]
    assert 0 < pld.stats["one_token_passes"] < pld.stats["target_passes"]


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_no_draft_step_copies_no_cache(target, layout):
    """The decode loop's compiled program holds no copy of a KV buffer: the one-token step and the K+1 pass
    are zero-or-one-trip loops (a `lax.cond` between them copied every buffer each iteration)."""
    model = dataclasses.replace(target, params=tf.unstack_layers(target.params) if layout == "per_layer"
                                else tf.stack_layers(target.params))
    drafter = drafters.PromptLookup(k=3)
    req = ar.make_request(model, PROMPTS, {"max_new_tokens": 8}, step_tokens=drafter.k + 2)
    statics = {"family": model.family, "cfg": model.cfg, "drafter": drafter}
    (state, _), _ = compiled.run(engine.spec_prefill, statics | {"plan": req.plan}, model.params, (),
                                 req.prompt_buf, req.prompt_lens, req.sampling, req.stop_ids, req.key, jnp.int32(3))
    hlo = engine.spec_decode.lower(model.params, (), state, req.sampling, req.stop_ids, **statics,
                                   adaptive=False).compile().as_text()
    buf = state.cache.k[0] if layout == "per_layer" else state.cache.k
    shape = re.escape(f"f32[{','.join(map(str, buf.shape))}]")
    assert hlo.count(" while(") >= 3  # the decode loop and its two passes
    assert not re.search(shape + r"\S* copy\(", hlo), "a KV buffer is copied"


def _exact_joint(model, prompt, temperature, top_k, steps=3):
    """Exact target distribution of the first `steps` sampled tokens, by enumeration."""
    from pdx.decoding.sampling import SamplingParams, filter_logits

    sp = SamplingParams.create(temperature=temperature, top_k=top_k)
    v = model.cfg.vocab_size
    seqs = np.array(list(itertools.product(range(v), repeat=steps)))  # [V^steps, steps]
    full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], axis=1)
    pos = jnp.broadcast_to(jnp.arange(full.shape[1]), full.shape)
    logits, _ = tf.forward(model.params, model.cfg, jnp.asarray(full), pos)
    logp = jax.nn.log_softmax(filter_logits(logits[:, len(prompt) - 1 : -1].reshape(-1, v), sp), -1)
    logp = np.asarray(logp).reshape(len(seqs), steps, v)
    lp = np.take_along_axis(logp, seqs[:, :, None], axis=2)[..., 0].sum(1)
    return np.exp(lp), seqs


@pytest.mark.parametrize("kind, knobs", [
    ("draft", dict(temperature=1.0, top_k=0)),
    pytest.param("draft", dict(temperature=1.0, top_k=0, verifier="traversal"), marks=pytest.mark.slow),
    pytest.param("pld", dict(temperature=1.0, top_k=0), marks=pytest.mark.slow),
    pytest.param("draft", dict(temperature=0.8, top_k=3), marks=pytest.mark.slow),
])
def test_speculative_sampling_is_lossless(kind, knobs):
    """Chi-square: the joint law of the first 3 sampled tokens equals the target's (vocab 5, 2048 rows)."""
    model = tiny(vocab=5, scale=0.8)
    prompt = [1, 2, 3, 1, 2]
    drafter = drafters.PromptLookup(k=2, max_ngram=2) if kind == "pld" else \
        drafters.draft_model(model, tiny(vocab=5, seed=3, layers=1, scale=0.8), 2)
    assert_lossless(model, prompt, drafter, knobs)


def test_one_token_steps_sample_losslessly():
    model = tiny(vocab=5, scale=0.8)
    prompt = [1, 2, 3, 1, 2]
    out = engine.generate(model, [prompt] * 2048, drafter=NoDraft(k=2), max_new_tokens=3, stop_token_ids=[],
                          seed=5, temperature=1.0)
    assert out.stats["one_token_passes"] == out.stats["target_passes"] == 2
    probs, seqs = _exact_joint(model, prompt, 1.0, 0)
    index = {tuple(s): i for i, s in enumerate(seqs)}
    assert _chi_square_ok(np.array([index[tuple(r)] for r in out.tokens]), probs / probs.sum())


def assert_lossless(model, prompt, drafter, knobs):
    """2048 sampled rows of 3 tokens: some drafts rejected, and the joint law equals the target's (chi-square)."""
    out = engine.generate(model, [prompt] * 2048, drafter=drafter, max_new_tokens=3, stop_token_ids=[],
                          seed=11, **knobs)
    assert out.stats["drafted"] > 0 and 0 < out.stats["accepted"] < out.stats["drafted"]
    probs, seqs = _exact_joint(model, prompt, knobs["temperature"], knobs["top_k"])
    index = {tuple(s): i for i, s in enumerate(seqs)}
    samples = np.array([index[tuple(r)] for r in out.tokens])
    assert _chi_square_ok(samples, probs / probs.sum())


def test_bad_input(target):
    with pytest.raises(InvalidInputError, match="K must be an int >= 1"):
        engine.generate(target, PROMPTS, drafter=drafters.PromptLookup(k=0))
    with pytest.raises(InvalidInputError, match="vocabulary"):
        engine.generate(target, PROMPTS, drafter=drafters.draft_model(target, tiny(vocab=64), 3))
    with pytest.raises(InvalidInputError, match="cache holds"):
        engine.generate(target, [[1] * 50], drafter=drafters.PromptLookup(k=8), max_new_tokens=10, max_len=64)
    with pytest.raises(InvalidInputError, match="k_init"):
        engine.generate(target, PROMPTS, drafter=drafters.PromptLookup(k=2), k_init=3)
    with pytest.raises(InvalidInputError, match="repetition_penalty"):
        engine.generate(target, PROMPTS, drafter=drafters.PromptLookup(k=2), repetition_penalty=1.2)
    with pytest.raises(InvalidInputError, match="verifier must be one of"):
        engine.generate(target, PROMPTS, drafter=drafters.PromptLookup(k=2), verifier="tree")


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes on CI
def test_layer_skip_calibration_picks_the_best_single_layer(target):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 3, 4, 12]]
    chosen = drafters.calibrate_layer_skip(target, prompts, 1)
    full = [np.asarray(tf.forward(target.params, target.cfg, jnp.asarray([p]), jnp.arange(len(p))[None])[0][0])
            .argmax(-1) for p in prompts]

    def agreement(i):
        d = drafters.layer_skip(target, [i], 1)
        outs = [np.asarray(tf.forward(d.params, d.cfg, jnp.asarray([p]), jnp.arange(len(p))[None])[0][0]).argmax(-1)
                for p in prompts]
        return np.mean(np.concatenate([o == f for o, f in zip(outs, full)]))

    scores = [agreement(i) for i in range(target.cfg.num_layers)]
    assert scores[chosen[0]] == max(scores)
    two = drafters.calibrate_layer_skip(target, prompts, 2)
    assert len(set(two)) == 2 and chosen[0] in two
    with pytest.raises(InvalidInputError, match="num_skip"):
        drafters.calibrate_layer_skip(target, prompts, 3)
