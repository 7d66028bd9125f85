"""Clover-2 draft heads: the regressive connection (each drafted token conditions the next), the draft
prefill and the tree plumbing against a one-shot computation, training on a tiny target (the KD loss
falls, resume after a kill), checkpoints bound to their target, greedy output identical to AR, lossless
sampling with both verifiers, one compile for any heads."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx.decoding import ar, compiled, registry
from pdx.decoding.speculative import clover, engine, head_checkpoint, medusa, tree
from pdx.errors import InvalidInputError, ModelLoadError
from pdx.train import clover_heads as ch
from pdx.train import draft_heads as dh
from tests.decoding.test_medusa import self_distilled
from tests.decoding.test_speculative import PROMPTS, assert_lossless, tiny

PATHS = ((0,), (1,), (0, 0), (1, 0), (0, 0, 0))


def random_heads(model, seed=0, scale=0.3):
    """Heads initialised for `model`, every array then perturbed: drafts that vary with their inputs."""
    rng = np.random.default_rng(seed)  # on the host: jax.random compiles for seconds over 20 arrays
    heads = ch.init_for(model, clover.Geometry.of(model.cfg), seed)
    return jax.tree.map(lambda a: a + scale * rng.standard_normal(a.shape, np.float32) / np.sqrt(a.shape[-1]), heads)


def drafter(model, heads, shape=PATHS, vocab=None):
    vocab = np.arange(model.cfg.vocab_size, dtype=np.int32) if vocab is None else vocab
    return clover.Clover(tree=tree.from_paths(shape), geometry=clover.Geometry.of(model.cfg), family=model.family,
                         target_cfg=model.cfg, heads=heads, vocab=vocab)


def save_heads(path, model, heads, vocab=None, paths=PATHS):
    vocab = np.arange(model.cfg.vocab_size, dtype=np.int32) if vocab is None else vocab
    meta = {"tree": [list(p) for p in paths], "geometry": dataclasses.asdict(clover.Geometry.of(model.cfg))}
    head_checkpoint.save(path, clover.KIND, {"heads": heads, "vocab": vocab}, model, meta)
    return str(path)


@pytest.fixture(scope="module")
def target():
    return tiny(layers=2)


@pytest.fixture(scope="module")
def heads(target):
    return random_heads(target, seed=3)


TC = ch.TrainConfig(num_heads=3, steps=150, batch=8, window=64, lr=3e-3, warmup=10, weight_decay=0.0)


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """Heads trained briefly on the tiny target's own greedy continuations (of PROMPTS among others: a
    random tiny model's text is learned by heart), saved and loaded back."""
    seqs = self_distilled(target)
    data = ch.featurize(target, seqs, progress=False)
    vocab = dh.vocab_subset(ch.targets(data, TC.num_heads), 1.0)
    rows = np.asarray(target.family.lm_head_rows(target.params, target.cfg, jnp.asarray(vocab)))
    geo, embed = clover.Geometry.of(target.cfg), ch.embed_table(target)
    heads, losses = ch.train(ch.init_for(target, geo), geo, rows, embed, data, TC, progress=False)
    acc, loss = ch.evaluate(heads, geo, rows, vocab, embed, data, TC, ranks=4)
    paths, _ = dh.sparse_tree(acc, 7)
    path = tmp_path_factory.mktemp("heads") / "clover"
    save_heads(path, target, heads, vocab, paths)
    return dict(path=str(path), losses=losses, acc=acc, loss=loss, data=data, vocab=vocab, rows=rows, embed=embed,
                paths=paths)


def test_the_next_head_reads_the_token_drafted_before(target, heads):
    """The regressive connection: the cell's output, and so the next depth's logits, changes with the
    token drafted at the depth before (Medusa's heads see h alone)."""
    geo = clover.Geometry.of(target.cfg)
    s = jax.random.normal(jax.random.PRNGKey(0), (1, 2, target.cfg.hidden_size))
    embed = jnp.asarray(ch.embed_table(target))

    @jax.jit
    def next_logits(tokens):  # the same parent state, two tokens drafted before
        return clover.subset_logits(embed, clover.cell(heads, geo, s, embed[tokens][None])[1])[0]

    la, lb = next_logits(jnp.asarray([5, 9]))
    assert float(jnp.max(jnp.abs(la - lb))) > 1e-2
    assert float(jnp.max(jnp.abs(next_logits(jnp.asarray([5, 5]))[1] - la))) > 1e-2  # and with the parent's state


def test_propose_matches_a_one_shot_computation(target, heads):
    """`init` (the block over the prompt in chunks) then `propose` (the pending row, then the tree) give
    the tokens of a direct computation: the block over the whole prompt at once, head 0's top-2 at the
    root, and under each of them the top-1 of the cell fed that token; the two children's logits differ."""
    model = target
    d = drafter(model, heads, shape=((0,), (1,), (0, 0), (1, 0)))
    arrays = d.arrays(model)
    prompt, root = [5, 6, 7, 8, 5, 6, 7], 11
    plan = ar.Plan(batch=1, slots=32, max_new_tokens=4, prefill_chunk=4)  # two chunks of the prompt
    buf = jnp.zeros((1, 32), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
    hidden, _ = model.family.hidden_states(model.params, model.cfg, buf, jnp.arange(32)[None])
    lens = jnp.asarray([len(prompt)])
    state = jax.jit(lambda *a: d.init(*a[:1], plan, *a[1:]))(arrays, buf, lens, hidden)
    hist = buf.at[0, len(prompt)].set(root)
    nodes, valid, _ = jax.jit(lambda *a: d.propose(*a, None, None))(arrays, state, hist, lens)

    @jax.jit
    def direct(arrays, hidden, hist):  # (h_t, x_{t+1}) for t = 0..P-1 through dec_1 and the block in one call
        geo, p, heads = d.geometry, len(prompt), arrays["heads"]
        kv = tuple((jnp.zeros((1, geo.num_kv_heads, p, geo.head_dim)),) * 2 for _ in range(geo.num_layers))
        e = d._embed(arrays, hist[:, 1 : p + 1])
        s, _ = clover.root_state(heads, geo, hidden[:, :p], e, jnp.arange(p)[None], jnp.ones((1, p), bool), kv)
        s0 = s[:, -1:]
        first = jnp.argsort(-clover.subset_logits(arrays["out_rows"], clover.head0(heads, geo, s0))[0, 0])[:2]
        _, z = clover.cell(heads, geo, jnp.concatenate([s0, s0], axis=1), d._embed(arrays, first[None]))
        return first, clover.subset_logits(arrays["out_rows"], z)[0]  # [2], [2, V]

    first, kids = direct(arrays, hidden, hist)
    assert nodes.tolist() == [[*first.tolist(), *jnp.argmax(kids, axis=-1).tolist()]]
    assert bool(valid.all()) and float(jnp.max(jnp.abs(kids[0] - kids[1]))) > 1e-2


@pytest.mark.slow  # the shared training fixture: ~25 s
def test_training_lowers_the_loss(trained):
    losses = trained["losses"]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:3])  # measured 0.53 (soft targets: an entropy floor)
    assert trained["acc"][0, 0] > 0.3  # head 0's top token, teacher-forced on its training data


class Stop(Exception):
    pass


class DiesAt:
    """Hidden states whose `calls`-th slice read kills the run (as a kill mid-training would)."""

    def __init__(self, hidden, calls):
        self.hidden, self.calls, self.shape = hidden, calls, hidden.shape

    def __getitem__(self, idx):
        self.calls -= 1
        if self.calls == 0:
            raise Stop
        return self.hidden[idx]


@pytest.mark.slow  # the shared training fixture: ~25 s
def test_training_resumes_after_a_kill(tmp_path, target, trained):
    geo, data = clover.Geometry.of(target.cfg), trained["data"]
    tc = ch.TrainConfig(num_heads=2, steps=6, batch=2, window=64, warmup=2)
    args = (geo, trained["rows"], trained["embed"])
    _, whole = ch.train(ch.init_for(target, geo), *args, data, tc, progress=False)
    dying = data | {"hidden": DiesAt(data["hidden"], 2 * 4 + 1)}  # two window reads a step: dies in step 5
    with pytest.raises(Stop):
        ch.train(ch.init_for(target, geo), *args, dying, tc, checkpoint_dir=str(tmp_path), save_every=2,
                 progress=False)
    with open(tmp_path / "progress.json") as f:
        assert json.load(f)["step"] == 4  # saved at steps 2 and 4; the 5th step was lost
    _, resumed = ch.train(ch.init_for(target, geo), *args, data, tc, checkpoint_dir=str(tmp_path), save_every=2,
                          progress=False)
    np.testing.assert_array_equal(resumed, whole)


@pytest.mark.slow  # the shared training fixture: ~25 s
def test_trained_heads_identical_to_ar_and_accept(target, trained):
    ref = ar.generate(target, PROMPTS, max_new_tokens=40, stop_token_ids=[])
    out = registry.get("spec-clover")(target, PROMPTS, heads=trained["path"], max_new_tokens=40, stop_token_ids=[])
    assert [out.row(i) for i in range(3)] == [ref.row(i) for i in range(3)]
    assert out.stats["accepted_per_pass"] > 0.4
    # the block's cache rides in the decode loop's carry, updated in place: the compiled loop copies no
    # buffer of a KV cache's shape [B, K, S, hd] (a cond around its writes would copy it every pass)
    slots = ar.make_request(target, PROMPTS, {"max_new_tokens": 40}).plan.slots  # 256 either way
    kv = rf"f32\[\d+,{target.cfg.num_kv_heads},{slots},{target.cfg.head_dim}\]"
    loops = [exe.as_text() for key, exe in compiled._EXECUTABLES.items()
             if key[0] is engine.tree_decode and isinstance(dict(key[1])["drafter"], clover.Clover)]
    assert loops and all(re.search(kv, text) and not re.search(kv + r"\S* copy\(", text) for text in loops)
    # other heads of the same shapes, and another tree of the same size and depth: no recompile
    before = compiled.compile_count(engine.tree_decode)
    vocab = trained["vocab"]
    other = drafter(target, random_heads(target, seed=4), shape=trained["paths"], vocab=vocab)
    out = engine.generate(target, PROMPTS, drafter=other, max_new_tokens=40, stop_token_ids=[])
    assert [out.row(i) for i in range(3)] == [ref.row(i) for i in range(3)]
    assert compiled.compile_count(engine.tree_decode) == before


@pytest.mark.slow  # 13-24 s each; the default suite keeps the Medusa and draft-model chi-squares
@pytest.mark.parametrize("verifier", ["token", "traversal"])
def test_clover_sampling_is_lossless(verifier):
    """Chi-square over 2048 rows of 3 sampled tokens (16 cache slots: the draft cache of 2048 rows stays small)."""
    model = tiny(vocab=5, scale=0.8)
    d = drafter(model, random_heads(model, seed=1, scale=2.0), shape=((0,), (1,), (0, 0), (1, 0)))
    assert_lossless(model, [1, 2, 3, 1, 2], d, dict(temperature=1.0, top_k=0, verifier=verifier, max_len=16))


def test_checkpoint_bound_to_its_target(tmp_path, target, heads):
    path = save_heads(tmp_path / "a", target, heads)
    assert clover.load(target, path).tree.size == 5
    assert clover.load(target, path, tree=[2, 1]).tree.size == 4
    with pytest.raises(InvalidInputError, match="other weights"):
        clover.load(tiny(layers=2, seed=5), path)
    with pytest.raises(InvalidInputError, match="trained for"):
        clover.load(tiny(layers=3), path)
    with pytest.raises(ModelLoadError, match="no draft-head checkpoint"):
        clover.load(target, str(tmp_path / "missing"))
    with pytest.raises(InvalidInputError, match="3 vocabulary ids for heads over 128"):
        head_checkpoint.check_subset(tree.branching((2,)), np.arange(3), 128)
    other = tmp_path / "medusa"
    head_checkpoint.save(other, medusa.KIND, {"heads": medusa.init_heads(64, 2, 128), "vocab": np.arange(128)},
                         target, {"tree": [[0]]})
    with pytest.raises(InvalidInputError, match="'medusa' draft heads, not 'clover'"):
        clover.load(target, str(other))
