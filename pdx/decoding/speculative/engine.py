"""The draft/verify loop: one jitted `lax.while_loop`, per-row acceptance, rollback by the family's rule.

Each iteration: the drafter proposes up to K tokens; the target scores (last, d_1..d_K) in one
forward pass over K+1 positions; the longest acceptable prefix d_1..d_n is kept, followed by
the target's own next token (correction or bonus), so every pass emits n+1 tokens. The target
cache then keeps exactly last, d_1..d_n: the family's `rollback` (a KV cache lowers its lengths; a
recurrent state is rebuilt from the traced forward's inputs). Greedy verification is exact match,
so the output is token-identical to the AR engine; sampling uses lossless rejection sampling, token by
token (`verifier="token"`: Leviathan et al. for chains, SpecInfer's multi-round rule for trees) or over
whole drafted sequences from the leaves up (`verifier="traversal"`, `traversal.py`). K is static; the
per-row draft budget k (adaptive length) is traced. An iteration where no row drafted anything (a chain
drafter found no match) runs the AR engine's one-token step instead of the K+1-token pass; the two are
while loops of zero or one trip (`run_if`), since a `lax.cond` between them copied the whole KV cache.

Tree drafters (`tree_decode`) score a static tree of drafted nodes in the same single pass (tree
attention mask) and move the accepted path's K/V into consecutive slots; see `tree.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pdx.decoding import ar, compiled
from pdx.decoding.result import GenerationResult
from pdx.decoding.sampling import SamplingParams
from pdx.decoding.speculative import drafters, traversal, tree
from pdx.decoding.speculative.verify import verify_greedy, verify_sampling
from pdx.errors import require
from pdx.models import protocol

VERIFIERS = ("token", "traversal")  # how sampled drafts are accepted (greedy drafts: always exact match)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecState:
    cache: object  # target cache; lengths[b] == pos[b] (the newest token is not in it yet)
    hist: jax.Array  # [B, S] tokens by position: prompt, then generated
    pos: jax.Array  # [B] position of the newest token
    out: jax.Array  # [B, N + K + 1] generated tokens (room for one step past N)
    num_new: jax.Array  # [B]
    done: jax.Array  # [B]
    k: jax.Array  # [B] current draft budget, 1..K
    drafter: object  # drafter state
    key: jax.Array
    passes: jax.Array  # [] target verify passes
    plain_passes: jax.Array  # [] of which one-token steps (no row had a draft)
    row_passes: jax.Array  # [B] verify passes while the row was active
    drafted: jax.Array  # [B] tokens proposed
    accepted: jax.Array  # [B] tokens accepted
    accepted_at: jax.Array  # [K] acceptances at each draft position (summed over rows)
    proposed_at: jax.Array  # [K] proposals at each draft position


def _write_at(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Per-row `buf[b, starts[b]:starts[b] + T] = new[b]` for `buf [B, X]`, `new [B, T]`."""
    return jax.vmap(lambda r, n, s: lax.dynamic_update_slice(r, n, (s,)))(buf, new, starts)


@functools.partial(jax.jit, static_argnames=("family", "cfg", "plan", "drafter"))
def spec_prefill(params, draft_arrays, prompt_buf, prompt_lens, sampling, stop_ids, key, k0, *, family, cfg,
                 plan: ar.Plan, drafter):
    prompt_hidden = getattr(drafter, "PROMPT_HIDDEN", False)
    state, chunks, *hidden = ar.prefill(params, prompt_buf, prompt_lens, sampling, stop_ids, key, family=family,
                                        cfg=cfg, plan=plan, keep_hidden=prompt_hidden)
    b, kmax = plan.batch, drafter.k
    first = state.next_token
    hist = _write_at(prompt_buf, first[:, None], prompt_lens)
    out = jnp.zeros((b, plan.max_new_tokens + kmax + 1), jnp.int32).at[:, 0].set(state.out[:, 0])
    spec = SpecState(
        cache=state.cache, hist=hist, pos=prompt_lens, out=out, num_new=state.num_new, done=state.done,
        k=jnp.full((b,), k0, jnp.int32),
        drafter=drafter.init(draft_arrays, plan, prompt_buf, prompt_lens, *hidden),  # hidden: with PROMPT_HIDDEN
        key=state.key, passes=jnp.zeros((), jnp.int32), plain_passes=jnp.zeros((), jnp.int32),
        row_passes=jnp.zeros((b,), jnp.int32), drafted=jnp.zeros((b,), jnp.int32),
        accepted=jnp.zeros((b,), jnp.int32), accepted_at=jnp.zeros((kmax,), jnp.int32),
        proposed_at=jnp.zeros((kmax,), jnp.int32))
    return spec, chunks


def _advance(s: SpecState, cache, path_tokens, n, nxt, proposed, drafted, stop_ids, *, k, dstate, key) -> SpecState:
    """Bookkeeping shared by chain and tree verification after one target pass.

    path_tokens [B, D]: the accepted tokens d_1..d_n (entries past n are ignored); nxt [B]: the
    target's token after them; proposed [B, D]: draft positions offered (per-position stats);
    drafted [B]: tokens proposed. `cache` must be rolled back already: holding last, d_1..d_n
    for active rows (`keep(s, n)` tokens past `s.cache`), unchanged for finished ones.
    """
    d = path_tokens.shape[1]
    n_max = s.out.shape[1] - s.accepted_at.shape[0] - 1
    steps = jnp.arange(d + 1)
    emitted = jnp.where(steps < n[:, None], jnp.concatenate([path_tokens, path_tokens[:, :1]], axis=1), 0)
    emitted = jnp.where(steps == n[:, None], nxt[:, None], emitted)  # [B, D+1]: d_1..d_n, next
    is_stop = jnp.isin(emitted, stop_ids) & (steps <= n[:, None])
    first_stop = jnp.argmax(is_stop, axis=1)
    count = jnp.where(is_stop.any(axis=1), first_stop + 1, n + 1)
    count = jnp.where(s.done, 0, jnp.minimum(count, n_max - s.num_new))
    out = _write_at(s.out, emitted, s.num_new)
    hist = _write_at(s.hist, emitted, s.pos + 1)
    num_new = s.num_new + count
    done = s.done | is_stop.any(axis=1) | (num_new >= n_max)
    active = ~s.done
    depth = jnp.arange(s.accepted_at.shape[0])
    return SpecState(
        cache=cache, hist=hist, pos=jnp.where(active, s.pos + 1 + n, s.pos), out=out, num_new=num_new,
        done=done, k=jnp.where(active, k, s.k), drafter=dstate, key=key, passes=s.passes + 1,
        plain_passes=s.plain_passes, row_passes=s.row_passes + active,
        drafted=s.drafted + jnp.where(active, drafted, 0), accepted=s.accepted + jnp.where(active, n, 0),
        accepted_at=s.accepted_at + jnp.sum((depth < n[:, None]) & active[:, None], axis=0),
        proposed_at=s.proposed_at + jnp.sum(proposed & active[:, None], axis=0))


def run_if(flag: jax.Array, fn, state):
    """`fn(state)` where the traced bool `flag` holds, else `state`, as a while loop of zero or one trip: a
    `lax.cond` whose branches update the target cache made XLA copy every KV buffer each pass, and a loop
    updates its carry in place (tests/decoding/test_speculative.py checks the compiled program)."""
    return lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros_like(c[0]), fn(c[1])), (flag, state))[1]


def keep(s: SpecState, n: jax.Array) -> jax.Array:
    """Tokens of the verify pass the target cache keeps: last, d_1..d_n for active rows, none for finished ones."""
    return jnp.where(s.done, 0, n + 1)


def _verify_chain_traversal(logits, tokens, n_draft, probs, sampling, key):
    """Traversal Verification of a drafted chain (a tree of width one: sequence-level acceptance, the
    paper's optimal case); probs [B, K, V]: the law each draft was drawn from."""
    k = tokens.shape[1] - 1
    chain = tree.Tree(parents=tuple(range(-1, k)), candidate=(False,) + (True,) * k)
    q = jnp.concatenate([probs, jnp.zeros_like(probs[:, :1])], axis=1)  # [B, K+1, V]: the last node has no child
    n, _, nxt = traversal.verify_traversal(chain, logits, tokens, jnp.arange(k) < n_draft[:, None], sampling, key, q)
    return n, nxt


@functools.partial(jax.jit, static_argnames=("family", "cfg", "drafter", "adaptive", "verifier"),
                   donate_argnames=("state",))
def spec_decode(params, draft_arrays, state: SpecState, sampling: SamplingParams, stop_ids, *, family, cfg, drafter,
                adaptive: bool, verifier: str = "token"):
    """Chain drafts: the drafter proposes up to K tokens, the target verifies K+1 positions."""
    kmax = drafter.k
    steps = jnp.arange(kmax + 1)
    verify_sampled = _verify_chain_traversal if verifier == "traversal" else \
        lambda logits, tokens, *a: verify_sampling(logits, tokens[:, 1:], *a)

    def body(s: SpecState) -> SpecState:
        key, k_draft, k_verify = jax.random.split(s.key, 3)
        drafts, n_draft, probs, dstate = drafter.propose(draft_arrays, s.drafter, s.hist, s.pos, s.k, sampling,
                                                         k_draft)
        n_draft = jnp.where(s.done, 0, jnp.minimum(n_draft, s.k))
        last = jnp.take_along_axis(s.hist, s.pos[:, None], axis=1)  # [B, 1]

        def verify_pass(s: SpecState) -> SpecState:  # score last, d_1..d_K in one forward
            tokens = jnp.concatenate([last, drafts], axis=1)  # [B, K+1]
            positions = s.pos[:, None] + steps
            valid = jnp.broadcast_to(~s.done[:, None], tokens.shape)
            logits, cache, trace = family.forward(params, cfg, tokens, positions, s.cache, valid=valid, trace=True)
            q = jax.nn.one_hot(drafts, logits.shape[-1], dtype=jnp.float32) if probs is None else probs
            n, nxt = lax.cond(sampling.temperature > 0,
                              lambda: verify_sampled(logits, tokens, n_draft, q, sampling, k_verify),
                              lambda: verify_greedy(logits, drafts, n_draft))
            k = s.k
            if adaptive:  # grow on full acceptance, shrink on a rejection
                k = jnp.where(n >= n_draft, jnp.minimum(k + 1, kmax), jnp.maximum(k - 1, 1))
            proposed = jnp.arange(kmax) < n_draft[:, None]
            cache = family.rollback(params, cfg, s.cache, cache, trace, keep(s, n))
            return _advance(s, cache, drafts, n, nxt, proposed, n_draft, stop_ids, k=k, dstate=dstate, key=key)

        def plain_step(s: SpecState) -> SpecState:  # no row drafted: the AR step, one token per row
            logits, cache, trace = family.forward(params, cfg, last, s.pos[:, None], s.cache,
                                                  valid=~s.done[:, None], trace=True)  # [B, 1, V]
            none, zero = drafts[:, :0], jnp.zeros_like(n_draft)  # every lossless rule samples the target here
            n, nxt = lax.cond(sampling.temperature > 0,
                              lambda: verify_sampling(logits, none, zero, jnp.zeros((*none.shape, logits.shape[-1])),
                                                      sampling, k_verify),
                              lambda: verify_greedy(logits, none, zero))
            k = jnp.minimum(s.k + 1, kmax) if adaptive else s.k  # nothing drafted, nothing rejected: as a full
            cache = family.rollback(params, cfg, s.cache, cache, trace, keep(s, n))  # acceptance
            s = _advance(s, cache, drafts[:, :1], n, nxt, jnp.zeros((n.shape[0], kmax), bool), zero, stop_ids,
                         k=k, dstate=dstate, key=key)  # (n = 0: the path token is ignored)
            return dataclasses.replace(s, plain_passes=s.plain_passes + 1)

        drafted = jnp.any(n_draft > 0)
        return run_if(~drafted, plain_step, run_if(drafted, verify_pass, s))

    return lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


@functools.partial(jax.jit, static_argnames=("family", "cfg", "drafter", "adaptive", "verifier"),
                   donate_argnames=("state",))
def tree_decode(params, draft_arrays, state: SpecState, sampling: SamplingParams, stop_ids, *, family, cfg, drafter,
                adaptive: bool = False, verifier: str = "token"):
    """Tree drafts: the drafter fills the static `drafter.tree`; the target scores every node in one pass
    (tree attention mask, position = pos + depth), the accepted root-to-node path is kept and its K/V
    moved to consecutive slots. `adaptive` is unused (the tree shape is static)."""
    tr = drafter.tree
    depth = jnp.asarray(tr.depth, jnp.int32)  # [T+1]
    mask = jnp.asarray(tr.mask)  # [T+1, T+1]
    uses_hidden = getattr(drafter, "USES_HIDDEN", False)
    verify_sampled = traversal.verify_traversal if verifier == "traversal" else tree.verify_sampling

    def body(s: SpecState) -> SpecState:
        key, k_draft, k_verify = jax.random.split(s.key, 3)
        nodes, node_valid, dstate = drafter.propose(draft_arrays, s.drafter, s.hist, s.pos, sampling, k_draft)
        node_valid &= ~s.done[:, None]  # [B, T]
        last = jnp.take_along_axis(s.hist, s.pos[:, None], axis=1)  # [B, 1]
        tokens = jnp.concatenate([last, nodes], axis=1)  # [B, T+1]
        b, t = tokens.shape
        valid = jnp.broadcast_to(~s.done[:, None], tokens.shape)
        args = (params, cfg, tokens, s.pos[:, None] + depth, s.cache)
        kwargs = dict(valid=valid, tree_mask=jnp.broadcast_to(mask, (b, t, t)))
        hidden = None
        if uses_hidden:  # the drafter reads the target's hidden states: the same pass, split at the LM head
            hidden, cache = family.hidden_states(*args, **kwargs)  # [B, T+1, D]
            logits = family.lm_head(params, cfg, hidden)
        else:
            logits, cache = family.forward(*args, **kwargs)  # [B, T+1, V]
        n, path, nxt = lax.cond(sampling.temperature > 0,
                                lambda: verify_sampled(tr, logits, tokens, node_valid, sampling, k_verify),
                                lambda: tree.verify_greedy(tr, logits, tokens, node_valid))
        dstate = drafter.observe(dstate, logits, s.pos, n, path, hidden)
        cache = family.rollback(params, cfg, s.cache, tree.compact(cache, s.pos, path), None, keep(s, n))
        path_tokens = jnp.take_along_axis(tokens, path, axis=1)  # [B, D]
        proposed = tree.offered_by_depth(tr, node_valid)
        drafted = jnp.sum(node_valid & jnp.asarray(tr.candidate[1:]), axis=1)
        return _advance(s, cache, path_tokens, n, nxt, proposed, drafted, stop_ids, k=s.k, dstate=dstate, key=key)

    return lax.while_loop(lambda s: ~jnp.all(s.done), body, state)


def generate(model, prompts: list[list[int]], *, drafter, adaptive: bool = False, k_init: int | None = None,
             verifier: str = "token", **options) -> GenerationResult:
    """Speculative generation with `drafter` (see `drafters.py`); options as `pdx.decoding.ar.generate`.

    adaptive: grow the per-row draft budget on full acceptance and shrink it on a rejection
    (within the drafter's static K; changing it never recompiles). k_init: the starting budget.
    A drafter of `KIND` "tree" runs the tree loop (`tree_decode`) over its static `tree`; its K is the tree depth.
    verifier: how sampled drafts are accepted, "token" or "traversal" (`VERIFIERS`; both lossless).
    """
    kmax = drafter.k
    is_tree = drafter.KIND == "tree"
    require(verifier in VERIFIERS, f"verifier must be one of {list(VERIFIERS)}, got {verifier!r}")
    require(not (is_tree and adaptive), "adaptive draft length applies to chain drafters only (tree shapes are static)")
    needs = drafters.TREE_NEEDS if is_tree else protocol.Needs()
    if getattr(drafter, "USES_HIDDEN", False):
        needs = dataclasses.replace(needs, hidden_states=True)
    protocol.check(model.family, model.cfg, needs, "tree verification" if is_tree else "speculative decoding")
    require(isinstance(kmax, int) and kmax >= 1, f"draft length K must be an int >= 1, got {kmax!r}")
    k0 = kmax if k_init is None else k_init
    require(1 <= k0 <= kmax, f"k_init must be in [1, K={kmax}], got {k0}")
    require(options.get("repetition_penalty", 1.0) == 1.0, "speculative decoding does not support repetition_penalty")
    draft_cfg = drafter.cfg
    if draft_cfg is not None:
        require(draft_cfg.vocab_size == model.cfg.vocab_size,
                f"the draft model's vocabulary ({draft_cfg.vocab_size}) differs from the target's "
                f"({model.cfg.vocab_size}); speculative decoding needs a shared vocabulary")
    packable = ar.packs(model.family, model.cfg) and (draft_cfg is None or ar.packs(drafter.family, draft_cfg)) \
        and not getattr(drafter, "PROMPT_HIDDEN", False)  # a packed prefill keeps no per-row hidden states
    req = ar.make_request(model, prompts, options, step_tokens=(drafter.tree.size if is_tree else kmax) + 2,
                          packable=packable)
    statics = {"family": model.family, "cfg": model.cfg, "drafter": drafter}
    arrays = drafter.arrays(model)
    t0 = time.perf_counter()
    (state, chunks), c1 = compiled.run(spec_prefill, statics | {"plan": req.plan}, model.params, arrays,
                                       req.prompt_buf, req.prompt_lens, req.sampling, req.stop_ids, req.key,
                                       jnp.int32(k0))
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    decode = tree_decode if is_tree else spec_decode
    state, c2 = compiled.run(decode, statics | {"adaptive": adaptive, "verifier": verifier}, model.params, arrays,
                             state, req.sampling, req.stop_ids)
    s = jax.device_get(state)
    t2 = time.perf_counter()
    n, n_max = len(prompts), req.plan.max_new_tokens
    lengths = s.num_new[:n]
    tokens = np.where(np.arange(n_max)[None] < lengths[:, None], s.out[:n, :n_max], 0)
    decode_s = t2 - t1 - c2
    new_tokens = int(lengths.sum())
    stats = {"forward_passes": int(chunks) + int(s.passes), "target_passes": int(s.passes),
             "one_token_passes": int(s.plain_passes),
             "prefill_s": t1 - t0 - c1, "decode_s": decode_s, "compile_s": c1 + c2, "new_tokens": new_tokens,
             "drafted": int(s.drafted[:n].sum()), "accepted": int(s.accepted[:n].sum()),
             "accepted_per_pass": float(s.accepted[:n].sum() / max(int(s.row_passes[:n].sum()), 1)),
             "tokens_per_pass": float((new_tokens - n) / max(int(s.row_passes[:n].sum()), 1)),
             "acceptance_by_position": [float(a / p) if p else 0.0 for a, p in zip(s.accepted_at, s.proposed_at)],
             "accepted_at": s.accepted_at.tolist(), "proposed_at": s.proposed_at.tolist(),
             "row_passes": int(s.row_passes[:n].sum()),
             "tokens_per_s": (new_tokens - n) / decode_s if decode_s > 0 else 0.0, "batch_bucket": req.plan.batch}
    return GenerationResult(tokens=tokens, lengths=lengths, stats=stats)
