"""Medusa draft heads: sparse trees, training on a tiny target (features, subset, resume), checkpoints
bound to their target, greedy output identical to AR, lossless sampling, one compile for any heads."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx.decoding import ar, compiled, registry
from pdx.decoding.speculative import engine, head_checkpoint, medusa, tree
from pdx.errors import InvalidInputError, ModelLoadError, UnsupportedError
from pdx.train import draft_heads as dh
from tests.decoding.test_speculative import PROMPTS, assert_lossless, tiny


def random_heads(model, num_heads=3, seed=0, scale=0.5, subset=None):
    d, v = model.cfg.hidden_size, subset or model.cfg.vocab_size
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    heads = medusa.init_heads(d, num_heads, v)
    return heads | {"w": scale * jax.random.normal(k1, heads["w"].shape) / np.sqrt(d),
                    "b": 0.1 * jax.random.normal(k2, heads["b"].shape)}


def save_heads(path, model, heads, vocab=None, paths=((0,), (1,), (0, 0), (1, 0), (0, 0, 0))):
    vocab = np.arange(model.cfg.vocab_size, dtype=np.int32) if vocab is None else vocab
    head_checkpoint.save(path, medusa.KIND, {"heads": heads, "vocab": vocab}, model, {"tree": [list(p) for p in paths]})
    return str(path)


@pytest.fixture(scope="module")
def target():
    return tiny(layers=2)


def self_distilled(target) -> list[tuple[np.ndarray, int]]:
    """(prompt + the target's greedy continuation, prompt length) for PROMPTS and 21 random prompts: the
    training data of the tiny heads (a random tiny model's text is learned by heart)."""
    prompts = PROMPTS + [[int(x) for x in np.random.default_rng(i).integers(3, 120, 6)] for i in range(21)]
    out = ar.generate(target, prompts, max_new_tokens=40, stop_token_ids=[])
    return [(np.asarray(p + out.row(i), np.int32), len(p)) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """Heads trained briefly on the tiny target's own greedy continuations (of PROMPTS among others: a
    random tiny model's text is learned by heart), saved and loaded back."""
    seqs = self_distilled(target)
    feats, targets = dh.featurize(target, seqs, num_heads=3, progress=False)
    vocab = dh.vocab_subset(targets, 1.0)
    rows = np.asarray(target.family.lm_head_rows(target.params, target.cfg, jnp.asarray(vocab)))
    tc = dh.TrainConfig(num_heads=3, steps=300, batch=256, lr=1e-2)
    heads, losses = dh.train(rows, feats, dh.to_subset(targets, vocab), tc, progress=False)
    acc = dh.topk_accuracy(heads, rows, vocab, feats, targets)
    paths, _ = dh.sparse_tree(acc, 7)
    path = tmp_path_factory.mktemp("heads") / "medusa"
    save_heads(path, target, heads, vocab, paths)
    return dict(path=str(path), losses=losses, acc=acc, seqs=seqs, feats=feats, targets=targets, paths=paths)


def test_sparse_tree_from_paths():
    t = tree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    assert t.parents == (-1, 0, 0, 1, 1, 2, 3) and t.rank.tolist() == [0, 0, 1, 0, 1, 0, 0]
    assert t.max_depth == 3 and t.ancestors[6].tolist() == [0, 1, 3, 6]
    assert tree.branching((2, 2)).rank.tolist() == [0, 0, 1, 0, 1, 0, 1]
    for bad in ([], [[]], [[1]], [[0], [0, 1]], [[0], [-1]], "x"):
        with pytest.raises(InvalidInputError, match="tree"):
            tree.from_paths(bad)


def test_greedy_sparse_tree_maximizes_expected_acceptance():
    acc = np.array([[0.6, 0.2, 0.1], [0.5, 0.2, 0.1]])
    paths, expected = dh.sparse_tree(acc, 4)
    # values: [0] .6, [0,0] .3, [1] .2, [0,1] .12 (> [1,0] .1 and [2] .1)
    assert paths == [[0], [0, 0], [1], [0, 1]] and expected == pytest.approx(0.6 + 0.3 + 0.2 + 0.12)
    assert dh.sparse_tree(acc, 100)[0].__len__() == 3 + 9  # every rank at both depths
    tree.from_paths(paths)  # always a valid tree


def test_vocab_subset_and_targets():
    targets = np.array([[5, 5, 5, 7], [5, 9, -1, 7]])
    vocab = dh.vocab_subset(targets, 0.7)  # 5 (4 of 7), then 7 (6 of 7)
    assert vocab.tolist() == [5, 7]
    assert dh.to_subset(targets, vocab).tolist() == [[0, 0, 0, 1], [0, -1, -1, 1]]
    with pytest.raises(InvalidInputError, match="coverage"):
        dh.vocab_subset(targets, 0.0)


def test_training_learns_and_features_align(target, trained):
    seq, plen = trained["seqs"][0]
    # row 0 is the prompt's last position: its targets are the tokens after the next one
    assert trained["targets"][0].tolist() == seq[plen + 1 : plen + 4].tolist()
    assert len(trained["feats"]) == sum(len(s) - p for s, p in trained["seqs"])
    losses = trained["losses"]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    assert trained["acc"][0, 0] > 0.3  # head 1's top token, on its training data (of 128 tokens)


class Stop(Exception):
    pass


class DiesAt:
    """Features whose `calls`-th batch read kills the run (as a kill mid-training would)."""

    def __init__(self, feats, calls):
        self.feats, self.calls, self.shape = feats, calls, feats.shape

    def __len__(self):
        return len(self.feats)

    def __getitem__(self, idx):
        self.calls -= 1
        if self.calls == 0:
            raise Stop
        return self.feats[idx]


def test_training_resumes_after_a_kill(tmp_path, trained, target):
    vocab = dh.vocab_subset(trained["targets"], 1.0)
    rows = np.asarray(target.family.lm_head_rows(target.params, target.cfg, jnp.asarray(vocab)))
    sub, feats = dh.to_subset(trained["targets"], vocab), trained["feats"]
    tc = dh.TrainConfig(num_heads=3, steps=8, batch=64, warmup=2)
    _, whole = dh.train(rows, feats, sub, tc, progress=False)
    with pytest.raises(Stop):
        dh.train(rows, DiesAt(feats, 6), sub, tc, checkpoint_dir=str(tmp_path), save_every=2, progress=False)
    with open(tmp_path / "progress.json") as f:
        assert json.load(f)["step"] == 4  # saved at steps 2 and 4; the 5th step's update was lost
    _, resumed = dh.train(rows, feats, sub, tc, checkpoint_dir=str(tmp_path), save_every=2, progress=False)
    np.testing.assert_array_equal(resumed, whole)


def test_trained_heads_identical_to_ar_and_accept(target, trained):
    ref = ar.generate(target, PROMPTS, max_new_tokens=40, stop_token_ids=[])
    run = registry.get("spec-medusa")
    out = run(target, PROMPTS, heads=trained["path"], max_new_tokens=40, stop_token_ids=[])
    assert [out.row(i) for i in range(3)] == [ref.row(i) for i in range(3)]
    assert out.stats["accepted_per_pass"] > 0.4  # measured 0.74 on 40 HumanEval prompts x 256 tokens
    # other heads of the same shapes, and another tree order of the same size: no recompile
    before = compiled.compile_count(engine.tree_decode)
    vocab = medusa.load(target, trained["path"]).vocab
    other = medusa.Medusa(tree=tree.from_paths(trained["paths"]), heads=random_heads(target, seed=4,
                                                                                    subset=len(vocab)), vocab=vocab)
    out = engine.generate(target, PROMPTS, drafter=other, max_new_tokens=40, stop_token_ids=[])
    assert [out.row(i) for i in range(3)] == [ref.row(i) for i in range(3)]
    assert compiled.compile_count(engine.tree_decode) == before


@pytest.mark.slow  # the drafter only proposes: the tree verifier's losslessness is in the default suite
@pytest.mark.parametrize("knobs", [dict(temperature=1.0, top_k=0), dict(temperature=0.8, top_k=3)])
def test_medusa_sampling_is_lossless(knobs):
    model = tiny(vocab=5, scale=0.8)
    drafter = medusa.Medusa(tree=tree.branching((2, 2)), heads=random_heads(model, 2, seed=1, scale=2.0),
                            vocab=np.arange(5, dtype=np.int32))
    assert_lossless(model, [1, 2, 3, 1, 2], drafter, knobs)


def test_checkpoint_bound_to_its_target(tmp_path, target):
    path = save_heads(tmp_path / "a", target, random_heads(target))
    assert medusa.load(target, path).tree.size == 5
    assert medusa.load(target, path, tree=[2, 1]).tree.size == 4
    with pytest.raises(InvalidInputError, match="other weights"):
        medusa.load(tiny(layers=2, seed=5), path)
    with pytest.raises(InvalidInputError, match="trained for"):
        medusa.load(tiny(layers=3), path)
    with pytest.raises(InvalidInputError, match="3 vocabulary ids for heads over 128"):
        medusa.Medusa(tree=tree.branching((2,)), heads=random_heads(target), vocab=np.arange(3))
    with pytest.raises(InvalidInputError, match="only 3 Medusa heads"):
        medusa.load(target, path, tree=[1, 1, 1, 1])
    with pytest.raises(ModelLoadError, match="no draft-head checkpoint"):
        medusa.load(target, str(tmp_path / "missing"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write('{"kind": "med')  # truncated
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        medusa.load(target, path)
    other = tmp_path / "b"
    head_checkpoint.save(other, "clover", {"heads": random_heads(target), "vocab": np.arange(4)}, target, {})
    with pytest.raises(InvalidInputError, match="'clover' draft heads"):
        medusa.load(target, str(other))


@pytest.mark.parametrize("name", ["spec-medusa", "spec-clover"])
def test_unsupported_families_refused_before_loading(name):
    from tests.decoding.test_conformance import build

    with pytest.raises(UnsupportedError, match="hidden states"):
        registry.get(name)(build("mamba2", "per_layer"), PROMPTS, heads="/nonexistent")
    with pytest.raises(InvalidInputError, match="option 'tree'"):
        registry.get(name)(tiny(layers=2), PROMPTS, tree=[0])


@pytest.mark.slow
def test_shipped_smollm2_heads_identical_to_ar_and_accept(smollm2, humaneval):
    """The heads that ship for SmolLM2 (scripts/train_draft_heads.py) load by default, decode HumanEval
    prompts (never trained on) token for token as AR does, and accept drafts: more than one token per pass."""
    from tests.decoding.smollm2_parity import PROMPTS as PARITY
    from tests.decoding.smollm2_parity import assert_greedy_identical_to_ar

    drafter = medusa.load(smollm2)
    assert_greedy_identical_to_ar(smollm2, humaneval, drafter)
    prompts = [smollm2.tokenizer.encode(humaneval[t]["prompt"]) for t in PARITY]
    out = engine.generate(smollm2, prompts, drafter=drafter, max_new_tokens=64)
    assert out.stats["accepted_per_pass"] > 0.4  # measured 0.74 on 40 HumanEval prompts x 256 tokens
