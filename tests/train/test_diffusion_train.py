"""Masked-diffusion training: the forward process, the 1/t-weighted loss, a short run, checkpoints, tasks."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pdx
from pdx.errors import ModelLoadError
from pdx.io import orbax_checkpoint as checkpoint
from pdx.masks import MaskMode
from pdx.models import transformer as tf
from pdx.train import diffusion, loop, tasks

CFG = tf.Config(vocab_size=tasks.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                num_kv_heads=2, head_dim=16, mask_token_id=tasks.MASK, eos_token_ids=(tasks.EOS,), pad_token_id=0)


def _batch(n=8, names=("copy",)):
    tokens, valid = diffusion.canvas(tasks.sample(np.random.default_rng(0), n, names), tasks.PROMPT_LEN,
                                     tasks.GEN_LEN, tasks.EOS, tasks.PAD)
    return jnp.asarray(tokens), jnp.asarray(valid)


def test_noise_bidirectional_masks_at_rate_t():
    gen = jnp.zeros((512, 32), jnp.int32)
    noisy, scored, t = diffusion.noise(jax.random.PRNGKey(0), gen, 47, diffusion.TrainConfig())
    masked = np.asarray(noisy == 47)
    np.testing.assert_array_equal(masked, np.asarray(scored))
    rate = masked.mean(1)  # per-row mask rate tracks its t
    assert np.corrcoef(rate, np.asarray(t))[0, 1] > 0.95 and abs(np.mean(rate - np.asarray(t))) < 0.02


def test_stratified_t_has_one_draw_per_stratum():
    gen = jnp.zeros((64, 32), jnp.int32)
    for seed in range(3):
        _, _, t = diffusion.noise(jax.random.PRNGKey(seed), gen, 47, diffusion.TrainConfig(min_t=0.0))
        bins = np.floor(np.sort(np.asarray(t)) * 64).astype(int)  # one t in each [i/64, (i+1)/64)
        np.testing.assert_array_equal(bins, np.arange(64))
    _, _, t = diffusion.noise(jax.random.PRNGKey(0), gen, 47, diffusion.TrainConfig(stratified_t=False))
    assert len(np.unique(np.floor(np.asarray(t) * 64))) < 64  # i.i.d. draws collide (P(all distinct) ~ 1e-27)


def test_count_masking_masks_exactly_m_with_weight_g_over_m():
    gen = jnp.zeros((64, 32), jnp.int32)
    tc = diffusion.TrainConfig(count_masking=True)
    noisy, scored, t = diffusion.noise(jax.random.PRNGKey(4), gen, 47, tc)
    m = np.asarray(scored).sum(1)
    np.testing.assert_array_equal(np.asarray(noisy == 47), np.asarray(scored))
    np.testing.assert_allclose(np.asarray(t), m / 32)  # the loss weight 1/t is G/m, at most 32
    counts = np.bincount(m, minlength=33)[1:]  # m = ceil(t G) over stratified t: every count 1..32, ~twice each
    assert counts.min() >= 1 and counts.max() <= 3 and m.min() >= 1
    positions = np.asarray(scored).sum(0)
    assert positions.min() > 0  # masked positions are spread over the answer, not a fixed prefix


@pytest.mark.parametrize("make", ["make", "curriculum"])
def test_add_answers_have_fixed_width(make):
    rng = np.random.default_rng(1)
    zeros = 0
    for _ in range(50):
        prompt, answer = getattr(tasks.TASKS["add"], make)(rng)
        assert len(prompt) == 23 and len(answer) == tasks.ADD_WIDTH and tasks.TASKS["add"].check(prompt, answer)
        a, b = prompt[1:11], prompt[12:22]
        num = lambda ts: int("".join(str(x - tasks.DIGIT0) for x in ts))  # noqa: E731
        assert num(answer) == num(a) + num(b) and a[0] != tasks.DIGIT0 and b[0] != tasks.DIGIT0
        zeros += (a + b).count(tasks.DIGIT0)
    assert (zeros / 1000 > 0.4) == (make == "curriculum")  # zero-rich operands: ~45% zero digits vs ~9%


def test_training_draws_half_from_the_curriculum():
    rng = np.random.default_rng(2)
    drawn = tasks.sample(rng, 400, ("add",))
    zero_rich = [p for p, _ in drawn if p[1:23].count(tasks.DIGIT0) >= 7]  # uniform operands: P(>= 7 zeros) < 0.1%
    assert 0.4 < len(zero_rich) / 400 < 0.6


def test_noise_block_causal_scores_one_block():
    tc = diffusion.TrainConfig(attention="block_causal", block_size=8)
    gen = jnp.zeros((256, 32), jnp.int32)
    noisy, scored, _ = diffusion.noise(jax.random.PRNGKey(1), gen, 47, tc)
    noisy, scored = np.asarray(noisy) == 47, np.asarray(scored)
    for row_masked, row_scored in zip(noisy, scored):
        blocks = row_masked.reshape(4, 8)
        j = np.flatnonzero(row_scored.reshape(4, 8).any(1))
        assert len(j) <= 1  # at most one block is scored (none if its draw masked nothing)
        if len(j):
            assert not blocks[: j[0]].any() and blocks[j[0] + 1 :].all()  # clean before, fully masked after
            np.testing.assert_array_equal(row_scored.reshape(4, 8)[j[0]], blocks[j[0]])


@pytest.mark.parametrize("attention,shift,eos_weight", [("bidirectional", 0, 1.0), ("block_causal", 0, 1.0),
                                                        ("bidirectional", 1, 1.0), ("block_causal", 1, 1.0),
                                                        ("bidirectional", 0, 4.0)])
def test_loss_is_inverse_t_weighted_ce_on_scored_positions(attention, shift, eos_weight):
    """With logit_shift = 1 (an AR-initialised dLLM) the column left of each answer token scores it; EOS
    targets weigh `eos_weight`."""
    cfg = dataclasses.replace(CFG, logit_shift=shift)
    tc = diffusion.TrainConfig(attention=attention, block_size=16, eos_weight=eos_weight)
    params = tf.init_params(cfg, jax.random.PRNGKey(0), scale=0.2)
    tokens, valid = _batch()
    key = jax.random.PRNGKey(3)
    loss = diffusion.loss_fn(params, cfg, tc, tokens, valid, key, tasks.PROMPT_LEN)
    p = tasks.PROMPT_LEN
    noisy, scored, t = diffusion.noise(key, tokens[:, p:], tasks.MASK, tc)
    x = np.asarray(tokens).copy()
    x[:, p:] = np.asarray(noisy)
    mode = "bidirectional" if attention == "bidirectional" else MaskMode("block_causal", 16)
    logits, _ = tf.forward(params, cfg, jnp.asarray(x), jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape),
                           mask_mode=mode, valid=valid)
    logp = np.asarray(jax.nn.log_softmax(logits[:, p - shift : x.shape[1] - shift]))
    gen = np.asarray(tokens[:, p:])
    nll = -np.take_along_axis(logp, gen[..., None], -1)[..., 0] * np.where(gen == tasks.EOS, eos_weight, 1.0)
    assert (np.asarray(scored) & (gen == tasks.EOS)).any()
    per_row = 32 if attention == "bidirectional" else 16
    expected = (nll * np.asarray(scored) / np.asarray(t)[:, None]).sum() / (len(gen) * per_row)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_states_saved_before_eos_weight_still_resume():
    assert "eos_weight" not in diffusion.settings(diffusion.TrainConfig())  # what older states recorded
    assert diffusion.settings(diffusion.TrainConfig(eos_weight=2.0))["eos_weight"] == 2.0
    with pytest.raises(pdx.errors.InvalidInputError, match="eos_weight must be positive"):
        diffusion.validate(diffusion.TrainConfig(eos_weight=0.0), 32, (32,))


def test_all_blocks_scores_each_block_from_its_decoding_context():
    """BD3-LM's one pass equals, block by block, a block-causal pass over [prompt | clean blocks before
    it | its noisy block], and scores every masked answer token."""
    tc = diffusion.TrainConfig(attention="block_causal", block_size=8, all_blocks=True)
    params = tf.init_params(CFG, jax.random.PRNGKey(0), scale=0.2)
    tokens, valid = _batch(4)
    key = jax.random.PRNGKey(5)
    p, g = tasks.PROMPT_LEN, tasks.GEN_LEN
    noisy, scored, t = diffusion.noise(key, tokens[:, p:], tasks.MASK, tc)
    np.testing.assert_array_equal(np.asarray(scored), np.asarray(noisy) == tasks.MASK)  # every block
    nll = np.zeros((4, g))
    pos = jnp.broadcast_to(jnp.arange(p + g), (4, p + g))
    for j in range(g // 8):
        x = tokens.at[:, p + 8 * j : p + 8 * j + 8].set(noisy[:, 8 * j : 8 * j + 8])  # later blocks: unseen
        logits, _ = tf.forward(params, CFG, x, pos, mask_mode=MaskMode("block_causal", 8), valid=valid)
        logp = np.asarray(jax.nn.log_softmax(logits[:, p + 8 * j : p + 8 * j + 8]))
        answer = np.asarray(tokens[:, p + 8 * j : p + 8 * j + 8])
        nll[:, 8 * j : 8 * j + 8] = -np.take_along_axis(logp, answer[..., None], -1)[..., 0]
    expected = (nll * np.asarray(scored) / np.asarray(t)[:, None]).sum() / (4 * g)
    loss = diffusion.loss_fn(params, CFG, tc, tokens, valid, key, p)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_bd3_mask_layout():
    m = diffusion.bd3_mask(4, 4, 2)  # prompt blocks 0-1, answer blocks 2-3, noisy copies of 2-3
    assert m[:8, 8:].sum() == 0  # the clean canvas never sees the noisy copy
    assert m[8, :4].all() and not m[8, 4:8].any()  # noisy block 2: the prompt, not its own clean block
    assert m[10, :6].all() and not m[10, 6:8].any() and m[10, 10:].all() and not m[10, 8:10].any()


def test_training_reduces_loss():
    tc = diffusion.TrainConfig(steps=60, batch=16, lr=3e-3, warmup=10)
    _, losses = diffusion.train(CFG, tc, lambda rng, n, _g: tasks.sample(rng, n, ("copy",)), tasks.PROMPT_LEN,
                                tasks.GEN_LEN, tasks.EOS, tasks.PAD, progress=False)
    assert losses[-15:].mean() < 0.8 * losses[:15].mean()  # from ~3.6 (uniform over 48 ids) to ~2.6


def test_checkpoint_is_atomic_and_round_trips(tmp_path):
    params = tf.init_params(CFG, jax.random.PRNGKey(0))
    path = tmp_path / "ckpt"
    checkpoint.save(path, params, CFG, dict(attention="bidirectional"))
    params2 = jax.tree.map(lambda a: a + 1, params)
    checkpoint.save(path, params2, dataclasses.replace(CFG, rope_theta=500.0), dict(attention="block_causal"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary or old directories left behind
    cfg, loaded, meta = checkpoint.load_dllm(path)
    assert meta == dict(attention="block_causal") and cfg == dataclasses.replace(CFG, rope_theta=500.0)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params2))
    model = pdx.load_model(path, dtype="bfloat16")  # the loader applies dtype and the CPU layout here too
    assert tf.is_per_layer(model.params) and model.params["embed"].dtype == jnp.bfloat16
    with pytest.raises(ModelLoadError, match="meta.json"):
        checkpoint.load(tmp_path / "missing")


def test_task_checkers_accept_answers_and_reject_corruptions():
    rng = np.random.default_rng(0)
    for name, task in tasks.TASKS.items():
        for _ in range(20):
            prompt, answer = task.make(rng)
            assert len(prompt) <= task.prompt_len and len(answer) <= task.gen_len
            assert task.check(prompt, answer), name
            bad = list(answer)
            bad[0] = tasks.DIGIT0 + 9 if bad[0] != tasks.DIGIT0 + 9 else tasks.LETTER0
            assert not task.check(prompt, bad), name
    prompt = [tasks.TASK_IDS["choice"], *[22] * 5, tasks.SLASH, *[23] * 5, tasks.SLASH, *[24] * 5, tasks.SLASH,
              *[25] * 5, tasks.SEP]
    choice = tasks.TASKS["choice"].check
    assert choice(prompt, [23] * 5) and not choice(prompt, [22, 23, 23, 23, 23])  # a mix of two words


def test_solved_scores_a_decoded_row_with_or_without_its_eos():
    prompt, answer = tasks.TASKS["copy"].make(np.random.default_rng(1))
    assert tasks.solved("copy", prompt, answer + [tasks.EOS]) and tasks.solved("copy", prompt, answer)
    assert not tasks.solved("copy", prompt, answer + [tasks.EOS, tasks.EOS])  # one EOS ends the row, not two
    assert not tasks.solved("copy", prompt, answer[:-1] + [tasks.EOS])


def test_optimizer_schedule_warms_up():
    opt = loop.optimizer(diffusion.TrainConfig(steps=100, warmup=10, lr=1e-2))
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    updates, _ = opt.update({"w": jnp.ones(3)}, state, params)
    assert float(optax.tree.norm(updates)) < 1e-6  # learning rate 0 at step 0
