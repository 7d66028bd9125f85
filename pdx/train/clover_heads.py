"""Training Clover-2 draft heads on a frozen target (`pdx.decoding.speculative.clover`).

The data are the target's own sequences, as for Medusa (`scripts/make_draft_data.py`). Clover's
augmenting block attends over the sequence, so `featurize` keeps whole sequences: the target's final
hidden state at every position (one pass per sequence, `draft_heads.sequence_states`) with the tokens.

A step takes `batch` windows of `window` positions (a random start, so a window holds a whole short
sequence) and trains as the reference does, teacher-forced: at position t the block reads (h_t,
x_{t+1}); head i >= 1 reads the true token x_{t+1+i}; head i's lm-head input z_i regresses onto the
target's h_{t+1+i} (SmoothL1, weight `regression_weight`) and its logits over the vocabulary subset S
match the target's distribution there (soft cross-entropy: knowledge distillation, the target's
probabilities renormalized over S), head i weighted `decay`^i. Positions count from the prompt's last
one on (those whose next token the target generated), as Medusa's features do. `topk_accuracy` gives
each head's teacher-forced rank-r hit rate, from which `draft_heads.sparse_tree` builds the tree.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pdx.decoding.speculative import clover
from pdx.errors import InvalidInputError
from pdx.train import draft_heads, loop


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_heads: int = 5  # depths trained (the cell is shared: any tree depth runs)
    num_layers: int = 2  # augmenting block
    steps: int = 2000
    batch: int = 8  # windows per step
    window: int = 512  # positions per window
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    coverage: float = 0.99
    regression_weight: float = 10.0
    decay: float = 0.7
    seed: int = 0


def featurize(model, sequences: list[tuple[np.ndarray, int]], batch: int = 8, progress: bool = True) -> dict:
    """The sequences end to end: `hidden [N, D]` float16 (the target's final hidden states), `tokens [N]`,
    `offsets [n+1]` and `prompt_lens [n]`, in the given order."""
    hidden = dict(draft_heads.sequence_states(model, sequences, batch, progress))
    n = range(len(sequences))
    return {"hidden": np.concatenate([hidden[i] for i in n]).astype(np.float16),
            "tokens": np.concatenate([np.asarray(sequences[i][0], np.int32) for i in n]),
            "offsets": np.cumsum([0] + [len(sequences[i][0]) for i in n]).astype(np.int64),
            "prompt_lens": np.asarray([sequences[i][1] for i in n], np.int32)}


def targets(data: dict, num_heads: int) -> np.ndarray:
    """[N', K] the tokens heads 1..K predict (t + 2 .. t + 1 + K, -1 past the end) at every trained
    position t (t >= prompt_len - 1 with a next token): Medusa's targets, for `vocab_subset`."""
    out = []
    for i in range(len(data["prompt_lens"])):
        t = data["tokens"][data["offsets"][i] : data["offsets"][i + 1]]
        pos = np.arange(max(int(data["prompt_lens"][i]) - 1, 0), len(t) - 1)
        idx = pos[:, None] + 1 + np.arange(1, num_heads + 1)
        out.append(np.where(idx < len(t), t[np.minimum(idx, len(t) - 1)], -1).astype(np.int32))
    return np.concatenate(out)


def windows(data: dict, embed: np.ndarray, seqs: np.ndarray, starts: np.ndarray, width: int) -> tuple:
    """One batch: (h [B, W, D], e [B, W, D] = E[x_{t+1}], tokens [B, W] = x_{t+1}, n [B] positions in the
    window, first [B] its first trained position), for sequences `seqs` from `starts`."""
    b, d = len(seqs), data["hidden"].shape[1]
    h, nxt = np.zeros((b, width, d), np.float32), np.zeros((b, width), np.int32)
    n, first = np.zeros((b,), np.int32), np.zeros((b,), np.int32)
    for r, (i, s) in enumerate(zip(seqs, starts)):
        lo, hi = data["offsets"][i] + s, min(data["offsets"][i + 1], data["offsets"][i] + s + width)
        n[r] = hi - lo
        h[r, : n[r]] = data["hidden"][lo:hi]
        nxt[r, : n[r] - 1] = data["tokens"][lo + 1 : hi]
        first[r] = max(int(data["prompt_lens"][i]) - 1 - s, 0)
    return h, embed[nxt], nxt, n, first


def _shift(x: jax.Array, k: int) -> jax.Array:
    """x[:, t + k] at t (zeros past the end)."""
    return jnp.pad(x[:, k:], ((0, 0), (0, k)) + ((0, 0),) * (x.ndim - 2))


def head_outputs(heads, geo: clover.Geometry, h, e, n, num_heads: int):
    """Teacher-forced z_i `[K, B, W, D]` (head i at t reads the true x_{t+1+i})."""
    b, w, _ = h.shape
    positions = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, w))
    shape = (b, geo.num_kv_heads, w, geo.head_dim)
    kv = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(geo.num_layers))
    s, _ = clover.root_state(heads, geo, h, e, positions, positions < n[:, None] - 1, kv)
    zs = [clover.head0(heads, geo, s)]
    for i in range(1, num_heads):
        s, z = clover.cell(heads, geo, s, _shift(e, i))
        zs.append(z)
    return zs


def loss_fn(heads, geo: clover.Geometry, out_rows, batch, tc: TrainConfig):
    """Clover-2's distillation loss, summed over heads weighted decay^i (see the module docstring)."""
    h, e, _, n, first = batch
    t = jnp.arange(h.shape[1])[None]
    total = 0.0
    for i, z in enumerate(head_outputs(heads, geo, h, e, n, tc.num_heads)):
        mask = ((t >= first[:, None]) & (t + 1 + i < n[:, None])).astype(jnp.float32)  # [B, W]
        norm = jnp.maximum(mask.sum(), 1.0)
        target = _shift(h, 1 + i)  # h_{t+1+i}
        diff = jnp.abs(z - target)
        smooth_l1 = jnp.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).mean(-1)
        p = jax.lax.stop_gradient(jax.nn.softmax(clover.subset_logits(out_rows, target), axis=-1))
        ce = -jnp.sum(p * jax.nn.log_softmax(clover.subset_logits(out_rows, z), axis=-1), axis=-1)
        total += tc.decay**i * (tc.regression_weight * (smooth_l1 * mask).sum() + (ce * mask).sum()) / norm
    return total


def sample(data: dict, tc: TrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`tc.batch` sequences and their windows' starts (uniform over the starts that fit)."""
    seqs = rng.integers(0, len(data["prompt_lens"]), tc.batch)
    lengths = data["offsets"][seqs + 1] - data["offsets"][seqs]
    return seqs, (rng.random(tc.batch) * (np.maximum(lengths - tc.window, 0) + 1)).astype(np.int64)


def target_layer(model, geo: clover.Geometry) -> dict | None:
    """The target's last decoder layer as unfused fp32 2-D weights (`clover.LAYER_KEYS`), or None when
    its params are not laid out as a Llama-family transformer's (stacked or per-layer, fused or not,
    int8 or not)."""
    layers = model.params.get("layers") if isinstance(model.params, dict) else None
    if layers is None:
        return None
    last = layers[-1] if isinstance(layers, (list, tuple)) else jax.tree.map(lambda a: a[-1], layers)

    def dense(w):
        return np.asarray(w.q, np.float32) * np.asarray(w.scale, np.float32)[..., None] if hasattr(w, "q") \
            else np.asarray(w, np.float32)

    p = {k: dense(v) for k, v in last.items()}
    if "wqkv" in p:
        n, k = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim
        p["wq"], p["wk"], p["wv"] = np.split(p.pop("wqkv"), [n, n + k])
    if "w_gate_up" in p:
        p["w_gate"], p["w_up"] = np.split(p.pop("w_gate_up"), 2)
    return {k: p[k] for k in clover.LAYER_KEYS} if all(k in p for k in clover.LAYER_KEYS) else None


def init_for(model, geo: clover.Geometry, seed: int = 0) -> dict:
    """Fresh heads for `model`: augment layers copied from its last layer, output norms from its final norm
    (the reference's init; random layers and unit norms where its params have no such layout)."""
    norm = model.params.get("final_norm") if isinstance(model.params, dict) else None
    init = jax.jit(clover.init_heads, static_argnums=(0, 1))  # one program, not a few hundred eager ops
    return init(model.cfg.hidden_size, geo, jax.random.PRNGKey(seed), target_layer(model, geo), norm)


def embed_table(model) -> np.ndarray:
    """E `[V, D]` fp32: the target's output embedding (the regressive connection's token embedding)."""
    return np.asarray(model.family.lm_head_rows(model.params, model.cfg, jnp.arange(model.cfg.vocab_size)),
                      np.float32)


@functools.partial(jax.jit, static_argnames=("geo", "tc"), donate_argnums=(0, 1))
def _update(heads, opt_state, batch, out_rows, *, geo: clover.Geometry, tc: TrainConfig):
    """One optimizer step (compiled once per geometry and recipe, whatever the data)."""
    import optax

    loss, grads = jax.value_and_grad(loss_fn)(heads, geo, out_rows, batch, tc)
    updates, opt_state = loop.optimizer(tc).update(grads, opt_state, heads)
    return optax.apply_updates(heads, updates), opt_state, loss


def train(heads: dict, geo: clover.Geometry, out_rows: np.ndarray, embed: np.ndarray, data: dict, tc: TrainConfig, *,
          checkpoint_dir: str | None = None, save_every: int = 100, progress: bool = True):
    """Heads trained from `heads` (`init_for`) on `data` (`featurize`); returns (heads, losses). Resumes
    from `checkpoint_dir`."""
    if not len(data["prompt_lens"]):
        raise InvalidInputError("no sequences to train Clover heads on")
    out_rows = jnp.asarray(out_rows, jnp.float32)

    def step(heads, opt_state, batch, key, step):
        return _update(heads, opt_state, batch, out_rows, geo=geo, tc=tc)

    def batch_fn(rng, step):
        return tuple(jnp.asarray(x) for x in windows(data, embed, *sample(data, tc, rng), tc.window))

    return loop.fit(heads, loop.optimizer(tc), step, batch_fn, steps=tc.steps, seed=tc.seed,
                    checkpoint_dir=checkpoint_dir, save_every=save_every, progress=progress, desc="clover heads",
                    meta={"train": dataclasses.asdict(tc), "geometry": dataclasses.asdict(geo)})


def evaluate(heads, geo: clover.Geometry, out_rows, vocab: np.ndarray, embed: np.ndarray, data: dict,
             tc: TrainConfig, ranks: int = 10, progress: bool = False) -> tuple[np.ndarray, float]:
    """(accuracy [K, ranks], mean loss) on `data`, each sequence once from its start (a window's worth):
    how often head i's rank-r token is the true token t + 2 + i, teacher-forced (a token outside the
    subset is a miss at every rank)."""
    out_rows, vocab_j = jnp.asarray(out_rows, jnp.float32), jnp.asarray(vocab)
    ranks = min(ranks, len(vocab))

    @jax.jit
    def run(heads, batch):
        h, e, nxt, n, first = batch
        tops = [vocab_j[jax.lax.top_k(clover.subset_logits(out_rows, z), ranks)[1]]
                for z in head_outputs(heads, geo, h, e, n, tc.num_heads)]  # K x [B, W, ranks]
        return jnp.stack(tops), loss_fn(heads, geo, out_rows, batch, tc)

    hits, count, losses = np.zeros((tc.num_heads, ranks)), np.zeros((tc.num_heads,)), []
    seqs = np.arange(len(data["prompt_lens"]))
    for lo in tqdm(range(0, len(seqs), tc.batch), desc="evaluate", disable=not progress):
        idx = seqs[lo : lo + tc.batch]
        idx = np.concatenate([idx, np.full(tc.batch - len(idx), idx[-1])])  # a full batch (repeats not counted)
        batch = windows(data, embed, idx, np.zeros_like(idx), tc.window)
        top, loss = run(heads, tuple(jnp.asarray(x) for x in batch))
        losses.append(float(loss))
        _, _, nxt, n, first = batch
        t = np.arange(tc.window)[None]
        for i in range(tc.num_heads):
            truth = np.pad(nxt[:, 1 + i :], ((0, 0), (0, 1 + i)))  # x_{t+2+i}
            mask = (t >= first[:, None]) & (t + 2 + i < n[:, None])
            mask[len(seqs[lo : lo + tc.batch]) :] = False
            hits[i] += ((np.asarray(top[i]) == truth[..., None]) & mask[..., None]).sum((0, 1))
            count[i] += mask.sum()
    return hits / np.maximum(count, 1)[:, None], float(np.mean(losses))
