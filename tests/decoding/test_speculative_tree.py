"""Tree verification, ADED n-gram tables and lookahead decoding: identical greedy output to AR, lossless
tree sampling, tree structure, one compile per bucket, bad options."""

import numpy as np
import pytest

from pdx.decoding import ar, compiled, registry
from pdx.decoding.speculative import drafters, engine, ngram, tree
from pdx.errors import InvalidInputError
from tests.decoding.smollm2_parity import assert_greedy_identical_to_ar
from tests.decoding.test_speculative import PROMPTS, assert_lossless, tiny


@pytest.fixture(scope="module")
def target():
    return tiny(layers=2)  # two layers keep the compiles short


def test_tree_structure():
    t = tree.branching((2, 2))
    assert t.parents == (-1, 0, 0, 1, 1, 2, 2) and t.size == 6 and t.max_depth == 2
    assert t.depth.tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert t.mask[5].tolist() == [True, False, True, False, False, True, False]  # node 5: itself, 2, root
    assert t.ancestors[6].tolist() == [0, 2, 6] and t.children[2].tolist() == [5, 6]
    assert tree.level_slices((2, 2)) == [(1, 3), (3, 7)]
    la = ngram.Lookahead(window=3, ngram=3, guesses=2).tree  # root, 2x3 window, 2 chains of 2
    assert la.size == 10 and la.max_depth == 2 and not any(la.candidate[:7]) and all(la.candidate[7:])
    assert la.mask[6].nonzero()[0].tolist() == [0, 1, 2, 3, 6]  # level 1 col 2: level 0 cols 0..2, itself
    for bad in ((), (2, 0), [1.5], (8, 8, 8, 8)):
        with pytest.raises(InvalidInputError, match="tree shape"):
            tree.branching(bad)


@pytest.mark.slow  # exactness is in the conformance matrix; this adds 40 tokens and accepted > 0
@pytest.mark.parametrize("kind", ["aded", "lookahead"])
def test_greedy_identical_to_ar_tiny(target, kind):
    drafter = ngram.NGramTable(k=4) if kind == "aded" else ngram.Lookahead(window=3, ngram=3, guesses=3)
    ref = ar.generate(target, PROMPTS, max_new_tokens=40, stop_token_ids=[])
    out = engine.generate(target, PROMPTS, drafter=drafter, max_new_tokens=40, stop_token_ids=[])
    assert [out.row(i) for i in range(3)] == [ref.row(i) for i in range(3)]
    assert out.stats["accepted"] > 0


@pytest.mark.slow  # moved out of the default suite to keep it under 15 minutes on CI
def test_tree_greedy_self_and_random_draft(target):
    """The target drafting its own tree accepts the whole top path; a random draft (same config, so the
    same compiled program) still gives AR's output; other prompts, seed and stop ids do not recompile."""
    ref = ar.generate(target, PROMPTS, max_new_tokens=40, stop_token_ids=[])
    self_tree = drafters.tree_draft(drafters.draft_model(target, target, 1), (3, 2, 1))
    out = engine.generate(target, PROMPTS, drafter=self_tree, max_new_tokens=40, stop_token_ids=[])
    assert [out.row(i) for i in range(3)] == [ref.row(i) for i in range(3)]
    assert out.stats["acceptance_by_position"] == [1.0] * 3 and out.stats["accepted_per_pass"] == 3.0
    before = compiled.compile_count(engine.tree_decode), compiled.compile_count(engine.spec_prefill)
    random_tree = drafters.tree_draft(drafters.draft_model(target, tiny(seed=7, layers=2), 1), (3, 2, 1))
    out = engine.generate(target, PROMPTS, drafter=random_tree, max_new_tokens=40, stop_token_ids=[])
    assert [out.row(i) for i in range(3)] == [ref.row(i) for i in range(3)]
    assert 0 < out.stats["accepted"] < out.stats["drafted"]
    prompts, stop = [[9, 8, 7], [1, 2], [4, 4, 4, 4]], [int(ref.tokens[0, 3])]
    ref = ar.generate(target, prompts, max_new_tokens=40, stop_token_ids=stop, seed=3)
    out = engine.generate(target, prompts, drafter=random_tree, max_new_tokens=40, stop_token_ids=stop, seed=3)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    assert (compiled.compile_count(engine.tree_decode), compiled.compile_count(engine.spec_prefill)) == before


@pytest.mark.parametrize("kind, knobs", [
    ("tree", dict(temperature=1.0, top_k=0)),
    pytest.param("tree", dict(temperature=0.8, top_k=3), marks=pytest.mark.slow),
    pytest.param("tree", dict(temperature=1.0, top_k=0, verifier="traversal"), marks=pytest.mark.slow),
    pytest.param("lookahead", dict(temperature=1.0, top_k=0), marks=pytest.mark.slow),
])
def test_tree_sampling_is_lossless(kind, knobs):
    """Chi-square: the joint law of the first 3 sampled tokens equals the target's (vocab 5, 2048 rows)."""
    model = tiny(vocab=5, scale=0.8)
    prompt = [1, 2, 3, 1, 2]
    drafter = ngram.Lookahead(window=2, ngram=3, guesses=2, buckets=8) if kind == "lookahead" else \
        drafters.tree_draft(drafters.draft_model(model, tiny(vocab=5, seed=3, layers=1, scale=0.8), 1), (2, 2))
    assert_lossless(model, prompt, drafter, knobs)


def test_bad_options(target):
    spec_tree, spec_aded, lookahead = (registry.get(n) for n in ("spec-tree", "spec-aded", "lookahead"))
    with pytest.raises(InvalidInputError, match="option 'tree' must be >= 1"):
        spec_tree(target, PROMPTS, tree=[2, 0])
    with pytest.raises(InvalidInputError, match="option 'tree' must be a list of integers"):
        spec_tree(target, PROMPTS, tree=3)
    with pytest.raises(InvalidInputError, match="tree shape"):
        drafters.tree_draft(drafters.layer_skip(target, [1], 1), [])
    with pytest.raises(InvalidInputError, match="vocabulary"):
        engine.generate(target, PROMPTS, drafter=drafters.tree_draft(drafters.draft_model(target, tiny(vocab=64), 1),
                                                                     (2,)))
    with pytest.raises(InvalidInputError, match="cache holds"):  # 1 + 4 + 16 + 64 nodes do not fit
        spec_tree(target, [[1] * 40], tree=[4, 4, 4], skip=[1], max_new_tokens=10, max_len=128)
    with pytest.raises(InvalidInputError, match="option 'k' must be >= 1"):
        spec_aded(target, PROMPTS, k=0)
    with pytest.raises(InvalidInputError, match="option 'ngram_size' must be >= 2"):
        lookahead(target, PROMPTS, ngram_size=1)
    with pytest.raises(InvalidInputError, match="ngram must be"):
        ngram.Lookahead(ngram=1)
    with pytest.raises(InvalidInputError, match="adaptive"):
        engine.generate(target, PROMPTS, drafter=ngram.Lookahead(), adaptive=True)
    with pytest.raises(InvalidInputError, match="slots"):
        ngram.NGramTable(k=2, slots=100)


SLOW_KINDS = ["aded", "lookahead", "tree_layerskip"]


def _smollm2_drafter(kind, model):
    return {"aded": lambda: ngram.NGramTable(k=6),
            "lookahead": lambda: ngram.Lookahead(),
            "tree_layerskip": lambda: drafters.tree_draft(drafters.layer_skip(model, list(range(8, 30, 2)), 1),
                                                          (3, 2, 1, 1))}[kind]()


@pytest.mark.slow
@pytest.mark.parametrize("kind", SLOW_KINDS)
def test_greedy_identical_to_ar_smollm2_humaneval(smollm2, humaneval, kind):
    # the heuristic layer-skip tree may accept nothing on a prompt, but never costs more passes than AR
    assert_greedy_identical_to_ar(smollm2, humaneval, _smollm2_drafter(kind, smollm2))


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_tree_mask_forward_equals_each_path(tiny_cfg, impl):
    """Scoring a tree after a cached prefix in one pass (tree_mask, position = prefix + depth) gives every
    node the logits of a plain causal pass over prefix + its root-to-node path (Pallas in interpret mode)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from pdx.kernels_pallas import use_impl
    from pdx.models import transformer as tf

    cfg = dataclasses.replace(tiny_cfg, hidden_size=128, head_dim=64)
    params = tf.init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    t = tree.branching((2, 2))
    prefix = jnp.array([[5, 9, 3, 7]])
    nodes = jnp.array([[11, 12, 13, 14, 15, 16, 17]])  # root (newest token) + 6 drafted nodes
    fwd = jax.jit(tf.forward, static_argnames=("cfg",))
    with use_impl(impl):
        cache = tf.init_cache(cfg, 1, 32)
        _, cache = fwd(params, cfg=cfg, tokens=prefix, positions=jnp.arange(4)[None], cache=cache)
        logits, _ = fwd(params, cfg=cfg, tokens=nodes, positions=4 + jnp.asarray(t.depth)[None], cache=cache,
                        tree_mask=jnp.asarray(t.mask)[None])
    # every prefix + path, right-padded to the deepest (causal: padding after a token does not change it)
    paths = t.ancestors[np.arange(t.size + 1)[:, None], np.minimum(np.arange(3), t.depth[:, None])]  # [T+1, 3]
    seqs = jnp.concatenate([jnp.broadcast_to(prefix, (t.size + 1, 4)), nodes[0][paths]], axis=1)  # [T+1, 7]
    ref, _ = fwd(params, cfg=cfg, tokens=seqs, positions=jnp.broadcast_to(jnp.arange(7), seqs.shape))
    ref = np.asarray(ref)[np.arange(t.size + 1), 4 + t.depth]  # [T+1, V]
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=1e-4, rtol=0)
