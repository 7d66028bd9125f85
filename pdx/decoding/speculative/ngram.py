"""Model-free drafters that learn n-grams online, inside the decode loop, in fixed-size device tables.

- `NGramTable` (ADED-style adaptive n-gram drafting): hashed (c)-token contexts -> next token with a
  small vote count, for several context lengths; updated with every confirmed token; drafts by
  chaining lookups (longest context that hits first).
- `Lookahead` (Lookahead Decoding, Fu et al. 2024): the target alone runs Jacobi iterations on a
  2-D window (N-1 levels x W columns) in the same pass that verifies up to G pooled n-grams that
  start with the newest token; the window's trajectories feed the n-gram pool. Runs in the tree loop.

Both insert what the target confirmed since their last call (prompt at init, then the accepted
tokens) with `scan_new`, so they see exactly the tokens in `hist` up to `pos`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from pdx.decoding.ar import Plan
from pdx.decoding.speculative.tree import Tree
from pdx.errors import InvalidInputError

_MUL = (0x9E3779B1, 0x85EBCA77)  # odd multipliers of the two context hashes


def scan_new(insert, state, hist, lo, hi, width):
    """`state = insert(state, hist, j, on)` for j = lo + i, i < width (a traced or static trip count),
    with `on [B] = j < hi` (per-row range [lo, hi))."""
    return lax.fori_loop(0, width, lambda i, st: insert(st, hist, lo + i, lo + i < hi), state)


def _gather(hist, idx):
    """hist[b, idx[b, ...]] with clipping: `hist [B, S]`, `idx [B, ...]`."""
    flat = idx.reshape(idx.shape[0], -1)
    return jnp.take_along_axis(hist, jnp.clip(flat, 0, hist.shape[1] - 1), axis=1).reshape(idx.shape)


def _hash(ctx, which):
    """uint32 hash of the context tokens `ctx [B, c]`."""
    h = jnp.zeros(ctx.shape[:1], jnp.uint32)
    for i in range(ctx.shape[1]):
        h = (h ^ (ctx[:, i].astype(jnp.uint32) + jnp.uint32(i + 1))) * jnp.uint32(_MUL[which])
    return h ^ (h >> 15)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TableState:
    check: jax.Array  # [B, O, H] uint32 second hash of the stored context (0 = empty)
    token: jax.Array  # [B, O, H] predicted next token
    votes: jax.Array  # [B, O, H] confidence of `token` (1..max_votes)
    upto: jax.Array  # [B] positions < upto are in the table


@dataclasses.dataclass(frozen=True)
class NGramTable:
    """ADED-style adaptive n-gram drafter: per row and context length c in `contexts`, a hashed table
    (`slots` entries) maps the last c tokens to a next token with a vote count: a repeat adds a vote
    (up to `max_votes`), a different continuation removes one and replaces the token at zero, so the
    table follows the text as it is generated. Drafts chain up to K lookups, longest context first,
    and stop at the first miss or at an entry with fewer than `min_votes` votes.
    """

    k: int
    contexts: tuple[int, ...] = (3, 2, 1)
    slots: int = 4096
    max_votes: int = 4
    min_votes: int = 1
    KIND: ClassVar[str] = "chain"
    cfg: ClassVar[None] = None

    def __post_init__(self):
        if not (self.contexts and all(isinstance(c, int) and c >= 1 for c in self.contexts)):
            raise InvalidInputError(f"contexts must be context lengths >= 1, got {self.contexts!r}")
        if self.slots < 2 or self.slots & (self.slots - 1):
            raise InvalidInputError(f"slots must be a power of two >= 2, got {self.slots}")

    def arrays(self, model):
        return ()

    def _slot(self, ctx):
        h = _hash(ctx, 0)
        return (h & jnp.uint32(self.slots - 1)).astype(jnp.int32), _hash(ctx, 1) | jnp.uint32(1)

    def _insert(self, st: TableState, hist, j, on):
        """Record that hist[j] followed the contexts ending at j - 1."""
        rows = jnp.arange(hist.shape[0])
        j = jnp.broadcast_to(j, rows.shape)
        tok = _gather(hist, j[:, None])[:, 0]
        check, token, votes = st.check, st.token, st.votes
        for o, c in enumerate(self.contexts):
            slot, chk = self._slot(_gather(hist, j[:, None] - c + jnp.arange(c)))
            here = on & (j >= c)
            same = check[rows, o, slot] == chk
            agree = same & (token[rows, o, slot] == tok)
            v = jnp.where(agree, jnp.minimum(votes[rows, o, slot] + 1, self.max_votes),
                          jnp.where(same, votes[rows, o, slot] - 1, 0))
            replace = v <= 0
            check = check.at[rows, o, slot].set(jnp.where(here, chk, check[rows, o, slot]))
            token = token.at[rows, o, slot].set(jnp.where(here & replace, tok, token[rows, o, slot]))
            votes = votes.at[rows, o, slot].set(jnp.where(here, jnp.where(replace, 1, v), votes[rows, o, slot]))
        return TableState(check, token, votes, st.upto)

    def init(self, arrays, plan: Plan, prompt_buf, prompt_lens):
        b, shape = plan.batch, (plan.batch, len(self.contexts), self.slots)
        st = TableState(jnp.zeros(shape, jnp.uint32), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32),
                        prompt_lens)
        return scan_new(self._insert, st, prompt_buf, jnp.zeros((b,), jnp.int32), prompt_lens, jnp.max(prompt_lens))

    def propose(self, arrays, st: TableState, hist, pos, k, sampling, key):
        st = scan_new(self._insert, st, hist, st.upto, pos + 1, self.k + 1)
        st = dataclasses.replace(st, upto=pos + 1)
        b = hist.shape[0]
        rows = jnp.arange(b)
        cmax = max(self.contexts)
        seq = _gather(hist, pos[:, None] - cmax + 1 + jnp.arange(cmax))  # [B, cmax]: the newest tokens
        seq = jnp.concatenate([seq, jnp.zeros((b, self.k), jnp.int32)], axis=1)  # [B, cmax + K]
        live = jnp.ones((b,), bool)
        n = jnp.zeros((b,), jnp.int32)
        for i in range(self.k):
            found = jnp.zeros((b,), bool)
            nxt = jnp.zeros((b,), jnp.int32)
            for o, c in enumerate(self.contexts):
                slot, chk = self._slot(seq[:, cmax + i - c : cmax + i])
                hit = (st.check[rows, o, slot] == chk) & (st.votes[rows, o, slot] >= self.min_votes)
                hit &= pos + i + 1 >= c  # the context lies inside the text
                nxt = jnp.where(~found & hit, st.token[rows, o, slot], nxt)
                found |= hit
            live &= found
            n += live
            seq = seq.at[:, cmax + i].set(nxt)
        return seq[:, cmax:], jnp.minimum(n, k), None, st


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PoolState:
    window: jax.Array  # [B, N-1, W] Jacobi window: level 0 (oldest guesses) .. N-2 (newest)
    key: jax.Array  # [B, P] first token of the n-grams in each bucket (-1 = empty)
    grams: jax.Array  # [B, P, G, N-1] continuations (FIFO, newest replaces oldest)
    count: jax.Array  # [B, P] n-grams ever inserted into the bucket (since its key last changed)
    upto: jax.Array  # [B] confirmed n-grams ending before this position are in the pool


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """Lookahead decoding: Jacobi window `window` x (`ngram` - 1) levels, pool of `guesses` n-grams per
    first token (`buckets` hashed buckets per row), seeded from the prompt and fed with the window's
    n-grams and the confirmed text. Verification candidates are the pooled n-grams that start with the
    newest token; all of it is one target pass with a tree mask (`tree`)."""

    window: int = 5
    ngram: int = 4
    guesses: int = 5
    buckets: int = 4096
    KIND: ClassVar[str] = "tree"
    cfg: ClassVar[None] = None

    def __post_init__(self):
        for name, v, lo in (("window", self.window, 1), ("ngram", self.ngram, 2), ("guesses", self.guesses, 1)):
            if not (isinstance(v, int) and v >= lo):
                raise InvalidInputError(f"lookahead {name} must be an int >= {lo}, got {v!r}")
        if self.buckets < 2 or self.buckets & (self.buckets - 1):
            raise InvalidInputError(f"buckets must be a power of two >= 2, got {self.buckets}")

    @property
    def k(self) -> int:
        return self.ngram - 1

    def _node(self, level, col):
        return 1 + level * self.window + col

    @functools.cached_property
    def tree(self) -> Tree:
        """Root; the window (level l, column i sees level 0 columns <= i, then column i of levels 1..l:
        its Jacobi trajectory, at position pos + 1 + i + l); then `guesses` chains of N-1 candidates."""
        n1, w = self.ngram - 1, self.window
        parents = [-1]
        for level in range(n1):
            for col in range(w):
                parents.append(self._node(level - 1, col) if level else (self._node(0, col - 1) if col else 0))
        for _ in range(self.guesses):
            for j in range(n1):
                parents.append(0 if j == 0 else len(parents) - 1)
        return Tree(tuple(parents), (False,) * (1 + n1 * w) + (True,) * (self.guesses * n1))

    def arrays(self, model):
        return ()

    def _insert_gram(self, st: PoolState, first, rest, on):
        """Add the n-gram (first, *rest) unless the bucket already holds it: first [B], rest [B, N-1]."""
        rows = jnp.arange(first.shape[0])
        bucket = first & (self.buckets - 1)
        same = st.key[rows, bucket] == first
        count = jnp.where(same, st.count[rows, bucket], 0)
        held = jnp.arange(self.guesses) < count[:, None]
        dup = jnp.any(jnp.all(st.grams[rows, bucket] == rest[:, None], axis=-1) & held, axis=-1)
        write = on & ~dup
        slot = count % self.guesses
        old = st.grams[rows, bucket, slot]
        return dataclasses.replace(
            st, key=st.key.at[rows, bucket].set(jnp.where(write, first, st.key[rows, bucket])),
            grams=st.grams.at[rows, bucket, slot].set(jnp.where(write[:, None], rest, old)),
            count=st.count.at[rows, bucket].set(jnp.where(write, count + 1, st.count[rows, bucket])))

    def _insert_text(self, st: PoolState, hist, j, on):
        """Add the confirmed n-gram that ends at position j."""
        j = jnp.broadcast_to(j, hist.shape[:1])
        gram = _gather(hist, j[:, None] - self.ngram + 1 + jnp.arange(self.ngram))  # [B, N]
        return self._insert_gram(st, gram[:, 0], gram[:, 1:], on & (j >= self.ngram - 1))

    def init(self, arrays, plan: Plan, prompt_buf, prompt_lens):
        b, n1, w = plan.batch, self.ngram - 1, self.window
        # initial guesses: the prompt's last tokens (any tokens are correct, only acceptance changes)
        idx = prompt_lens[:, None, None] - w + jnp.arange(w)[None, None] + jnp.arange(n1)[None, :, None] - n1
        st = PoolState(window=_gather(prompt_buf, jnp.maximum(idx, 0)),
                       key=jnp.full((b, self.buckets), -1, jnp.int32),
                       grams=jnp.zeros((b, self.buckets, self.guesses, n1), jnp.int32),
                       count=jnp.zeros((b, self.buckets), jnp.int32), upto=prompt_lens)
        return scan_new(self._insert_text, st, prompt_buf, jnp.zeros((b,), jnp.int32), prompt_lens,
                        jnp.max(prompt_lens))

    def propose(self, arrays, st: PoolState, hist, pos, sampling, key):
        st = scan_new(self._insert_text, st, hist, st.upto, pos + 1, self.ngram)
        st = dataclasses.replace(st, upto=pos + 1)
        b, n1 = hist.shape[0], self.ngram - 1
        rows = jnp.arange(b)
        last = _gather(hist, pos[:, None])[:, 0]
        bucket = last & (self.buckets - 1)
        count = jnp.where(st.key[rows, bucket] == last, jnp.minimum(st.count[rows, bucket], self.guesses), 0)
        cands = st.grams[rows, bucket].reshape(b, -1)  # [B, G*(N-1)]
        cand_valid = jnp.repeat(jnp.arange(self.guesses)[None] < count[:, None], n1, axis=1)
        nodes = jnp.concatenate([st.window.reshape(b, -1), cands], axis=1)  # [B, T]
        valid = jnp.concatenate([jnp.ones((b, n1 * self.window), bool), cand_valid], axis=1)
        return nodes, valid, st

    def observe(self, st: PoolState, logits, pos, n, path, hidden):
        """One Jacobi step: the target's argmax after the newest level becomes a new level, and the
        window's columns (level 0 .. N-2, new) are N-grams for the pool."""
        n1, w = self.ngram - 1, self.window
        top = jnp.argmax(logits[:, self._node(n1 - 1, 0) : self._node(n1 - 1, 0) + w], axis=-1).astype(jnp.int32)
        cols = jnp.concatenate([st.window, top[:, None]], axis=1)  # [B, N, W]
        for i in range(w):
            st = self._insert_gram(st, cols[:, 0, i], cols[:, 1:, i], jnp.ones(top.shape[:1], bool))
        return dataclasses.replace(st, window=cols[:, 1:])
