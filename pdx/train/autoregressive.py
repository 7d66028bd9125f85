"""Next-token training of causal transformers (the AR baseline beside the dLLMs, on the same bytes)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from pdx.errors import require
from pdx.models import transformer
from pdx.train import loop


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch: int = 16
    seq_len: int = 640  # tokens per window; the model predicts the last seq_len - 1
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
                    desc="train ar")
