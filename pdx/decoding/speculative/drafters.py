"""Drafters: each proposes up to K tokens per step behind one interface.

A drafter is a frozen (hashable, static under jit) dataclass with `KIND` ("chain" or "tree"),
`cfg` (the draft model's config, None for model-free drafters) and
    arrays(model)                          -> pytree of traced inputs (e.g. draft params)
    init(arrays, plan, prompt_buf, lens)   -> drafter state (inside the jitted prefill)
    propose(arrays, state, hist, pos, k, sampling, key)
        -> drafts [B, K], n_draft [B], probs [B, K, V] | None, state
`hist [B, S]` holds every row's tokens by position; `pos [B]` is the position of the newest
token (not yet in the target cache); `k [B]` the current draft budget (adaptive length).
`probs` are the proposal distributions for lossless sampling; None means the drafts are
deterministic (one-hot proposals).

A tree drafter (run by `engine.tree_decode`) instead has a static `tree` (`tree.Tree`), `k` = its
candidate depth, and
    propose(arrays, state, hist, pos, sampling, key) -> nodes [B, T], node_valid [B, T], state
    observe(state, logits [B, T+1, V], pos, n, path [B, D], hidden [B, T+1, D] | None) -> state
        (sees the target's scores of every node, the accepted path and, for a drafter with
        `USES_HIDDEN`, the target's final hidden states there: `engine.tree_decode` then runs the
        target's `hidden_states` and `lm_head` in place of `forward`)
A drafter with `PROMPT_HIDDEN` also gets the target's final hidden states at every prompt position,
from the prefill's own passes: `init(arrays, plan, prompt_buf, lens, hidden [B, S, D])` (Clover
prefills its augmenting block's cache from them; the prefill is then never packed).
Chain drafters here: PromptLookup, DraftModel (draft_model, layer_skip), `ngram.NGramTable`; tree
drafters: TreeDraft (tree_draft), `ngram.Lookahead`, `medusa.Medusa`, `clover.Clover`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from pdx.decoding.ar import Plan, prefill_cache
from pdx.decoding.sampling import SamplingParams, filter_logits
from pdx.decoding.speculative import tree
from pdx.errors import InvalidInputError
from pdx.models import protocol

# Scoring a tree of nodes in one pass needs tree attention, and compacting the accepted path a KV cache.
TREE_NEEDS = protocol.Needs(extras=frozenset({"tree_mask"}), rollback=protocol.ROLLBACK_KV)


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Prompt lookup decoding (PLD): copy what followed the latest earlier occurrence of the last n-gram.

    Tries n = max_ngram .. min_ngram over prompt and generated text; no model, no state.
    """

    k: int
    max_ngram: int = 3
    min_ngram: int = 1
    KIND: ClassVar[str] = "chain"
    cfg: ClassVar[None] = None

    def arrays(self, model):
        return ()

    def init(self, arrays, plan: Plan, prompt_buf, prompt_lens):
        return ()

    def propose(self, arrays, state, hist, pos, k, sampling, key):
        b, s = hist.shape
        idx = jnp.arange(s)
        best_j = jnp.full((b,), -1, jnp.int32)
        best_n = jnp.zeros((b,), jnp.int32)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            match = jnp.ones((b, s), bool)
            for t in range(n):  # hist[j + t] == hist[pos - n + 1 + t]
                key_t = jnp.take_along_axis(hist, jnp.clip(pos - n + 1 + t, 0, s - 1)[:, None], axis=1)
                match &= jnp.roll(hist, -t, axis=1) == key_t
            ok = match & (idx[None] <= (pos - n)[:, None]) & (pos >= n - 1)[:, None]  # earlier, complete match
            j = jnp.max(jnp.where(ok, idx[None], -1), axis=1)
            take = (best_j < 0) & (j >= 0)
            best_j, best_n = jnp.where(take, j, best_j), jnp.where(take, n, best_n)
        start = best_j + best_n  # position of the first copied token
        drafts = jnp.take_along_axis(hist, jnp.clip(start[:, None] + jnp.arange(self.k), 0, s - 1), axis=1)
        available = jnp.where(best_j >= 0, jnp.clip(pos - start + 1, 0, self.k), 0)
        return drafts, jnp.minimum(available, k), None, state


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """A second model sharing the target's vocabulary drafts K tokens autoregressively with its own cache.

    Also serves layer-skip self-speculation: `layer_skip(model, skip)` builds one from the target.
    Each proposal first feeds what the target accepted since the last one. A KV draft keeps the K/V
    of the drafts it fed (lowering `lengths` drops the rest), so that is at most 2 tokens; a draft
    with a recurrent state keeps the state at the last accepted token and re-feeds up to K+1 tokens.
    """

    family: types.ModuleType
    cfg: object
    k: int
    params: object = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    KIND: ClassVar[str] = "chain"

    @property
    def keeps_kv(self) -> bool:
        return self.family.capabilities(self.cfg).rollback == protocol.ROLLBACK_KV

    def arrays(self, model):
        return self.params

    def init(self, params, plan: Plan, prompt_buf, prompt_lens):
        cache, _, _ = prefill_cache(self.family, params, self.cfg, plan, prompt_buf, prompt_lens)
        return cache

    def _step(self, params, cache, tokens, positions, valid):
        return self.family.forward(params, self.cfg, tokens, positions, cache, valid=valid)

    def propose(self, params, cache, hist, pos, k, sampling: SamplingParams, key):
        b, s = hist.shape
        # Catch up on what the target accepted since the last call: positions [valid length, pos].
        start = jnp.minimum(cache.lengths, pos)
        count = pos - start + 1  # KV: 1 (after a rejection) or 2 (after full acceptance); state: 1..K+1
        offsets = jnp.arange(2 if self.keeps_kv else self.k + 1)
        tokens = jnp.take_along_axis(hist, jnp.clip(start[:, None] + offsets, 0, s - 1), axis=1)
        cache = dataclasses.replace(cache, lengths=start)
        logits, cache = self._step(params, cache, tokens, start[:, None] + offsets, offsets < count[:, None])
        logits = jnp.take_along_axis(logits, (count - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
        accepted = cache  # the state after the newest accepted token

        def pick(logits, key):
            def sample():
                probs = jax.nn.softmax(filter_logits(logits, sampling), axis=-1)
                return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32), probs

            def greedy():
                return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros_like(logits)

            return lax.cond(sampling.temperature > 0, sample, greedy)

        def body(carry, i):
            cache, logits, key = carry
            key, sub = jax.random.split(key)
            tok, probs = pick(logits, sub)
            logits, cache = self._step(params, cache, tok[:, None], (pos + 1 + i)[:, None], jnp.ones((b, 1), bool))
            return (cache, logits[:, 0], key), (tok, probs)

        (cache, logits, key), (toks, probs) = lax.scan(body, (cache, logits, key), jnp.arange(self.k - 1))
        last_tok, last_probs = pick(logits, key)
        drafts = jnp.concatenate([toks.T, last_tok[:, None]], axis=1)  # [B, K]
        probs = jnp.concatenate([probs.transpose(1, 0, 2), last_probs[:, None]], axis=1)  # [B, K, V]
        return drafts, k, probs, (cache if self.keeps_kv else accepted)


def draft_model(model, draft, k: int) -> DraftModel:
    """Drafter from a second loaded `pdx.Model` (same vocabulary as the target)."""
    protocol.check(draft.family, draft.cfg, protocol.Needs(), "drafting with a second model")
    return DraftModel(family=draft.family, cfg=draft.cfg, k=k, params=draft.params)


def layer_skip(model, skip: list[int] | tuple[int, ...], k: int) -> DraftModel:
    """Self-speculative drafter: the target itself with the layers in `skip` left out (the family's
    `skip_layers`). Uses the target's own weights (no copy); the draft keeps its own, smaller cache.
    """
    protocol.check(model.family, model.cfg, protocol.Needs(layer_skip=True), "layer-skip drafting")
    params, cfg = model.family.skip_layers(model.params, model.cfg, skip)
    return DraftModel(family=model.family, cfg=cfg, k=k, params=params)


def calibrate_layer_skip(model, prompts: list[list[int]], num_skip: int) -> list[int]:
    """Choose `num_skip` layers to skip for self-speculation (Draft&Verify-style search, greedy).

    Repeatedly drops the layer whose removal keeps the highest agreement between the reduced
    model's next-token argmax and the full model's, teacher-forced over every position of the
    sample `prompts`. Returns the skipped layer indices, sorted.
    """
    import numpy as np

    n = model.cfg.num_layers
    if not (isinstance(num_skip, int) and 0 <= num_skip < n):
        raise InvalidInputError(f"num_skip must be an int in [0, {n}), got {num_skip!r}")
    width = max(len(p) for p in prompts)
    tokens = jnp.asarray([p + [0] * (width - len(p)) for p in prompts])
    valid = jnp.arange(width)[None] < jnp.asarray([len(p) for p in prompts])[:, None]
    positions = jnp.broadcast_to(jnp.arange(width), tokens.shape)
    forward = jax.jit(lambda params, cfg: jnp.argmax(model.family.forward(params, cfg, tokens, positions)[0], -1),
                      static_argnums=1)
    reference = np.asarray(forward(model.params, model.cfg))
    mask = np.asarray(valid)

    def agreement(skip):
        draft = layer_skip(model, skip, 1)
        return float((np.asarray(forward(draft.params, draft.cfg)) == reference)[mask].mean())

    skipped: list[int] = []
    from tqdm import tqdm

    for _ in tqdm(range(num_skip), desc="layer-skip search (layers chosen)", disable=num_skip == 0):
        scores = {i: agreement(skipped + [i]) for i in range(n) if i not in skipped}
        skipped.append(max(scores, key=lambda i: (scores[i], -i)))
    return sorted(skipped)


@dataclasses.dataclass(frozen=True)
class TreeDraft:
    """A draft model (`draft_model` / `layer_skip`) fills a static tree: the top-`branches[d]` tokens of
    the draft after every node at depth d become its children (`tree.branching`).

    One catch-up pass (the tokens the target accepted since the last call, then the root) and one
    pass per further depth over the nodes drafted so far, with the tree mask; the draft cache keeps
    only the accepted prefix. Candidates are deterministic, so stochastic verification treats them
    as point-mass proposals (`tree.verify_sampling`).
    """

    draft: DraftModel
    branches: tuple[int, ...]
    KIND: ClassVar[str] = "tree"

    def __post_init__(self):
        tree.branching(self.branches)  # validates the shape

    @functools.cached_property
    def tree(self):
        return tree.branching(self.branches)

    @property
    def k(self) -> int:
        return len(self.branches)

    @property
    def cfg(self):
        return self.draft.cfg

    @property
    def family(self):
        return self.draft.family

    def arrays(self, model):
        return self.draft.params

    def init(self, params, plan: Plan, prompt_buf, prompt_lens):
        return self.draft.init(params, plan, prompt_buf, prompt_lens)

    def propose(self, params, cache, hist, pos, sampling, key):
        b, s = hist.shape
        depth = self.k
        start = jnp.minimum(cache.lengths, pos)
        count = pos - start + 1  # <= depth + 1: the accepted path, then the root
        offsets = jnp.arange(depth + 1)
        tokens = jnp.take_along_axis(hist, jnp.clip(start[:, None] + offsets, 0, s - 1), axis=1)
        cache = dataclasses.replace(cache, lengths=start)
        logits, cache = self.draft._step(params, cache, tokens, start[:, None] + offsets, offsets < count[:, None])
        root = jnp.take_along_axis(logits, (count - 1)[:, None, None], axis=1)  # [B, 1, V]
        nodes = lax.top_k(root, self.branches[0])[1].reshape(b, -1).astype(jnp.int32)  # [B, b_1]
        mask = self.tree.mask[1:, 1:]  # [T, T] among the drafted nodes (the root sits in the cache)
        node_pos = pos[:, None] + self.tree.depth[1:]  # [B, T]
        for (lo, hi), width in zip(tree.level_slices(self.branches)[:-1], self.branches[1:]):
            logits, cache = self.draft.family.forward(
                params, self.draft.cfg, nodes, node_pos[:, : hi - 1], cache,
                tree_mask=jnp.broadcast_to(mask[: hi - 1, : hi - 1], (b, hi - 1, hi - 1)))
            cache = dataclasses.replace(cache, lengths=pos + 1)
            kids = lax.top_k(logits[:, lo - 1 : hi - 1], width)[1].reshape(b, -1).astype(jnp.int32)
            nodes = jnp.concatenate([nodes, kids], axis=1)
        return nodes, jnp.ones(nodes.shape, bool), cache  # [B, T]

    def observe(self, state, logits, pos, n, path, hidden):
        return state


def tree_draft(drafter: DraftModel, branches) -> TreeDraft:
    """Tree drafter from a chain `DraftModel` (its K is ignored; the depth is `len(branches)`)."""
    if not isinstance(drafter, DraftModel):
        raise InvalidInputError("a tree is drafted by a DraftModel (draft_model or layer_skip)")
    protocol.check(drafter.family, drafter.cfg, TREE_NEEDS, "tree drafting")
    return TreeDraft(draft=drafter, branches=tuple(branches) if isinstance(branches, (list, tuple)) else branches)
