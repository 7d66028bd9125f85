"""The training-free commit rules (LocalLeap, CreditDecoding, CD4LM's CAD, Prophet) against their PyTorch
transcriptions (tests/reference/dllm_rules_torch.py), step by step on the random tiny Llama; batch
invariance; traced knobs; bad options refused before anything compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx.decoding.diffusion import cd4lm, credit, fast_dllm, llada, localleap, policies, prophet
from pdx.errors import InvalidInputError
from tests.decoding.diffusion.test_interface import CompileCounter
from tests.decoding.diffusion.tiny_llama import EOS, PROMPTS, check_against_reference
from tests.reference import dllm_rules_torch as rules

RUN = dict(max_new_tokens=16, block_size=8)
# name -> (generate, options, reference rule): knobs where the rule departs from its base rule here
CASES = {
    "prophet": (prophet.generate, dict(early=1.0, mid=0.7, late=0.4), rules.prophet(8, 8, 16, 1.0, 0.7, 0.4)),
    "localleap": (localleap.generate, dict(threshold=0.4, relaxed_threshold=0.12, radius=2),
                  rules.localleap(0.4, 0.12, 2)),
    "cd4lm-cad": (cd4lm.generate, dict(threshold=0.15, max_per_step=2, eos_ratio=0.5),
                  rules.cad(0.15, 2, 0.5, (EOS,))),
    "credit": (credit.generate, dict(threshold=0.4, alpha=0.7, beta=0.8, gamma=0.2),
               rules.credit(0.4, 0.7, 0.8, 0.2)),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_torch_transcription_step_by_step(models, name):
    model, ref = models
    generate, options, rule = CASES[name]
    result = generate(model, PROMPTS, cache="none", **RUN, **options)
    check_against_reference(ref, result, rule=rule)
    if name == "prophet":  # LLaDA one token per step until the all-in
        plain = llada.generate(model, PROMPTS, steps=16, **RUN)
        assert result.stats["nfe"] < plain.stats["nfe"] and max(map(max, result.stats["committed_per_step"])) > 8
    else:
        plain = fast_dllm.generate(model, PROMPTS, threshold=options["threshold"], cache="none", **RUN)
    assert not np.array_equal(result.stats["commit_step"], plain.stats["commit_step"])  # the rule acted


@pytest.mark.parametrize("name, cache", [("localleap", "dual"), ("cd4lm-cad", "prefix"), ("credit", "dual"),
                                         ("prophet", "dual")])
def test_block_causal_caches_match_torch(models, name, cache):
    """Under block-causal attention the caches are exact, so the rules keep their reference tokens."""
    model, ref = models
    generate, options, rule = CASES[name]
    result = generate(model, PROMPTS, cache=cache, attention="block_causal", **RUN, **options)
    check_against_reference(ref, result, rule=rule, attention="block_causal")


@pytest.mark.slow  # 12 decodes; the conformance matrix checks every strategy's padded rows in the slow suite too
@pytest.mark.parametrize("name", CASES)
def test_row_alone_equals_row_in_padded_batch(models, name):
    model, _ = models
    generate, options, _ = CASES[name]
    prompts = PROMPTS + [list(range(3, 23))]  # 20 tokens: the batch canvas is 16 columns wider
    batch = generate(model, prompts, cache="dual", **RUN, **options)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], cache="dual", **RUN, **options)
        assert alone.row(0) == batch.row(i) and alone.stats["row_nfe"][0] == batch.stats["row_nfe"][i]


def test_cad_caps_commits_per_step(models):
    model, _ = models
    generate, options, _ = CASES["cd4lm-cad"]
    capped = generate(model, PROMPTS, cache="none", **RUN, **options)
    assert max(max(row) for row in capped.stats["committed_per_step"]) == 2
    free = generate(model, PROMPTS, cache="none", **RUN, **(options | dict(max_per_step=8)))
    assert max(max(row) for row in free.stats["committed_per_step"]) > 2


def _context(x0, conf, decoded):
    x0, conf = jnp.asarray([x0], jnp.int32), jnp.asarray([conf], jnp.float32)
    masked = jnp.isfinite(conf)
    return policies.StepContext(jnp.zeros((*x0.shape, 8)), x0, conf, masked, jnp.int32(0),
                                jnp.zeros((*x0.shape, 8)), jnp.asarray([decoded], jnp.float32), masked, jnp.int32(0))


def test_cad_holds_eos_back_until_the_ratio_is_decoded():
    policy, knobs = cd4lm.ConfidenceAdaptive((EOS,)), dict(threshold=0.5, max_per_step=jnp.float32(4),
                                                            eos_ratio=0.3)
    ctx = _context([EOS, 5, 6, EOS], [0.99, 0.7, 0.2, 0.9], decoded=0.1)
    assert policy.commit(ctx, knobs).tolist() == [[False, True, False, False]]  # the EOS candidates wait
    later = ctx._replace(decoded=jnp.asarray([0.3]))
    assert policy.commit(later, knobs).tolist() == [[True, True, False, True]]
    only_eos = _context([EOS, 4, EOS], [0.9, -np.inf, 0.8], decoded=0.0)
    assert policy.commit(only_eos, knobs).tolist() == [[True, False, False]]  # all held back: the leftmost


def test_localleap_relaxes_only_near_an_anchor():
    knobs = dict(threshold=0.9, relaxed_threshold=0.5, radius=jnp.float32(1))
    ctx = _context([3] * 6, [0.95, 0.6, 0.6, 0.3, 0.6, -np.inf], decoded=0.0)
    assert localleap.LocalLeap().commit(ctx, knobs).tolist() == [[True, True, False, False, False, False]]
    none = _context([3] * 3, [0.6, 0.7, 0.6], decoded=0.0)  # no anchor: the best one alone
    assert localleap.LocalLeap().commit(none, knobs).tolist() == [[False, True, False]]


def test_credit_builds_up_for_a_steady_prediction():
    """A position predicting the same token at 0.5 twice reaches the threshold on credit alone."""
    policy, knobs = credit.Credit(), dict(threshold=0.6, alpha=0.7, beta=0.8, gamma=0.2)
    logits = jnp.log(jnp.asarray([[[0.5, 0.3, 0.2], [0.4, 0.35, 0.25]]]))  # [1, 2, 3]
    every = jnp.ones((1, 2), bool)
    ctx = policies.StepContext(logits, jnp.asarray([[0, 0]]), jnp.asarray([[0.5, 0.4]]), every, jnp.int32(0),
                               jnp.zeros_like(logits), jnp.zeros((1,)), every, jnp.int32(0))
    state = policy.init_state(1, 2, 3)
    commit, tokens, state = policy.step(ctx, knobs, state)
    assert commit.tolist() == [[True, False]]  # the best one, below the threshold
    np.testing.assert_allclose(state[0, :, 0], [0.5 ** 0.2, 0.4 ** 0.2], rtol=1e-6)
    ctx = ctx._replace(step=jnp.int32(1), masked=jnp.asarray([[False, True]]))
    commit, _, state = policy.step(ctx, knobs, state)
    np.testing.assert_allclose(state[0, 1, 0], 0.8 * 0.4 ** 0.2 + 0.4 ** 0.2, rtol=1e-6)
    fused = jax.nn.softmax(logits[0, 1] + 0.7 * jnp.log1p(state[0, 1]))
    assert float(fused[0]) > 0.4 and commit.tolist() == [[False, True]]
    restart = policy.step(ctx._replace(step=jnp.int32(0)), knobs, state)[2]
    np.testing.assert_allclose(restart[0, 1, 0], 0.4 ** 0.2, rtol=1e-6)  # a new block starts from zero


def test_knobs_are_traced(models):
    model, _ = models
    compiles = CompileCounter()
    for name, (generate, options, _) in CASES.items():
        generate(model, PROMPTS, cache="dual", **RUN, **options)
        compiles.active = True
        for key, value in options.items():
            nudged = value + 1 if isinstance(value, int) else value * 0.9
            generate(model, PROMPTS, cache="dual", **RUN, **(options | {key: nudged}))
        compiles.active = False
        assert compiles.count == 0, name


@pytest.mark.parametrize("name, bad, match", [
    ("localleap", dict(threshold=0.5, relaxed_threshold=0.7), r"relaxed_threshold must be in \(0, threshold"),
    ("localleap", dict(radius=-1), "option 'radius' must be >= 0"),
    ("localleap", dict(relaxed_threshold=0.0), "option 'relaxed_threshold' must be > 0"),
    ("cd4lm-cad", dict(max_per_step=0), "option 'max_per_step' must be >= 1"),
    ("cd4lm-cad", dict(eos_ratio=1.5), "option 'eos_ratio' must be <= 1"),
    ("cd4lm-cad", dict(remasking="random"), "takes no option 'remasking'"),
    ("credit", dict(beta=1.2), "option 'beta' must be <= 1"),
    ("credit", dict(gamma=0.0), "option 'gamma' must be > 0"),
    ("credit", dict(alpha=-1.0), "option 'alpha' must be >= 0"),
    ("credit", dict(threshold=1.1), "option 'threshold' must be <= 1"),
    ("prophet", dict(early=1.0, mid=2.0), "must not rise with progress"),
    ("prophet", dict(late=-1.0), "option 'late' must be >= 0"),
    ("prophet", dict(steps=3), "must be a multiple of the number of blocks"),
])
def test_bad_options_raise_before_compiling(models, name, bad, match):
    compiles = CompileCounter()
    compiles.active = True
    with pytest.raises(InvalidInputError, match=match):
        CASES[name][0](models[0], PROMPTS, **RUN, **bad)
    compiles.active = False
    assert compiles.count == 0
