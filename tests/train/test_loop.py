"""The resumable training loop: a run stopped mid-way and resumed computes the losses of one never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pdx.errors import InvalidInputError
from pdx.models import transformer as tf
from pdx.train import autoregressive, diffusion, loop

CFG = tf.Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                head_dim=16, max_position_embeddings=64)
TC = autoregressive.TrainConfig(steps=10, batch=4, seq_len=17, lr=1e-2, warmup=2)


def windows(rng, n, length):
    start = rng.integers(0, 32, (n, 1))
    return ((start + np.arange(length)) % 32).astype(np.int32)  # counting mod 32: learnable


class Stop(Exception):
    pass


def test_a_run_resumed_from_its_checkpoint_matches_one_never_stopped(tmp_path):
    _, whole = autoregressive.train(CFG, TC, windows, progress=False)

    def dies_at_step_7(rng, n, length):
        dies_at_step_7.calls += 1
        if dies_at_step_7.calls == 8:
            raise Stop
        return windows(rng, n, length)

    dies_at_step_7.calls = 0
    with pytest.raises(Stop):
        autoregressive.train(CFG, TC, dies_at_step_7, progress=False, checkpoint_dir=str(tmp_path), save_every=3)
    with open(tmp_path / loop.PROGRESS) as f:
        assert json.load(f)["step"] == 6  # saved at steps 3 and 6; the 7th step's update was lost
    _, resumed = autoregressive.train(CFG, TC, windows, progress=False, checkpoint_dir=str(tmp_path), save_every=3)
    np.testing.assert_array_equal(resumed, whole)
    assert whole[-3:].mean() < whole[:3].mean()


def test_a_state_of_another_model_is_refused(tmp_path):
    autoregressive.train(CFG, TC, windows, progress=False, checkpoint_dir=str(tmp_path), save_every=5)
    wider = tf.Config(**{**CFG.__dict__, "intermediate_size": 96})
    with pytest.raises(InvalidInputError, match="different model"):
        autoregressive.train(wider, TC, windows, progress=False, checkpoint_dir=str(tmp_path))


def test_a_state_of_another_recipe_is_refused(tmp_path):
    """Same model, other training settings (here the learning rate): resuming would mix two recipes."""
    autoregressive.train(CFG, TC, windows, progress=False, checkpoint_dir=str(tmp_path), save_every=5)
    other = autoregressive.TrainConfig(**{**TC.__dict__, "lr": 3e-3})
    with pytest.raises(InvalidInputError, match="other train settings"):
        autoregressive.train(CFG, other, windows, progress=False, checkpoint_dir=str(tmp_path))


@pytest.mark.parametrize("bad, match", [(dict(steps=0), "steps must be positive"),
                                        (dict(seq_len=1), "seq_len"), (dict(seq_len=65), "exceeds")])
def test_bad_ar_options_raise(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        autoregressive.train(CFG, autoregressive.TrainConfig(**{**TC.__dict__, **bad}), windows, progress=False)


@pytest.mark.parametrize("bad, gen, match", [
    (dict(steps=-5), 32, "steps must be positive"),
    (dict(attention="block_causal", block_size=12), 32, "must divide"),
    (dict(attention="causal"), 32, "attention must be"),
    (dict(lr=0.0), 32, "lr must be positive"),
    (dict(), (32, 0), "generation lengths"),
])
def test_bad_diffusion_options_raise_before_compiling(bad, gen, match):
    tc = diffusion.TrainConfig(**bad)
    with pytest.raises(InvalidInputError, match=match):
        diffusion.train(CFG, tc, lambda rng, n, g: [([1], [2])] * n, 32, gen, 0, 0, progress=False)


KILLED_RUN = """
import sys
sys.path.insert(0, {here!r})
from test_loop import CFG, windows
from pdx.train import autoregressive
tc = autoregressive.TrainConfig(steps=40, batch=4, seq_len=17, lr=1e-2, warmup=2)
autoregressive.train(CFG, tc, windows, progress=False, checkpoint_dir=sys.argv[1], save_every=4)
"""


@pytest.mark.slow  # two fresh processes importing jax
def test_training_resumes_after_a_kill(tmp_path):
    """SIGKILL a training process once it has checkpointed, rerun it: the loss curve equals an uninterrupted one."""
    code = KILLED_RUN.format(here=os.path.dirname(__file__))
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", code, str(state)])
    deadline = time.time() + 120
    while not (state / loop.PROGRESS).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(state / loop.PROGRESS) as f:
        stopped_at = json.load(f)["step"]
    assert 4 <= stopped_at < 40
    subprocess.run([sys.executable, "-c", code, str(state)], check=True, timeout=120)
    with open(state / loop.PROGRESS) as f:
        resumed = json.load(f)["losses"]
    tc = autoregressive.TrainConfig(steps=40, batch=4, seq_len=17, lr=1e-2, warmup=2)
    _, whole = autoregressive.train(CFG, tc, windows, progress=False)
    np.testing.assert_allclose(resumed, whole, rtol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["state"]  # no temporary directory left by the kill
