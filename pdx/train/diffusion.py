"""Masked-diffusion training (LLaDA SFT objective) for bidirectional and block-diffusion transformers.

Each example is a left-padded canvas `[prompt | answer + EOS padding]` laid out as the decoders
lay it out (`pdx.decoding.diffusion.core.build_canvas`), so train and test positions agree.
Objective: draw t ~ U(0, 1), mask each answer token with probability t, and minimise the
cross-entropy on masked positions weighted by 1/t (an upper bound on the negative log-likelihood).
Block diffusion (block-causal attention) draws one block per example: earlier blocks are clean,
the block is masked at rate t, later blocks (invisible to it) are fully masked, and only that
block's masked tokens are scored, matching how the block is decoded. With `all_blocks` it scores
every block at once (BD3-LM's vectorised objective, Arriola et al. 2025): the pass reads the clean
canvas followed by a noisy copy of the answer at the same positions, where each noisy block sees
the clean columns before it and itself only (`bd3_mask`), so every block is denoised from the
context it is decoded in, for one pass over P + 2G tokens instead of one per block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pdx.errors import require
from pdx.masks import BIDIRECTIONAL, MaskMode
from pdx.models import transformer
from pdx.train import loop


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    attention: str = "bidirectional"  # or "block_causal"
    block_size: int = 16  # attention block of block diffusion (and the decoding block size)
    min_t: float = 1e-3  # keeps the 1/t weight bounded
    stratified_t: bool = True  # low-discrepancy t across the batch (MDLM's antithetic sampler)
    # Mask exactly m ~ U{1..G} answer tokens (t = m / G, weight G / m): the any-order form of the same objective
    # (RADD, Ou et al. 2024). With G = 32, t ~ U(0, 1) leaves rows with one masked token weighted up to 1/min_t
    # that dominate (and, clipped, shrink) the gradient; here the weight is at most G and no row scores nothing.
    count_masking: bool = False
    all_blocks: bool = False  # block_causal: score every block in one pass (BD3-LM), not one block per example
    # Cross-entropy weight of answer columns whose target is EOS: a 511-letter answer's one EOS is 1/512 of the
    # loss, and a model that copies letters at a fixed offset can leave it wrong for hundreds of steps. On a
    # deterministic task (the EOS is certain) the weighted loss has the same minimiser.
    eos_weight: float = 1.0
    seed: int = 0


def canvas(examples, prompt_len: int, gen_len: int, eos: int, pad: int):
    """Numpy `tokens [B, P + G]` (answer in the generated part), `valid [B, P + G]`."""
    for prompt, answer in examples:
        require(len(prompt) <= prompt_len and len(answer) <= gen_len,
                f"an example of {len(prompt)} prompt and {len(answer)} answer tokens does not fit a canvas of "
                f"{prompt_len} + {gen_len}")
    tokens = np.full((len(examples), prompt_len + gen_len), pad, np.int32)
    valid = np.zeros(tokens.shape, bool)
    for i, (prompt, answer) in enumerate(examples):
        tokens[i, prompt_len - len(prompt) : prompt_len] = prompt
        tokens[i, prompt_len:] = answer + [eos] * (gen_len - len(answer))
        valid[i, prompt_len - len(prompt) :] = True
    return tokens, valid


def noise(key, gen: jax.Array, mask_id: int, tc: TrainConfig):
    """Forward process on the answer `gen [B, G]`: (noisy [B, G], scored [B, G] bool, t [B])."""
    b, g = gen.shape
    kt, km, kb = jax.random.split(key, 3)
    if tc.stratified_t:  # one draw per stratum [i/B, (i+1)/B): the same U(0, 1) marginal, lower gradient variance
        u = (jax.random.uniform(kt, ()) + jnp.arange(b) / b) % 1.0
        t = tc.min_t + (1.0 - tc.min_t) * jax.random.permutation(jax.random.fold_in(kt, 1), u)
    else:
        t = jax.random.uniform(kt, (b,), minval=tc.min_t, maxval=1.0)
    if tc.count_masking:
        m = jnp.clip(jnp.ceil(t * g), 1, g)  # [B]: stratified or i.i.d. t -> a uniform count in 1..G
        t = m / g
        rank = jnp.argsort(jax.random.uniform(km, (b, g)), axis=-1).argsort(axis=-1)  # a random permutation per row
        masked = rank < m[:, None]
    else:
        masked = jax.random.uniform(km, (b, g)) < t[:, None]
    scored = masked
    if tc.attention == "block_causal" and not tc.all_blocks:
        block = jnp.arange(g) // tc.block_size  # [G]
        j = jax.random.randint(kb, (b, 1), 0, g // tc.block_size)
        scored = masked & (block == j)
        masked = scored | (block > j)
    return jnp.where(masked, mask_id, gen), scored, t


def bd3_mask(prompt_len: int, gen_len: int, block: int) -> np.ndarray:
    """Bool `[T, T]`, T = P + 2G, over `[prompt | clean answer | noisy answer]`: the clean canvas is
    block-causal; a noisy token of answer block j sees the clean columns before block j and the noisy
    tokens of block j; no clean token sees a noisy one."""
    w = prompt_len + gen_len
    clean_block = np.arange(w) // block  # [W]
    noisy_block = (prompt_len + np.arange(gen_len)) // block  # [G]: the same column's block
    out = np.zeros((w + gen_len, w + gen_len), bool)
    out[:w, :w] = clean_block[:, None] >= clean_block[None, :]
    out[w:, :w] = noisy_block[:, None] > clean_block[None, :]
    out[w:, w:] = noisy_block[:, None] == noisy_block[None, :]
    return out


def loss_fn(params, cfg: transformer.Config, tc: TrainConfig, tokens, valid, key, prompt_len: int):
    """Masked-diffusion loss of one batch: sum over scored positions of CE / t, per candidate position.
    With `cfg.logit_shift = 1` (Dream; an AR-initialised dLLM keeps its next-token head) the logits one
    column to the left predict each answer token."""
    gen = tokens[:, prompt_len:]
    b, g = gen.shape
    noisy, scored, t = noise(key, gen, cfg.mask_token_id, tc)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if tc.attention == "block_causal" and tc.all_blocks:
        x = jnp.concatenate([tokens, noisy], axis=1)  # [B, P + 2G]: the noisy copy at the answer's positions
        kwargs = dict(mask_mode=BIDIRECTIONAL, valid=jnp.concatenate([valid, valid[:, prompt_len:]], axis=1),
                      tree_mask=jnp.broadcast_to(bd3_mask(prompt_len, g, tc.block_size), (b, *[x.shape[1]] * 2)))
        positions = jnp.concatenate([positions, positions[:, prompt_len:]], axis=1)
        lo, per_row = tokens.shape[1] - cfg.logit_shift, g
    else:
        x = tokens.at[:, prompt_len:].set(noisy)
        mode = BIDIRECTIONAL if tc.attention == "bidirectional" else MaskMode("block_causal", tc.block_size)
        kwargs = dict(mask_mode=mode, valid=valid)
        lo, per_row = prompt_len - cfg.logit_shift, g if tc.attention == "bidirectional" else tc.block_size
    logits, _ = transformer.forward(params, cfg, x, positions, **kwargs)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, lo : lo + g], gen)  # [B, G]
    if tc.eos_weight != 1.0:
        ce = jnp.where(jnp.isin(gen, jnp.asarray(cfg.eos_token_ids)), tc.eos_weight * ce, ce)
    return jnp.sum(jnp.where(scored, ce, 0.0) / t[:, None]) / (b * per_row)


@functools.partial(jax.jit, static_argnames=("cfg", "tc", "prompt_len"), donate_argnums=(0, 1))
def train_step(params, opt_state, cfg, tc: TrainConfig, tokens, valid, key, prompt_len: int):
    loss, grads = jax.value_and_grad(loss_fn)(params, cfg, tc, tokens, valid, key, prompt_len)
    updates, opt_state = loop.optimizer(tc).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def validate(tc: TrainConfig, prompt_len: int, gen_lens: tuple[int, ...]) -> None:
    """Raise `InvalidInputError` for options no training run can use, before anything compiles."""
    require(tc.steps >= 1, f"steps must be positive, got {tc.steps}")
    require(tc.batch >= 1, f"batch must be positive, got {tc.batch}")
    require(tc.lr > 0, f"lr must be positive, got {tc.lr}")
    require(tc.eos_weight > 0, f"eos_weight must be positive, got {tc.eos_weight}")
    require(tc.attention in ("bidirectional", "block_causal"),
            f"attention must be 'bidirectional' or 'block_causal', got {tc.attention!r}")
    require(all(g >= 1 for g in gen_lens), f"generation lengths must be positive, got {gen_lens}")
    require(not tc.all_blocks or tc.attention == "block_causal",
            "all_blocks scores the blocks of block_causal attention")
    if tc.attention == "block_causal":
        for n in (prompt_len, *gen_lens):
            require(tc.block_size >= 1 and n % tc.block_size == 0,
                    f"block_size {tc.block_size} must divide the prompt and generation lengths "
                    f"({prompt_len}, {gen_lens})")


def train(cfg: transformer.Config, tc: TrainConfig, data_fn, prompt_len: int, gen_len: int | tuple[int, ...],
          eos: int, pad: int, params=None, progress: bool = True, checkpoint_dir: str | None = None,
          save_every: int = 100, time_limit_s: float | None = None):
    """Train from `params` (random init if None) on batches `data_fn(rng, batch, gen_len) -> [(prompt, answer)]`;
    a tuple of generation lengths takes them in turn, one per step (one compiled step each). With
    `checkpoint_dir` the run saves its state there and resumes from it (`pdx.train.loop`); with
    `time_limit_s` too it stops after that long, and fewer than `tc.steps` losses come back.
    Returns (params, losses [steps])."""
    gen_lens = (gen_len,) if isinstance(gen_len, int) else tuple(gen_len)
    validate(tc, prompt_len, gen_lens)
    require(not tc.all_blocks or cfg.logit_shift == 0, "all_blocks trains a block-diffusion model without logit shift")
    key = jax.random.PRNGKey(tc.seed)
    if params is None:
        params = transformer.init_params(cfg, jax.random.fold_in(key, 2**31))

    def batch_fn(rng, step):
        g = gen_lens[step % len(gen_lens)]
        return tuple(map(jnp.asarray, canvas(data_fn(rng, tc.batch, g), prompt_len, g, eos, pad)))

    def step_fn(params, opt_state, batch, key, step):
        return train_step(params, opt_state, cfg, tc, *batch, key, prompt_len)

    return loop.fit(params, loop.optimizer(tc), step_fn, batch_fn, steps=tc.steps, seed=tc.seed,
                    checkpoint_dir=checkpoint_dir, save_every=save_every, progress=progress,
                    desc=f"train {tc.attention}", meta=dict(train=settings(tc)), time_limit_s=time_limit_s)


def settings(tc: TrainConfig) -> dict:
    """`tc` as the settings a saved state is checked against: a field added after states were saved
    (`ADDED`) is left out at its default, so those states still resume."""
    return {k: v for k, v in dataclasses.asdict(tc).items() if not (k in ADDED and v == ADDED[k])}


ADDED = {"eos_weight": 1.0}


def plot_losses(curves: dict[str, np.ndarray], path: str, window: int = 50, title: str = "tiny dLLM training",
                ylabel: str = "masked-diffusion loss (1/t weighted)") -> None:
    """Loss curves (moving average over `window` steps) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        w = min(window, len(losses))
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(len(smooth)) + w, smooth, label=name)
    ax.set(xlabel="step", ylabel=ylabel, yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
