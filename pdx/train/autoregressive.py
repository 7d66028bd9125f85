"""Next-token training of causal transformers: the AR baseline beside the dLLMs, on the same bytes
(`train`: every token of a window) or on the same task canvases (`train_answers`: the answer only)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from pdx.errors import require
from pdx.models import transformer
from pdx.train import diffusion, loop


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch: int = 16
    seq_len: int = 640  # tokens per window (`train`); the model predicts the last seq_len - 1
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def loss_fn(params, cfg: transformer.Config, tokens):
    """Mean next-token cross-entropy (nats) of `tokens [B, T]` under the causal model."""
    x = tokens[:, :-1]
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)
    logits, _ = transformer.forward(params, cfg, x, positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@functools.partial(jax.jit, static_argnames=("cfg", "tc"), donate_argnums=(0, 1))
def train_step(params, opt_state, cfg, tc: TrainConfig, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, cfg, tokens)
    updates, opt_state = loop.optimizer(tc).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(cfg: transformer.Config, tc: TrainConfig, window_fn, params=None, progress: bool = True,
          checkpoint_dir: str | None = None, save_every: int = 100):
    """Train on `window_fn(rng, batch, seq_len) -> int [batch, seq_len]` windows; resumable like
    `pdx.train.diffusion.train`. Returns (params, losses [steps])."""
    require(tc.steps >= 1, f"steps must be positive, got {tc.steps}")
    require(tc.batch >= 1 and tc.seq_len >= 2, f"batch must be positive and seq_len at least 2, got {tc}")
    require(tc.seq_len <= cfg.max_position_embeddings,
            f"seq_len {tc.seq_len} exceeds the model's {cfg.max_position_embeddings} positions")
    if params is None:
        params = transformer.init_params(cfg, jax.random.fold_in(jax.random.PRNGKey(tc.seed), 2**31))
    return loop.fit(params, loop.optimizer(tc), lambda p, o, batch, key, step: train_step(p, o, cfg, tc, batch),
                    lambda rng, step: jnp.asarray(window_fn(rng, tc.batch, tc.seq_len)), steps=tc.steps,
                    seed=tc.seed, checkpoint_dir=checkpoint_dir, save_every=save_every, progress=progress,
                    desc="train ar", meta=dict(train=dataclasses.asdict(tc)))


@dataclasses.dataclass(frozen=True)
class Canvas:
    """One shape of task canvas (`pdx.train.diffusion.canvas`: left-padded prompt | answer + EOS padding):
    `data_fn(rng, batch) -> [(prompt, answer)]` drawn at `batch` rows per step."""

    prompt_len: int
    gen_len: int
    batch: int
    data_fn: Callable = dataclasses.field(compare=False)


def answer_loss_fn(params, cfg: transformer.Config, tokens, valid, prompt_len: int, eos: int):
    """Mean next-token cross-entropy over each row's answer and its first EOS, the prompt given (its
    tokens are not predicted), on canvases `tokens [B, P + G]` with `valid [B, P + G]`."""
    x = tokens[:, :-1]
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)
    logits, _ = transformer.forward(params, cfg, x, positions, valid=valid[:, :-1])  # [B, P + G - 1, V]
    gen = tokens[:, prompt_len:]
    upto_eos = jnp.cumsum(jnp.cumsum(gen == eos, axis=1), axis=1) <= 1  # [B, G]: the answer and the first EOS
    scored = jnp.concatenate([jnp.zeros((x.shape[0], prompt_len - 1), bool), upto_eos], axis=1)  # by target column
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return jnp.sum(jnp.where(scored, ce, 0.0)) / jnp.sum(scored)


@functools.partial(jax.jit, static_argnames=("cfg", "tc", "prompt_len", "eos"), donate_argnums=(0, 1))
def answer_train_step(params, opt_state, cfg, tc: TrainConfig, tokens, valid, prompt_len: int, eos: int):
    loss, grads = jax.value_and_grad(answer_loss_fn)(params, cfg, tokens, valid, prompt_len, eos)
    updates, opt_state = loop.optimizer(tc).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_answers(cfg: transformer.Config, tc: TrainConfig, canvases: tuple[Canvas, ...], eos: int, pad: int,
                  params=None, progress: bool = True, checkpoint_dir: str | None = None, save_every: int = 100,
                  time_limit_s: float | None = None):
    """Train the causal model to write task answers (then EOS) after their prompts, step i on
    `canvases[i % len(canvases)]` (one compiled step per canvas shape); resumable and time-bounded like
    `pdx.train.diffusion.train`. `tc.batch` and `tc.seq_len` are unused (each canvas has its own).
    Returns (params, losses)."""
    require(tc.steps >= 1, f"steps must be positive, got {tc.steps}")
    require(len(canvases) >= 1, "give at least one canvas to train on")
    for c in canvases:
        require(c.prompt_len >= 1 and c.gen_len >= 1 and c.batch >= 1,
                f"a canvas needs positive prompt and generation lengths and batch, got {c}")
        require(c.prompt_len + c.gen_len <= cfg.max_position_embeddings,
                f"a {c.prompt_len} + {c.gen_len} canvas exceeds the model's {cfg.max_position_embeddings} positions")
    if params is None:
        params = transformer.init_params(cfg, jax.random.fold_in(jax.random.PRNGKey(tc.seed), 2**31))

    def batch_fn(rng, step):
        c = canvases[step % len(canvases)]
        return c.prompt_len, tuple(map(jnp.asarray, diffusion.canvas(c.data_fn(rng, c.batch), c.prompt_len,
                                                                       c.gen_len, eos, pad)))

    def step_fn(params, opt_state, batch, key, step):
        prompt_len, (tokens, valid) = batch
        return answer_train_step(params, opt_state, cfg, tc, tokens, valid, prompt_len, eos)

    return loop.fit(params, loop.optimizer(tc), step_fn, batch_fn, steps=tc.steps, seed=tc.seed,
                    checkpoint_dir=checkpoint_dir, save_every=save_every, progress=progress, desc="train ar",
                    meta=dict(train=dataclasses.asdict(tc)), time_limit_s=time_limit_s)
