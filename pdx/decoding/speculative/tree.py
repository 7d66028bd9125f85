"""Static draft trees: shape, attention mask, greedy and lossless stochastic verification, KV compaction.

A tree has nodes 0..T in an order where every parent comes before its children; node 0 is the root
(the newest token, at position pos), node i sits at position pos + depth[i] and, in the verify pass,
attends to the cached prefix and to its own ancestors only. Nodes marked `candidate=False` are
scored but never accepted (lookahead decoding's Jacobi window rides along in the same pass).
After verification the accepted root-to-node path is moved into consecutive cache slots.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pdx.decoding.sampling import SamplingParams
from pdx.decoding.speculative.verify import target_probs
from pdx.errors import InvalidInputError


@dataclasses.dataclass(frozen=True)
class Tree:
    """Static tree: `parents[i]` (-1 for the root), `candidate[i]` (may verification accept node i)."""

    parents: tuple[int, ...]
    candidate: tuple[bool, ...]

    def __post_init__(self):
        if not self.parents or self.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(self.parents) if i):
            raise InvalidInputError("a tree needs node 0 as its root and every parent before its children")
        if len(self.candidate) != len(self.parents):
            raise InvalidInputError("candidate flags must match the number of tree nodes")

    @property
    def size(self) -> int:
        """Number of drafted nodes T (the root excluded)."""
        return len(self.parents) - 1

    @functools.cached_property
    def depth(self) -> np.ndarray:
        d = np.zeros(len(self.parents), np.int32)  # [T+1]
        for i, p in enumerate(self.parents[1:], 1):
            d[i] = d[p] + 1
        return d

    @property
    def max_depth(self) -> int:
        """Longest path of candidate nodes (the most tokens one pass can accept)."""
        return int(max((self.depth[i] for i, c in enumerate(self.candidate) if c and i), default=0))

    @functools.cached_property
    def ancestors(self) -> np.ndarray:
        """[T+1, D+1]: ancestor of node i at depth d (i itself at its own depth; 0 past it)."""
        anc = np.zeros((len(self.parents), self.max_depth + 1), np.int32)
        for i in range(len(self.parents)):
            j = i
            while j > 0:
                if self.depth[j] <= self.max_depth:
                    anc[i, self.depth[j]] = j
                j = self.parents[j]
        return anc

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """[T+1, T+1] bool: node i may attend to node j (j is i or an ancestor of i)."""
        m = np.zeros((len(self.parents),) * 2, bool)
        for i in range(len(self.parents)):
            j = i
            while j >= 0:
                m[i, j] = True
                j = self.parents[j]
        return m

    @functools.cached_property
    def rank(self) -> np.ndarray:
        """[T+1]: index of node i among its parent's children, in node order (0 for the root): the top-k
        rank a head-based drafter fills it with."""
        seen: dict[int, int] = {}
        r = np.zeros(len(self.parents), np.int32)
        for i, p in enumerate(self.parents[1:], 1):
            r[i] = seen.get(p, 0)
            seen[p] = r[i] + 1
        return r

    @functools.cached_property
    def children(self) -> np.ndarray:
        """[T+1, C]: candidate children of each node in order, -1 padded (C = the widest branching)."""
        nodes = range(len(self.parents))
        kids = [[i for i in nodes if self.parents[i] == u and self.candidate[i]] for u in nodes]
        width = max(1, max(len(k) for k in kids))
        return np.array([k + [-1] * (width - len(k)) for k in kids], np.int32)


def branching(branches: tuple[int, ...]) -> Tree:
    """The full tree with `branches[d]` children per node at depth d (breadth-first order, children of
    one parent adjacent and in rank order): (3, 2, 1) has 3 + 6 + 6 = 15 nodes."""
    if not (isinstance(branches, (tuple, list)) and branches and all(isinstance(b, int) and b >= 1 for b in branches)):
        raise InvalidInputError(f"a tree shape is a non-empty tuple of branching factors >= 1, got {branches!r}")
    if sum(math.prod(branches[: d + 1]) for d in range(len(branches))) > 512:
        raise InvalidInputError(f"tree shape {tuple(branches)} has more than 512 nodes")
    parents, level = [-1], [0]
    for b in branches:
        nxt = []
        for u in level:
            for _ in range(b):
                parents.append(u)
                nxt.append(len(parents) - 1)
        level = nxt
    return Tree(tuple(parents), (False,) + (True,) * (len(parents) - 1))


def from_paths(paths) -> Tree:
    """A sparse tree from Medusa-style choices: each path is the top-k ranks from the root, e.g.
    [[0], [1], [0, 0]] is the top-2 tokens of the first head and the top token of the second after the
    first. Every prefix of a path must be a path too and a node's children hold ranks 0..m-1; nodes
    come breadth-first, siblings in rank order (so `Tree.rank` gives back the last rank of each path)."""
    try:
        paths = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        bad = not paths or any(not p or min(p) < 0 for p in paths)
    except (TypeError, ValueError):
        bad = True
    if bad:
        raise InvalidInputError(f"a tree's paths are non-empty lists of ranks >= 0, got {paths!r}")
    if len(paths) > 512:
        raise InvalidInputError(f"a tree of {len(paths)} paths has more than 512 nodes")
    index = {(): 0}
    parents = [-1]
    for p in paths:
        if p[:-1] not in index or (p[-1] > 0 and p[:-1] + (p[-1] - 1,) not in index):
            raise InvalidInputError(f"tree path {list(p)} needs its prefix and its lower-ranked sibling as paths")
        index[p] = len(parents)
        parents.append(index[p[:-1]])
    return Tree(tuple(parents), (False,) + (True,) * len(paths))


def level_slices(branches: tuple[int, ...]) -> list[tuple[int, int]]:
    """Node index ranges [start, stop) of each depth 1..D of `branching(branches)`."""
    out, start, width = [], 1, 1
    for b in branches:
        width *= b
        out.append((start, start + width))
        start += width
    return out


def verify_greedy(tr: Tree, logits, tokens, node_valid):
    """Deepest node whose every token equals the target's argmax after its parent.

    logits [B, T+1, V], tokens [B, T+1] (root first), node_valid [B, T]. Returns accepted count
    n [B], path [B, D] (accepted node at depth 1..D; unused entries point anywhere) and the next token.
    """
    y = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T+1]
    parents = np.maximum(np.asarray(tr.parents), 0)
    ok = (tokens[:, 1:] == y[:, parents[1:]]) & node_valid & np.asarray(tr.candidate[1:])  # [B, T]
    acc = jnp.concatenate([jnp.ones_like(ok[:, :1]), ok], axis=1)  # [B, T+1]
    for _ in range(tr.max_depth):
        acc = acc & acc[:, parents]
    best = jnp.argmax(jnp.where(acc, tr.depth, -1), axis=1)  # [B] first deepest
    n = jnp.asarray(tr.depth)[best]
    path = jnp.asarray(tr.ancestors)[best, 1:]  # [B, D]
    return n, path, jnp.take_along_axis(y, best[:, None], axis=1)[:, 0]


def verify_sampling(tr: Tree, logits, tokens, node_valid, sampling: SamplingParams, key):
    """Lossless multi-round rejection over siblings (SpecInfer-style, deterministic candidates).

    At the current node with target distribution r (initially p), each candidate child x is accepted
    with probability r(x); on a rejection x is removed (r <- r without x, renormalized) and the next
    sibling is tried. Accepting moves to the child; if every child is rejected the next token is
    drawn from r. Each emitted token is therefore distributed exactly as p given the accepted prefix.
    """
    b = tokens.shape[0]
    p = target_probs(logits, sampling)  # [B, T+1, V]
    children = jnp.asarray(tr.children)  # [T+1, C]
    valid = jnp.concatenate([jnp.zeros((b, 1), bool), node_valid & np.asarray(tr.candidate[1:])], axis=1)
    rows = jnp.arange(b)
    u = jnp.zeros((b,), jnp.int32)  # current node
    alive = jnp.ones((b,), bool)
    n = jnp.zeros((b,), jnp.int32)
    path = jnp.zeros((b, max(tr.max_depth, 1)), jnp.int32)
    resid = p[:, 0]
    keys = jax.random.split(key, tr.max_depth * children.shape[1] + 1)
    for d in range(tr.max_depth):
        r = p[rows, u]  # [B, V]
        chosen = jnp.full((b,), -1, jnp.int32)
        for j in range(children.shape[1]):
            c = children[u, j]  # [B]
            x = tokens[rows, jnp.maximum(c, 0)]
            live = alive & (c >= 0) & valid[rows, jnp.maximum(c, 0)] & (chosen < 0)
            take = live & (jax.random.uniform(keys[d * children.shape[1] + j], (b,)) < r[rows, x])
            chosen = jnp.where(take, c, chosen)
            removed = r.at[rows, x].set(0.0)
            total = removed.sum(-1, keepdims=True)
            r = jnp.where((live & ~take)[:, None] & (total > 0), removed / jnp.maximum(total, 1e-30), r)
        moved = chosen >= 0
        resid = jnp.where((alive & ~moved)[:, None], r, resid)
        path = path.at[:, d].set(jnp.where(moved, chosen, 0))
        n = n + moved
        alive = alive & moved
        u = jnp.where(moved, chosen, u)
    resid = jnp.where(alive[:, None], p[rows, u], resid)  # every depth accepted: bonus token from p
    nxt = jax.random.categorical(keys[-1], jnp.log(resid), axis=-1).astype(jnp.int32)
    return n, path, nxt


def offered_by_depth(tr: Tree, node_valid) -> jax.Array:
    """[B, D]: does the row offer at least one valid candidate at depth d + 1?"""
    cand = node_valid & np.asarray(tr.candidate[1:])  # [B, T]
    at = np.asarray(tr.depth[1:])[None, :] == np.arange(1, tr.max_depth + 1)[:, None]  # [D, T]
    return jnp.any(cand[:, None, :] & at[None], axis=-1)


def compact(cache, pos, path):
    """Move the accepted nodes' K/V (slots pos + path[:, i]) to slots pos + 1 + i (a KV cache,
    stacked `[L, B, K, S, H]` or per-layer `[B, K, S, H]` buffers); slots past the accepted count
    are rewritten with don't-care values."""
    src = pos[:, None] + path  # [B, D]
    rows = jnp.arange(pos.shape[0])[:, None]
    dst = pos[:, None] + 1 + jnp.arange(path.shape[1])  # [B, D]

    def move(buf):  # buf [..., B, K, S, H]
        if buf.ndim == 4:
            return buf.at[rows, :, dst].set(buf[rows, :, src], mode="drop")
        return buf.at[:, rows, :, dst].set(buf[:, rows, :, src], mode="drop")

    return dataclasses.replace(cache, k=jax.tree.map(move, cache.k), v=jax.tree.map(move, cache.v))
