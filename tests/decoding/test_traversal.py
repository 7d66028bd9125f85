"""Traversal Verification: lossless on trees of point-mass candidates and on trees sampled from a draft
distribution (chi-square over the first two emitted tokens), and more accepted tokens than token-level
verification on a sampled chain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx.decoding.sampling import SamplingParams
from pdx.decoding.speculative import traversal, tree, verify
from tests.decoding.test_ar import _chi_square_ok

V, ROWS = 5, 20000


def _dist(rng, *shape, scale=1.5):
    z = rng.normal(0, scale, (*shape, V))
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _children(rng, q, k):
    """[ROWS, k] distinct tokens per row: drawn without replacement from q [ROWS, V] (Gumbel top-k), or
    uniformly at random when q is None (candidates that ignore every probability)."""
    scores = rng.random((ROWS, V)) if q is None else np.log(q) + rng.gumbel(size=(ROWS, V))
    return np.argsort(-scores, axis=1)[:, :k]


def _sampled_tree(rng, p1, p2, p3, q1, q2, branches=(2, 2)):
    """A `tree.branching(branches)` tree per row: tokens, target p [ROWS, T+1, V] (the law after each
    node's path) and the draft distributions each node's children came from (None: point masses)."""
    tr = tree.branching(branches)
    (lo1, hi1), (lo2, hi2) = tree.level_slices(branches)
    tokens = np.zeros((ROWS, tr.size + 1), np.int64)
    tokens[:, lo1:hi1] = _children(rng, None if q1 is None else np.broadcast_to(q1, (ROWS, V)), branches[0])
    for u in range(lo1, hi1):
        kids = [i for i in range(lo2, hi2) if tr.parents[i] == u]
        tokens[:, kids] = _children(rng, None if q2 is None else q2[tokens[:, u]], branches[1])
    p = np.zeros((ROWS, tr.size + 1, V))
    p[:, 0] = p1
    p[:, lo1:hi1] = p2[tokens[:, lo1:hi1]]
    p[:, lo2:hi2] = p3[tokens[:, np.asarray(tr.parents[lo2:hi2])], tokens[:, lo2:hi2]]
    q = None
    if q1 is not None:
        q = np.zeros_like(p)
        q[:, 0] = q1
        q[:, lo1:hi1] = q2[tokens[:, lo1:hi1]]
    return tr, tokens, p, q


def _first_two(rng, tokens, p2, n, path, nxt):
    """The first two emitted tokens per row; a row that accepted nothing draws its second token the way
    the next pass would (from the target after its first)."""
    rows = np.arange(ROWS)
    path_tok = tokens[rows[:, None], path]
    first = np.where(n >= 1, path_tok[:, 0], nxt)
    second = np.where(n >= 2, path_tok[:, 1], nxt)
    fresh = (rng.random(ROWS)[:, None] > np.cumsum(p2[first], axis=1)).sum(1)  # inverse-CDF draw
    return first, np.where(n == 0, fresh, second)


@pytest.mark.parametrize("sampled", [False, True])
def test_traversal_is_lossless_on_trees(sampled):
    rng = np.random.default_rng(3 + sampled)
    p1, p2, p3 = _dist(rng), _dist(rng, V), _dist(rng, V, V)
    q1, q2 = (_dist(rng), _dist(rng, V)) if sampled else (None, None)
    tr, tokens, p, q = _sampled_tree(rng, p1, p2, p3, q1, q2)
    n, path, nxt = jax.jit(traversal.traverse, static_argnums=0)(
        tr, jnp.asarray(p, jnp.float32), jnp.asarray(tokens, jnp.int32), jnp.ones((ROWS, tr.size), bool),
        jax.random.PRNGKey(0), None if q is None else jnp.asarray(q, jnp.float32))
    n, path, nxt = map(np.asarray, (n, path, nxt))
    assert 0 < (n > 0).mean() < 1 and (n == 2).any()  # some paths accepted, some rejected
    first, second = _first_two(rng, tokens, p2, n, path, nxt)
    assert _chi_square_ok(first * V + second, (p1[:, None] * p2).reshape(-1))


def test_invalid_nodes_are_never_accepted():
    rng = np.random.default_rng(0)
    p1, p2, p3 = _dist(rng, scale=0.1), _dist(rng, V, scale=0.1), _dist(rng, V, V, scale=0.1)
    tr, tokens, p, _ = _sampled_tree(rng, p1, p2, p3, None, None)
    valid = np.ones((ROWS, tr.size), bool)
    valid[:, 1] = False  # node 2 (the root's second child) is off
    n, path, _ = traversal.traverse(tr, jnp.asarray(p, jnp.float32), jnp.asarray(tokens, jnp.int32),
                                    jnp.asarray(valid), jax.random.PRNGKey(1))
    n, path = np.asarray(n), np.asarray(path)
    assert not (path[n >= 1, 0] == 2).any() and (path[n >= 1, 0] == 1).all() and (n > 0).any()


def test_sequence_level_acceptance_beats_token_level_on_a_sampled_chain():
    """A drafted chain of 2 where the first token is under-proposed and the second over-covered: the
    sequence-level rule accepts more, and both emit the target's law."""
    rng = np.random.default_rng(5)
    p1, p2 = _dist(rng, scale=1.0), _dist(rng, V, scale=1.0)
    q1, q2 = _dist(rng, scale=1.0), _dist(rng, V, scale=1.0)
    chain = tree.Tree(parents=(-1, 0, 1), candidate=(False, True, True))
    d1 = _children(rng, np.broadcast_to(q1, (ROWS, V)), 1)[:, 0]
    d2 = _children(rng, q2[d1], 1)[:, 0]
    tokens = np.stack([np.zeros(ROWS, np.int64), d1, d2], 1)
    p = np.stack([np.broadcast_to(p1, (ROWS, V)), p2[d1], p2[d2]], 1)  # the last node's law: any
    q = np.stack([np.broadcast_to(q1, (ROWS, V)), q2[d1], np.zeros((ROWS, V))], 1)
    n, path, nxt = traversal.traverse(chain, jnp.asarray(p, jnp.float32), jnp.asarray(tokens, jnp.int32),
                                      jnp.ones((ROWS, 2), bool), jax.random.PRNGKey(2), jnp.asarray(q, jnp.float32))
    n, path, nxt = map(np.asarray, (n, path, nxt))
    first, second = _first_two(rng, tokens, p2, n, path, nxt)
    assert _chi_square_ok(first * V + second, (p1[:, None] * p2).reshape(-1))
    logits = jnp.log(jnp.asarray(p, jnp.float32))
    n_token, _ = verify.verify_sampling(logits, jnp.asarray(tokens[:, 1:], jnp.int32), jnp.full((ROWS,), 2),
                                        jnp.asarray(q[:, :2], jnp.float32), SamplingParams.create(temperature=1.0),
                                        jax.random.PRNGKey(3))
    # exact expectations: token level sum_x min(p, q) per step; traversal is at least that on every chain
    gain = n.mean() - np.asarray(n_token).mean()
    assert gain > 5 * np.sqrt(2 * 0.5 / ROWS), gain
