"""Traversal Verification (Weng et al., NeurIPS 2025, arXiv 2505.12398): lossless sampling verification of
a draft tree from the leaves up, with sequence-level acceptance.

Each node u keeps an acceptance probability alpha(u) and its current target distribution M_b(u) (the
target's p at u, later a residual); a child c drafted from M_s(u) has
    alpha(c) = min(1, alpha(u) * M_b(u)[c] / M_s(u)[c])          (alpha(root) = 1),
the probability of the whole root-to-c sequence against its draft probability, not a product of per-token
acceptances. Verification repeatedly takes the first leaf of the remaining tree in depth-first post-order
and accepts the path to it with probability alpha(leaf) (the bonus token then comes from M_b(leaf)). A
rejected leaf c is deleted and its parent u updated:
    m = sum_x min(alpha(u) M_b(u)[x], M_s(u)[x])      (the chance that u's drafted child was accepted)
    M_b(u) <- normalize([alpha(u) M_b(u) - M_s(u)]_+),   alpha(u) <- (alpha(u) - m) / (1 - m),
and M_s(u) loses c (sampling without replacement). When all of u's children are gone, u is a leaf itself;
the root's alpha stays 1, so verification ends by the time only the root is left. By induction over
subtrees, processing c's subtree accepts c exactly as a leaf with acceptance alpha(c) would, so every
emitted token has the target's law (the paper's Theorem; `tests/decoding/test_traversal.py` checks it
by chi-square).

Two kinds of drafts:
- `draft_probs [B, T+1, V]`: node u's children were drawn without replacement from draft_probs[:, u], in
  child order (a chain drafter's proposal distributions, or a sampled tree);
- None: deterministic candidates (top-k trees, n-grams): each child is a point mass, M_s = one_hot(c).
  Then alpha(c) = alpha(u) M_b(u)[c] and the acceptance law equals SpecInfer's multi-round rule
  (`tree.verify_sampling`): with point masses there is no draft probability to recover.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pdx.decoding.sampling import SamplingParams
from pdx.decoding.speculative.tree import Tree
from pdx.decoding.speculative.verify import target_probs

_TINY = 1e-12


def verify_traversal(tr: Tree, logits, tokens, node_valid, sampling: SamplingParams, key, draft_probs=None):
    """Traversal Verification of the tree `tr`: logits [B, T+1, V] (node i scores the token after it),
    tokens [B, T+1] (root first), node_valid [B, T], draft_probs [B, T+1, V] or None (see the module
    docstring). Returns, like `tree.verify_sampling`: accepted count n [B], path [B, D] (the accepted node
    at depth 1..D) and the next token [B]."""
    return traverse(tr, target_probs(logits, sampling), tokens, node_valid, key, draft_probs)


def traverse(tr: Tree, p, tokens, node_valid, key, draft_probs=None):
    """`verify_traversal` on the target distributions p [B, T+1, V] themselves."""
    b, size, v = p.shape
    rows = jnp.arange(b)
    parents = np.maximum(np.asarray(tr.parents), 0)  # [T+1] (the root's own: 0, unused)
    children = jnp.asarray(tr.children)  # [T+1, C], -1 padded
    not_root = np.arange(size) > 0
    point_mass = draft_probs is None
    child_tok = tokens[:, 1:]  # [B, T]

    def alphas(mb, ms, alpha_set, is_set):
        """[B, T+1] current acceptances: stored where a child was deleted below the node, else derived
        top-down from the parent (one tree level per round)."""
        target = mb[rows[:, None], parents[None, 1:], child_tok]  # [B, T] M_b(parent)[c]
        draft = 1.0 if point_mass else ms[rows[:, None], parents[None, 1:], child_tok]
        ratio = jnp.concatenate([jnp.ones((b, 1)), jnp.where(draft > 0, target / jnp.maximum(draft, _TINY), 0.0)], 1)
        a = jnp.where(is_set, alpha_set, 1.0)
        for _ in range(tr.max_depth):
            a = jnp.where(is_set | ~not_root, a, jnp.minimum(1.0, a[:, parents] * ratio))
        return a

    def first_leaf(deleted):
        """[B]: the first node of the remaining tree in depth-first post-order (leftmost descent)."""
        u = jnp.zeros((b,), jnp.int32)
        for _ in range(tr.max_depth):
            kids = children[u]  # [B, C]
            alive = (kids >= 0) & ~deleted[rows[:, None], jnp.maximum(kids, 0)]
            u = jnp.where(alive.any(1), kids[rows, jnp.argmax(alive, axis=1)], u)
        return u

    def step(i, carry):
        mb, ms, alpha_set, is_set, deleted, done, result = carry
        a = alphas(mb, ms, alpha_set, is_set)
        u = first_leaf(deleted)
        eta = jax.random.uniform(jax.random.fold_in(key, i), (b,))
        accept = ~done & ((u == 0) | (eta < a[rows, u]))
        reject = ~done & ~accept
        x = jnp.asarray(parents)[u]  # [B] parent of the rejected leaf
        c = tokens[rows, u]
        mb_x, a_x = mb[rows, x], a[rows, x]  # [B, V], [B]
        ms_x = jax.nn.one_hot(c, v, dtype=p.dtype) if point_mass else ms[rows, x]
        m = jnp.sum(jnp.minimum(a_x[:, None] * mb_x, ms_x), axis=1)
        residual = jnp.maximum(a_x[:, None] * mb_x - ms_x, 0.0)
        total = residual.sum(1, keepdims=True)
        new_mb = jnp.where(total > _TINY, residual / jnp.maximum(total, _TINY), mb_x)
        new_alpha = jnp.where(1.0 - m > _TINY, jnp.clip((a_x - m) / jnp.maximum(1.0 - m, _TINY), 0.0, 1.0), 0.0)
        r = reject[:, None]
        mb = mb.at[rows, x].set(jnp.where(r, new_mb, mb_x))
        if not point_mass:  # the rejected token leaves the draft distribution (sampling without replacement)
            left = ms_x.at[rows, c].set(0.0)
            left = left / jnp.maximum(left.sum(1, keepdims=True), _TINY)
            ms = ms.at[rows, x].set(jnp.where(r, left, ms_x))
        alpha_set = alpha_set.at[rows, x].set(jnp.where(reject, new_alpha, alpha_set[rows, x]))
        is_set = is_set.at[rows, x].set(is_set[rows, x] | reject)
        deleted = deleted.at[rows, u].set(deleted[rows, u] | reject)
        return mb, ms, alpha_set, is_set, deleted, done | accept, jnp.where(accept, u, result)

    live = jnp.concatenate([jnp.ones((b, 1), bool), node_valid & np.asarray(tr.candidate[1:])], axis=1)
    ms = jnp.zeros((b, 1, 1), p.dtype) if point_mass else draft_probs.astype(p.dtype)
    zeros = jnp.zeros((b, size), p.dtype)
    init = (p, ms, zeros, jnp.zeros((b, size), bool), ~live, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    # every iteration accepts or deletes one node, and the root is always accepted: size rounds suffice
    mb, *_, result = lax.fori_loop(0, size, step, init)
    n = jnp.asarray(tr.depth)[result]
    path = jnp.asarray(tr.ancestors)[result, 1:] if tr.max_depth else jnp.zeros((b, 1), jnp.int32)
    resid = mb[rows, result]
    nxt = jax.random.categorical(jax.random.fold_in(key, size), jnp.log(resid), axis=-1).astype(jnp.int32)
    return n, path, nxt
