"""Clover-2 draft heads (Xiao et al., 2024; arXiv 2405.00263, 2408.00264): an RNN drafter on the target's
own hidden states, where each drafted token conditions the next (the regressive connection). It fills
a static tree, verified in one pass, as Medusa's heads do (`medusa.py`), but a node's children come
from that node's own distribution, not from one per depth.

Ported from the authors' Clover-2 code (github.com/XiaoBin1992/clover, `clover/model/clover2.py`). With
h_t the target's final hidden state at position t, x_t its token, E the target's frozen output embedding
(the token embedding of the regressive connection, as in the reference) and E_S its rows on a trained
vocabulary subset S (the output layer, shared with Medusa: `head_checkpoint.subset_arrays`):

    attention decoder  dec(s, e) = s + cos(q, k) * v, per head: q = W_q RMSNorm(s) + b_q, k = W_k e + b_k,
                       v = W_v e + b_v; a per-position gate (no softmax, no sequence axis)
    augmenting block   a_t = Aug(dec_1(h_t, E[x_{t+1}]))   2 causal Llama decoder layers over the sequence,
                       with RoPE and a KV cache of their own (the drafter's state); s_0 = RMSNorm(a_t)
    head 0             z_0 = RMSNorm_h(W_0 s_0 + b_0)                         logits E_S z_0: token t+2
    head i >= 1        s_i = dec_2(s_{i-1}, E[y_i]); z_i = RMSNorm_h(W_2 [s_i; E[y_i]] + b_2)
                       (y_i: the token drafted at depth i on this path; W_2, dec_2 shared: an RNN cell)

Training (`pdx.train.clover_heads`) distills the target: head i's z_i regresses onto h_{t+1+i}
(SmoothL1) and its logits match the target's distribution there (soft cross-entropy over S), head i
weighted 0.7^i.

Drafting, one jitted step per verify pass, static shapes throughout:
  * `observe` keeps the target's hidden states of the accepted path (root and accepted nodes,
    [B, D+1, H]) as pending rows; the next `propose` reads their next tokens (the accepted path shifted
    by one, then the target's own new token, the tree's root) from the token history, runs them through
    dec_1 and the augmenting block (writing their K/V at slot = position) and takes s_0 at the root.
  * The prompt's hidden states come from the prefill itself (`PROMPT_HIDDEN`): `init` runs the block
    over the prompt chunk by chunk, so its cache holds every position before the newest token.
  * The tree is filled depth by depth: the root's children are the top-k of head 0; every node at
    depth d that has children (the tree's expanded nodes) runs the shared cell on its parent's state and
    its own token, and its children are its own top-k. Leaves never run. Node (parent u, sibling rank r)
    holds u's rank-r token (`tree.Tree.rank`), so Medusa's sparse trees (`tree.from_paths`) apply as they
    are. The augmenting block only ever sees accepted positions: its cache never rolls back.

Choices the reference leaves open (see the module's tests): the input is the target's final-normed
hidden state (what the model protocol's `hidden_states` gives; the reference feeds the pre-norm one),
soft targets over S renormalized (the reference: the full vocabulary), RoPE at the target's
`rope_theta` (the reference: 10000 always), the augment layers start as copies of the target's last layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pdx.decoding.ar import Plan
from pdx.decoding.speculative import head_checkpoint
from pdx.decoding.speculative import tree as trees
from pdx.errors import InvalidInputError
from pdx.models import layers as nn

KIND = "clover"
# The shipped heads for SmolLM2-135M-Instruct (`scripts/train_draft_heads.py --drafter clover`).
DEFAULT_HEADS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "checkpoints", "clover-smollm2")
HEAD_KEYS = {"dec1", "layers", "norm", "head0", "dec2", "head", "head_norm"}
LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shapes of Clover heads besides the hidden size (from the target's config when trained)."""

    dec_heads: int  # attention-decoder heads (the target's num_heads); their width is hidden / dec_heads
    num_heads: int  # augmenting block: query heads, KV heads, head dim (the target's)
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int = 2
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @classmethod
    def of(cls, cfg, num_layers: int = 2) -> Geometry:
        """The geometry that copies a Llama-family target's layers (`cfg`: its config)."""
        return cls(dec_heads=cfg.num_heads, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                   head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size, num_layers=num_layers,
                   rope_theta=float(getattr(cfg, "rope_theta", 10000.0)), eps=float(getattr(cfg, "rms_norm_eps", 1e-5)))


def init_heads(dim: int, geo: Geometry, key: jax.Array, layer: dict | None = None, norm=None) -> dict:
    """Fresh heads as the reference initialises them: q/k and head 0's FC the identity plus U[0, 0.01),
    v U[0, 0.01), W_2 = [I | 0] plus U[0, 0.01), biases 0; the augment layers copies of `layer` (the
    target's last decoder layer, unfused 2-D weights `LAYER_KEYS`; default random N(0, 0.02)) and the two
    output norms `norm` (the target's final norm; default ones)."""
    keys = iter(jax.random.split(key, 16))

    def u(*shape):
        return jax.random.uniform(next(keys), shape, jnp.float32, 0.0, 0.01)

    eye = jnp.eye(dim, dtype=jnp.float32)

    def dec():
        return {"norm": jnp.ones((dim,)), "wq": eye + u(dim, dim), "bq": jnp.zeros((dim,)), "wk": eye + u(dim, dim),
                "bk": jnp.zeros((dim,)), "wv": u(dim, dim), "bv": jnp.zeros((dim,))}

    if layer is None:
        n, kv, f = geo.num_heads * geo.head_dim, geo.num_kv_heads * geo.head_dim, geo.intermediate_size
        shapes = {"wq": (n, dim), "wk": (kv, dim), "wv": (kv, dim), "wo": (dim, n), "w_gate": (f, dim),
                  "w_up": (f, dim), "w_down": (dim, f)}
        layer = {k: 0.02 * jax.random.normal(next(keys), s) for k, s in shapes.items()}
        layer |= {"attn_norm": jnp.ones((dim,)), "mlp_norm": jnp.ones((dim,))}
    layer = {k: jnp.asarray(layer[k], jnp.float32) for k in LAYER_KEYS}
    norm = jnp.ones((dim,)) if norm is None else jnp.asarray(norm, jnp.float32)
    return {"dec1": dec(), "layers": jax.tree.map(lambda a: jnp.stack([a] * geo.num_layers), layer), "norm": norm,
            "head0": {"w": eye + u(dim, dim), "b": jnp.zeros((dim,))}, "dec2": dec(),
            "head": {"w": jnp.concatenate([eye, jnp.zeros((dim, dim))], axis=1) + u(dim, 2 * dim),
                     "b": jnp.zeros((dim,))}, "head_norm": jnp.array(norm)}  # its own buffer (donated apart)


def unstack(layers: dict) -> list[dict]:
    """The augment layers `[L, ...]` as a list of per-layer dicts (read in place under jit, as the
    target's per-layer params are: slicing a stacked array there is a copy on XLA CPU)."""
    n = jax.tree.leaves(layers)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]


def attn_decoder(p: dict, s: jax.Array, e: jax.Array, n_heads: int, eps: float) -> jax.Array:
    """Clover's attention decoder on states `s [..., H]` and token embeddings `e [..., H]`: the cosine of
    query (from the normed state) and key (from the token) per head gates the token's value, added to s."""
    q = nn.dense("btd,fd->btf", nn.rms_norm(s, p["norm"], eps), p["wq"]) + p["bq"]
    k = nn.dense("btd,fd->btf", e, p["wk"]) + p["bk"]
    v = nn.dense("btd,fd->btf", e, p["wv"]) + p["bv"]
    split = s.shape[:-1] + (n_heads, s.shape[-1] // n_heads)
    q, k, v = q.reshape(split), k.reshape(split), v.reshape(split)  # [..., n, H/n]

    def unit(x):  # x / max(|x|, eps), as torch's cosine_similarity clamps each norm (a zero vector: grad 0)
        return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))

    gate = jnp.sum(unit(q) * unit(k), axis=-1, keepdims=True)  # [..., n, 1]
    return s + (gate * v).reshape(s.shape)


def augment(layers: list[dict], geo: Geometry, x: jax.Array, positions: jax.Array, valid: jax.Array, kv: tuple):
    """The augmenting block: causal Llama decoder layers over `x [B, W, H]` at `positions [B, W]`, with
    their own cache `kv` (per layer (k, v) `[B, K, S, hd]`, slot = position). The valid rows' keys are
    written first (invalid ones dropped); each query then sees the slots up to its own position, which
    hold the positions before it (written by earlier calls or this one). Returns (out [B, W, H], kv)."""
    b, w, _ = x.shape
    n, g, hd = geo.num_heads, geo.num_heads // geo.num_kv_heads, geo.head_dim
    slots_n = kv[0][0].shape[2]
    cos, sin = nn.rope_tables(positions, nn.rope_inv_freq(hd, geo.rope_theta))
    rows = jnp.arange(b)[:, None]
    write_at = jnp.where(valid, positions, slots_n)  # [B, W]; out of range: dropped
    visible = jnp.arange(slots_n)[None, None] <= positions[:, :, None]  # [B, W, S]
    out_kv = []
    for p, (ck, cv) in zip(layers, kv):
        h = nn.rms_norm(x, p["attn_norm"], geo.eps)
        q = nn.dense("btd,fd->btf", h, p["wq"]).reshape(b, w, n, hd)
        k = nn.dense("btd,fd->btf", h, p["wk"]).reshape(b, w, geo.num_kv_heads, hd)
        v = nn.dense("btd,fd->btf", h, p["wv"]).reshape(b, w, geo.num_kv_heads, hd)
        q, k = nn.apply_rope(q, cos, sin), nn.apply_rope(k, cos, sin)
        ck = ck.at[rows, :, write_at].set(k.astype(ck.dtype), mode="drop")  # [B, K, S, hd] <- [B, W, K, hd]
        cv = cv.at[rows, :, write_at].set(v.astype(cv.dtype), mode="drop")
        scores = jnp.einsum("bwkgd,bksd->bkgws", q.reshape(b, w, geo.num_kv_heads, g, hd), ck) / math.sqrt(hd)
        scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
        o = jnp.einsum("bkgws,bksd->bwkgd", jax.nn.softmax(scores, axis=-1), cv).reshape(b, w, n * hd)
        x = x + nn.dense("btf,df->btd", o, p["wo"])
        x = x + nn.swiglu(nn.rms_norm(x, p["mlp_norm"], geo.eps), p["w_gate"], p["w_up"], p["w_down"])
        out_kv.append((ck, cv))
    return x, tuple(out_kv)


def root_state(heads: dict, geo: Geometry, hidden, embeds, positions, valid, kv):
    """s_0 at every row `[B, W, H]` of (hidden states h_t, embeddings of x_{t+1}) at `positions`: dec_1,
    the augmenting block (its cache updated) and its norm. Returns (s_0, kv)."""
    x = attn_decoder(heads["dec1"], hidden, embeds, geo.dec_heads, geo.eps)
    a, kv = augment(heads["layers"] if isinstance(heads["layers"], list) else unstack(heads["layers"]), geo, x,
                    positions, valid, kv)
    return nn.rms_norm(a, heads["norm"], geo.eps), kv


def head0(heads: dict, geo: Geometry, s0: jax.Array) -> jax.Array:
    """z_0 `[..., H]` (the lm-head input of depth 1) from s_0."""
    return nn.rms_norm(nn.dense("btd,fd->btf", s0, heads["head0"]["w"]) + heads["head0"]["b"], heads["head_norm"],
                       geo.eps)


def cell(heads: dict, geo: Geometry, s: jax.Array, e: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The shared step of heads i >= 1: (s_i, z_i) from the parent's state s_{i-1} and the embedding e
    of the token drafted before (both `[..., H]`)."""
    s = attn_decoder(heads["dec2"], s, e, geo.dec_heads, geo.eps)
    z = nn.dense("btd,fd->btf", jnp.concatenate([s, e], axis=-1), heads["head"]["w"]) + heads["head"]["b"]
    return s, nn.rms_norm(z, heads["head_norm"], geo.eps)


def subset_logits(out_rows: jax.Array, z: jax.Array) -> jax.Array:
    """Logits over the vocabulary subset `[..., |S|]` from lm-head inputs `z [..., H]`."""
    return nn.dense("...d,vd->...v", z, out_rows).astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CloverState:
    kv: tuple  # per augment layer (k, v) [B, K, S, hd]: slot s holds position s
    pending: jax.Array  # [B, D+1, H] target hidden states at positions start.. not yet in the block's cache
    start: jax.Array  # [B] position of pending[:, 0]
    count: jax.Array  # [B] pending rows (1..D+1); the last one is the position before the newest token


@dataclasses.dataclass(frozen=True)
class Clover:
    """Tree drafter from trained Clover-2 heads. `heads` (traced, not part of the compiled program's key):
    as `init_heads`; `vocab [|S|]` the subset's token ids; `family`/`target_cfg`: the target's, for its
    output embedding (the regressive connection's token embedding)."""

    tree: trees.Tree
    geometry: Geometry
    family: types.ModuleType
    target_cfg: object
    heads: dict = dataclasses.field(compare=False, hash=False, repr=False)
    vocab: np.ndarray = dataclasses.field(compare=False, hash=False, repr=False)
    KIND: ClassVar[str] = "tree"
    USES_HIDDEN: ClassVar[bool] = True
    PROMPT_HIDDEN: ClassVar[bool] = True
    cfg: ClassVar[None] = None  # not a second model: the target's vocabulary

    def __post_init__(self):
        if set(self.heads) != HEAD_KEYS:
            raise InvalidInputError(f"Clover heads hold {sorted(HEAD_KEYS)}, got {sorted(self.heads)}")
        dim = self.heads["norm"].shape[-1]
        if dim != self.target_cfg.hidden_size or dim % self.geometry.dec_heads:
            raise InvalidInputError(f"Clover heads of width {dim} ({self.geometry.dec_heads} decoder heads) for a "
                                    f"target of hidden size {self.target_cfg.hidden_size}")
        head_checkpoint.check_subset(self.tree, self.vocab, len(self.vocab))

    @property
    def k(self) -> int:
        return self.tree.max_depth

    @functools.cached_property
    def levels(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per depth d = 1..D: (children at d, their parent's index among the expanded nodes of depth d-1,
        their rank, the expanded nodes of depth d (those with children), their parent's index among
        the expanded nodes of depth d-1)."""
        t = self.tree
        parents, depth = np.asarray(t.parents), t.depth
        has_kids = np.zeros(len(parents), bool)
        has_kids[parents[1:]] = True
        expanded = {0: np.array([0])}
        out = []
        for d in range(1, t.max_depth + 1):
            where = {int(u): i for i, u in enumerate(expanded[d - 1])}
            kids = np.flatnonzero(depth == d)
            expanded[d] = kids[has_kids[kids]]
            out.append((kids, np.array([where[int(parents[c])] for c in kids]), t.rank[kids], expanded[d],
                        np.array([where[int(parents[c])] for c in expanded[d]], np.int64)))
        return out

    def arrays(self, model):
        heads = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), self.heads)
        return {"heads": heads | {"layers": unstack(heads["layers"])}, "target": model.params,
                **head_checkpoint.subset_arrays(model, self.vocab)}

    def _embed(self, arrays, ids: jax.Array) -> jax.Array:
        """E[ids] `[..., H]`: the target's output embedding rows (the reference's token embedding)."""
        rows = self.family.lm_head_rows(arrays["target"], self.target_cfg, ids.reshape(-1))
        return rows.reshape(*ids.shape, -1).astype(jnp.float32)

    def init(self, arrays, plan: Plan, prompt_buf, prompt_lens, hidden):
        """The block's cache over the prompt's positions 0..P-2 (their next tokens are in the prompt), a
        chunk of the prefill's width at a time; position P-1 waits for the first new token (pending)."""
        geo, b = self.geometry, plan.batch
        shape = (b, geo.num_kv_heads, plan.slots, geo.head_dim)
        kv = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(geo.num_layers))
        nxt = jnp.pad(prompt_buf[:, 1:], ((0, 0), (0, 1)))  # x_{t+1} at t
        c = plan.prefill_chunk

        def chunk(i, kv):
            start = i * c
            positions = start + jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
            h = lax.dynamic_slice_in_dim(hidden, start, c, axis=1)
            e = self._embed(arrays, lax.dynamic_slice_in_dim(nxt, start, c, axis=1))
            return root_state(arrays["heads"], geo, h, e, positions, positions < prompt_lens[:, None] - 1, kv)[1]

        kv = chunk(0, kv) if plan.single_pass else lax.fori_loop(0, (jnp.max(prompt_lens) - 1 + c - 1) // c, chunk, kv)
        last = jnp.maximum(prompt_lens - 1, 0)
        pending = jnp.zeros((b, self.k + 1, hidden.shape[-1]), jnp.float32)
        pending = pending.at[:, 0].set(jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
        return CloverState(kv=kv, pending=pending, start=last, count=jnp.ones((b,), jnp.int32))

    def propose(self, arrays, state: CloverState, hist, pos, sampling, key):
        geo, heads = self.geometry, arrays["heads"]
        b, s = hist.shape
        j = jnp.arange(self.k + 1)
        positions = state.start[:, None] + j  # [B, D+1]
        valid = j < state.count[:, None]
        nxt = jnp.take_along_axis(hist, jnp.clip(positions + 1, 0, s - 1), axis=1)  # x_{t+1}; the last: the root
        s0, kv = root_state(heads, geo, state.pending, self._embed(arrays, nxt), positions, valid, state.kv)
        s0 = jnp.take_along_axis(s0, (state.count - 1)[:, None, None], axis=1)  # [B, 1, H] at the root's parent
        tokens = jnp.zeros((b, self.tree.size + 1), jnp.int32)
        states, logits = s0, subset_logits(arrays["out_rows"], head0(heads, geo, s0))  # [B, 1, H], [B, 1, |S|]
        for kids, kid_parent, rank, expanded, exp_parent in self.levels:
            top = lax.top_k(logits, int(rank.max()) + 1)[1]  # [B, m, w]: each expanded node's top-w
            tokens = tokens.at[:, kids].set(arrays["vocab"][top[:, kid_parent, rank]])
            if len(expanded):  # the nodes of this depth with children run the shared cell
                states, z = cell(heads, geo, states[:, exp_parent], self._embed(arrays, tokens[:, expanded]))
                logits = subset_logits(arrays["out_rows"], z)
        nodes = tokens[:, 1:]
        return nodes, jnp.ones(nodes.shape, bool), dataclasses.replace(state, kv=kv)

    def observe(self, state: CloverState, logits, pos, n, path, hidden):
        """Pending: the target's hidden states at the root and the accepted nodes (positions pos..pos+n)."""
        nodes = jnp.concatenate([jnp.zeros_like(path[:, :1]), path[:, : self.k]], axis=1)  # [B, D+1]
        pending = jnp.take_along_axis(hidden, nodes[..., None], axis=1).astype(jnp.float32)
        return CloverState(kv=state.kv, pending=pending, start=pos, count=n + 1)


def load(model, path: str | None = None, tree=None) -> Clover:
    """The Clover drafter of the heads at `path` (default: the shipped SmolLM2 heads), refused unless
    they were trained for `model`; `tree`: branching factors per depth, default the checkpoint's own
    sparse tree (built from the heads' held-out top-k accuracies)."""
    heads, vocab, shape, meta = head_checkpoint.load_drafter(path, KIND, model, DEFAULT_HEADS, HEAD_KEYS, tree)
    geo = meta.get("geometry")
    if not isinstance(geo, dict) or set(geo) != {f.name for f in dataclasses.fields(Geometry)}:
        raise InvalidInputError(f"the Clover checkpoint's meta has no valid geometry: {geo!r}")
    return Clover(tree=shape, geometry=Geometry(**geo), family=model.family, target_cfg=model.cfg, heads=heads,
                  vocab=vocab)
