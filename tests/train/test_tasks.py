"""The task suite's long canvases and re-posed choice, bad task and canvas options, time-bounded training in
pieces, and the AR model's answer-only training."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pdx.decoding import ar
from pdx.errors import InvalidInputError
from pdx.io import orbax_checkpoint as checkpoint
from pdx.models import transformer as tf
from pdx.train import autoregressive, diffusion, loop, tasks


@pytest.mark.parametrize("length", [n for kind, n in tasks.LONG_SIZES if kind == "fill"])
def test_fill_replaces_each_ditto_by_the_letter_before(length):
    task = tasks.get(f"fill-{length}")
    rng = np.random.default_rng(0)
    dittos = 0
    for _ in range(20):
        prompt, answer = task.make(rng)
        assert len(answer) == length - 1 and task.gen_len == length
        if length >= tasks.FILL_TERMINATED:  # [task, letters, SEP], left-padded to a 32-column block
            assert prompt[-1] == tasks.SEP and len(prompt) == length + 1 and task.prompt_len == 544
            body = prompt[1:-1]
        else:
            assert len(prompt) == task.prompt_len == length
            body = prompt[1:]
        assert body[0] != tasks.BLANK
        for i, t in enumerate(body):
            assert answer[i] == (answer[i - 1] if t == tasks.BLANK else t)
        dittos += body.count(tasks.BLANK)
        wrong = list(answer)
        wrong[len(wrong) // 2] = tasks.LETTER0 + (wrong[len(wrong) // 2] - tasks.LETTER0 + 1) % tasks.NUM_LETTERS
        assert task.check(prompt, answer) and not task.check(prompt, wrong)
    assert abs(dittos / (20 * (length - 2)) - tasks.DITTO_RATE) < 0.03


@pytest.mark.parametrize("length", [n for kind, n in tasks.LONG_SIZES if kind == "agree"])
def test_agree_accepts_any_listed_letter_in_every_column_and_nothing_mixed(length):
    task = tasks.get(f"agree-{length}")
    prompt, answer = task.make(np.random.default_rng(1))
    assert len(answer) == length == task.gen_len and len(set(answer)) == 1
    for letter in prompt[1:5]:
        assert tasks.solved(f"agree-{length}", prompt, [letter] * length)  # no EOS: the answer fills the canvas
    a, b = prompt[1:3]
    assert not task.check(prompt, [a] * (length - 1) + [b])  # one slot off anywhere breaks it
    assert not tasks.solved(f"agree-{length}", prompt, [a] * (length - 1) + [tasks.EOS])  # too short
    unlisted = next(t for t in range(tasks.LETTER0, tasks.LETTER0 + tasks.NUM_LETTERS) if t not in prompt)
    assert not task.check(prompt, [unlisted] * length)


def test_choice_words_are_runs_and_mixing_them_fails():
    rng = np.random.default_rng(2)
    for _ in range(50):
        prompt, answer = tasks.TASKS["choice"].make(rng)
        words = tasks._choice_words(prompt)
        assert len(words) == 4 and len({w[0] for w in words}) == 4 and answer in words
        for w in words:
            assert [(t - tasks.LETTER0) % 16 for t in w] == [(w[0] - tasks.LETTER0 + k) % 16 for k in range(5)]
            assert tasks.solved("choice", prompt, w + [tasks.EOS])
        assert not tasks.TASKS["choice"].check(prompt, words[0][:2] + words[1][2:])


def test_long_tasks_fit_their_canvas_and_held_out_is_fixed():
    for name in tasks.LONG:
        task = tasks.get(name)
        tokens, valid = diffusion.canvas(tasks.held_out(name, 3), task.prompt_len, task.gen_len, tasks.EOS, tasks.PAD)
        assert tokens.shape == (3, task.prompt_len + task.gen_len)
        assert (tokens[:, -1] == tasks.EOS).all() == name.startswith("fill")  # agree's answer fills the canvas
        assert tasks.held_out(name, 2) == tasks.held_out(name, 2)[:2]
    tasks.check_canvas(tasks.SHORT, tasks.PROMPT_LEN, tasks.GEN_LEN)
    assert set(tasks.SHORT) | set(tasks.LONG) == set(tasks.TASKS) and "agree-512" in tasks.LONG
    with pytest.raises(InvalidInputError, match="does not fit a canvas of 32 \\+ 8"):
        diffusion.canvas(tasks.held_out("copy", 1), tasks.PROMPT_LEN, 8, tasks.EOS, tasks.PAD)


@pytest.mark.parametrize("call, match", [
    (lambda: tasks.get("nope"), "unknown task 'nope'"),
    (lambda: tasks.sample(np.random.default_rng(0), 2, ("copy", "fill-1024")), "unknown task 'fill-1024'"),
    (lambda: tasks.held_out("agree-100", 2), "unknown task"),
    (lambda: tasks.solved("bogus", [1], [1]), "unknown task"),
    (lambda: tasks.check_canvas(("copy", "fill-256"), 32, 256), "needs 256 prompt and 256 generated columns"),
    (lambda: tasks.check_canvas(("agree-256",), 32, 128), "needs 32 prompt and 256"),
    (lambda: diffusion.validate(diffusion.TrainConfig(all_blocks=True), 32, (32,)), "all_blocks scores the blocks"),
])
def test_bad_task_and_canvas_options_raise(call, match):
    with pytest.raises(InvalidInputError, match=match):
        call()


CFG = tf.Config(vocab_size=tasks.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                num_kv_heads=2, head_dim=16, max_position_embeddings=64, eos_token_ids=(tasks.EOS,),
                pad_token_id=tasks.PAD)
TC = autoregressive.TrainConfig(steps=12, lr=1e-2, warmup=2)
COPY = (autoregressive.Canvas(tasks.PROMPT_LEN, tasks.GEN_LEN, 8, lambda rng, n: tasks.sample(rng, n, ("copy",))),)


def test_answer_loss_scores_the_answer_and_its_first_eos_only():
    params = tf.init_params(CFG, jax.random.PRNGKey(0))
    tokens, valid = map(jnp.asarray, diffusion.canvas([([6, 22, 23], [24, 25])], 8, 8, tasks.EOS, tasks.PAD))
    got = autoregressive.answer_loss_fn(params, CFG, tokens, valid, 8, tasks.EOS)
    x = tokens[:, :-1]
    logits, _ = tf.forward(params, CFG, x, jnp.broadcast_to(jnp.arange(15), x.shape), valid=valid[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])[0]
    # the answer sits in columns 8, 9 and its EOS in 10: predicted from columns 7, 8, 9
    np.testing.assert_allclose(got, ce[7:10].mean(), rtol=1e-6)


@pytest.mark.slow  # 19 s: the default suite ran 15:27 (budget 15 min)
def test_answer_training_learns_and_greedy_decoding_equals_a_step_by_step_loop():
    params, losses = autoregressive.train_answers(CFG, TC, COPY, tasks.EOS, tasks.PAD, progress=False)
    assert losses[-3:].mean() < losses[:3].mean()
    import pdx

    model = pdx.Model(cfg=CFG, params=params, tokenizer=None, family=tf)
    prompts = [p for p, _ in tasks.held_out("copy", 2)]
    out = ar.generate(model, prompts, max_new_tokens=6, stop_token_ids=[])
    for i, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(6):  # the whole sequence again each step, no cache
            x = jnp.asarray([seq])
            logits, _ = tf.forward(params, CFG, x, jnp.arange(len(seq))[None])
            seq.append(int(jnp.argmax(logits[0, -1])))
        assert out.row(i) == seq[len(prompt):]


@pytest.mark.parametrize("bad, match", [
    (dict(canvases=()), "at least one canvas"),
    (dict(canvases=(autoregressive.Canvas(32, 40, 2, None),)), "exceeds the model's 64 positions"),
    (dict(canvases=(autoregressive.Canvas(32, 8, 0, None),)), "positive prompt and generation lengths and batch"),
    (dict(time_limit_s=1.0), "needs a checkpoint_dir"),
])
def test_bad_answer_training_options_raise(bad, match):
    options = dict(canvases=COPY) | bad
    with pytest.raises(InvalidInputError, match=match):
        autoregressive.train_answers(CFG, TC, eos=tasks.EOS, pad=tasks.PAD, progress=False, **options)


def test_a_time_limited_run_stops_saved_and_resumes_to_the_same_losses(tmp_path):
    _, whole = autoregressive.train_answers(CFG, TC, COPY, tasks.EOS, tasks.PAD, progress=False)
    state = str(tmp_path / "state")
    _, first = autoregressive.train_answers(CFG, TC, COPY, tasks.EOS, tasks.PAD, progress=False,
                                            checkpoint_dir=state, time_limit_s=1e-9)
    assert len(first) == 1  # the first step overran the limit: saved after it, then stopped
    progress = loop.read_progress(state)
    assert progress["step"] == 1 and progress["elapsed_s"] >= 0
    _, resumed = autoregressive.train_answers(CFG, TC, COPY, tasks.EOS, tasks.PAD, progress=False,
                                              checkpoint_dir=state)
    np.testing.assert_allclose(resumed, whole, rtol=1e-6)
    assert loop.read_progress(state)["elapsed_s"] >= progress["elapsed_s"]
    assert loop.read_progress(str(tmp_path / "none")) is None


def test_train_scripts_refuse_bad_options_before_training(tmp_path):
    from scripts import train_tiny_ar, train_tiny_dllm

    with pytest.raises(InvalidInputError, match="no run bidirectional:nope"):
        train_tiny_dllm.main(["--only", "bidirectional:nope", "--out", str(tmp_path)])
    for main in (train_tiny_dllm.main, train_tiny_ar.main):
        with pytest.raises(InvalidInputError, match="--minutes must be positive"):
            main(["--minutes", "0", "--out", str(tmp_path)])


def test_run_record_adds_and_replaces_runs(tmp_path):
    path = str(tmp_path / "bench" / "train.json")
    loop.record_run(path, "a", 1.5, 10, 0.25)
    loop.record_run(path, "b", 2.0, 20, 0.5)
    loop.record_run(path, "a", 3.0, 30, 0.125)
    with open(path) as f:
        assert json.load(f) == {"a": dict(train_s=3.0, steps=30, final_loss=0.125),
                                "b": dict(train_s=2.0, steps=20, final_loss=0.5)}


@pytest.mark.slow  # 16 s: the default suite is near its 15-minute budget
def test_tiny_dllm_runs_go_on_in_phases_and_start_from_a_shipped_model(tmp_path):
    from scripts import train_tiny_dllm as script

    out, state = str(tmp_path / "out"), str(tmp_path / "state")
    run = script.Run(3, batch=2, more=(script.Phase(2, 1e-4), script.Phase(1, 1e-4, 5.0)))
    meta = script.train_one("bidirectional", "copy", run, out, state, None)
    assert run.total_steps == 6 and [p["steps"] for p in meta["phases"]] == [2, 1] and meta["train"]["steps"] == 3
    assert [p["eos_weight"] for p in meta["phases"]] == [1.0, 5.0]
    with open(f"{out}/bidirectional/copy_losses.json") as f:
        assert len(json.load(f)) == 6
    assert loop.read_progress(f"{state}/bidirectional/copy.phase1")["step"] == 2
    again = script.train_one("bidirectional", "copy", run, out, state, None)  # both phases done: nothing trains
    assert again["train_s"] == meta["train_s"]
    shipped, _, _ = checkpoint.load(f"{out}/bidirectional/copy")
    follow = script.Run(1, batch=2, lr=1e-12, init=("bidirectional", "copy"))
    script.train_one("block_causal", "copy", follow, out, state, None)
    after, _, _ = checkpoint.load(f"{out}/block_causal/copy")
    for a, b in zip(jax.tree.leaves(shipped), jax.tree.leaves(after)):
        np.testing.assert_allclose(a, b, atol=1e-6)  # it started from the shipped weights (lr ~ 0)
    with pytest.raises(InvalidInputError, match="model config differs"):
        script.train_one("block_causal", "copy", script.Run(1, script.WIDE, init=("bidirectional", "copy")), out,
                         state, None)
