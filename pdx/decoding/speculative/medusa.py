"""Medusa draft heads (Cai et al., 2024, Medusa-1): a few trained residual heads on the target's own
last hidden state draft the next tokens, which fill a static tree verified in one pass.

Head k (k = 1..K) reads the target's final-normed hidden state h_t and predicts token t + 1 + k (the
target's own LM head predicts t + 1):

    r_k = h_t + SiLU(W_k h_t + b_k)                    (the paper's Eq. 1, one residual block)
    p_k = softmax(E_S r_k + c_k)                       E_S: the target's output embedding on S

W_k starts at zero, so a fresh head is the target's LM head. The output layer is the target's own
(frozen) embedding restricted to a trained vocabulary subset S (the tokens covering most of the
training targets): SmolLM2's tied LM head is a fifth of its weights, and scoring 4 heads over 49k
tokens would cost a sizeable part of a target pass; over S it is a small fraction. c_k is a learned
bias. A tree node at depth d and sibling rank r holds the rank-r token of head d (`tree.Tree.rank`),
the Cartesian-product trees of Medusa (`tree.branching`) or its sparse trees (`tree.from_paths`).

The heads need h at the newest accepted token, which the verify pass computes: the engine runs the
target through `hidden_states` + `lm_head` (protocol capability `hidden_states`) and `observe` keeps
the hidden state of the deepest accepted node. The first pass after prefill has none yet and drafts
nothing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pdx.decoding.ar import Plan
from pdx.decoding.speculative import head_checkpoint
from pdx.decoding.speculative import tree as trees
from pdx.errors import InvalidInputError

KIND = "medusa"
# The shipped heads for SmolLM2-135M-Instruct (`scripts/train_draft_heads.py`), inside the package.
DEFAULT_HEADS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "checkpoints", "medusa-smollm2")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HeadState:
    hidden: jax.Array  # [B, D] the target's final hidden state at the newest accepted token
    ready: jax.Array  # [B] bool: `hidden` is real (False until the first verify pass)


def init_heads(dim: int, num_heads: int, subset: int) -> dict:
    """Fresh heads: zero residual blocks (each head starts as the target's LM head) and zero biases."""
    return {"w": jnp.zeros((num_heads, dim, dim), jnp.float32),  # [K, D_out, D_in]
            "b": jnp.zeros((num_heads, dim), jnp.float32), "out_bias": jnp.zeros((num_heads, subset), jnp.float32)}


def head_logits(heads: dict, out_rows: jax.Array, h: jax.Array) -> jax.Array:
    """Logits `[..., K, |S|]` of every head over the subset S from hidden states `h [..., D]`;
    `out_rows [|S|, D]` is the target's output embedding on S."""
    h = h.astype(jnp.float32)
    z = jnp.einsum("...d,ked->...ke", h, heads["w"]) + heads["b"]  # [..., K, D]
    r = h[..., None, :] + jax.nn.silu(z)
    return jnp.einsum("...kd,vd->...kv", r, out_rows) + heads["out_bias"]


@dataclasses.dataclass(frozen=True)
class Medusa:
    """Tree drafter from trained Medusa heads. `heads` (traced, not part of the compiled program's key):
    {"w", "b", "out_bias"} as `init_heads`; `vocab [|S|]` the subset's token ids."""

    tree: trees.Tree
    heads: dict = dataclasses.field(compare=False, hash=False, repr=False)
    vocab: np.ndarray = dataclasses.field(compare=False, hash=False, repr=False)
    KIND: ClassVar[str] = "tree"
    USES_HIDDEN: ClassVar[bool] = True
    cfg: ClassVar[None] = None

    def __post_init__(self):
        heads = self.heads["w"].shape[0]
        head_checkpoint.check_subset(self.tree, self.vocab, self.heads["out_bias"].shape[-1])
        if self.tree.max_depth > heads:
            raise InvalidInputError(f"the tree is {self.tree.max_depth} deep and there are only {heads} Medusa heads")

    @property
    def k(self) -> int:
        return self.tree.max_depth

    def arrays(self, model):
        return {"heads": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), self.heads),
                **head_checkpoint.subset_arrays(model, self.vocab)}

    def init(self, arrays, plan: Plan, prompt_buf, prompt_lens):
        dim = arrays["out_rows"].shape[1]
        return HeadState(hidden=jnp.zeros((plan.batch, dim), jnp.float32), ready=jnp.zeros((plan.batch,), bool))

    def propose(self, arrays, state: HeadState, hist, pos, sampling, key):
        depth, rank = self.tree.depth[1:] - 1, self.tree.rank[1:]  # [T] head and rank of each node
        logits = head_logits(arrays["heads"], arrays["out_rows"], state.hidden)[:, : self.k]  # [B, D, |S|]
        top = lax.top_k(logits, int(rank.max()) + 1)[1]  # [B, D, W]
        nodes = arrays["vocab"][top[:, depth, rank]]  # [B, T]
        return nodes, jnp.broadcast_to(state.ready[:, None], nodes.shape), state

    def observe(self, state: HeadState, logits, pos, n, path, hidden):
        rows = jnp.arange(n.shape[0])
        last = jnp.where(n > 0, path[rows, jnp.maximum(n - 1, 0)], 0)  # deepest accepted node (root: 0)
        return HeadState(hidden=hidden[rows, last].astype(jnp.float32), ready=jnp.ones_like(state.ready))


def load(model, path: str | None = None, tree=None) -> Medusa:
    """The Medusa drafter of the heads at `path` (default: the shipped SmolLM2 heads), refused unless
    they were trained for `model`; `tree`: branching factors per depth, default the checkpoint's own
    sparse tree (built from the heads' held-out top-k accuracies)."""
    heads, vocab, shape, _ = head_checkpoint.load_drafter(path, KIND, model, DEFAULT_HEADS, {"w", "b", "out_bias"},
                                                          tree)
    return Medusa(tree=shape, heads=heads, vocab=vocab)
