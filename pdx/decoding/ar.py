"""Autoregressive decoding: chunked prefill, then one jitted `lax.while_loop` over new tokens.

Shapes are bucketed so prompts of similar length share one compiled program:
  * batch B is padded up to a power of two (1, 2, 4, 8, ...); padding rows are discarded;
  * the cache has S slots, S = round_up(longest prompt + max_new_tokens + prefill_chunk, 256) (a
    one-pass prefill needs no chunk's room: one slot, or a verify step's K+1);
    prompts live right-padded in a [B, S] buffer and are prefilled `prefill_chunk` tokens at a
    time by a loop whose trip count is traced, so the prompt length itself is never a shape;
  * by default the chunk (16, 32, ..., 512 tokens) is the one that computes the fewest padded rows
    (`default_chunk`: one prompt takes the smallest chunk holding it, a batch of uneven prompts
    smaller chunks), and a prompt that fits one chunk is prefilled in one pass with no loop
    (`Plan.single_pass`);
  * a batch of uneven prompts on a model that packs (`cache_rows`, with a fast packed attention)
    is prefilled in one pass over all its prompts packed end to end (`Plan.packed`: the prompts'
    total rounded up to 128 rows, not batch x longest), when that computes fewer rows.
Everything else (prompt content, temperature, top-k/p, min-p, penalty, seed, stop ids, the
number of steps to run) is traced. Finished rows stay in the batch, frozen: they neither write
new tokens nor advance their cache.

`generate` runs prefill, then decode to the end; `stream` runs the same compiled decode program a
few steps at a time and yields text as it is produced.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pdx.decoding import compiled, registry
from pdx.decoding.result import GenerationResult
from pdx.decoding.sampling import SamplingParams, check_token_ids, choose
from pdx.errors import InvalidInputError, require
from pdx.kernels_pallas import attend
from pdx.models import protocol
from pdx.models.layers import last_valid

MAX_STOP_IDS = 8  # stop ids are a fixed-size traced array, padded with -1
SLOT_BUCKET = 256
CHUNK_BUCKETS = (16, 32, 64, 128, 256, 512)  # the prefill chunks `default_chunk` picks from


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Carry of the decode loop; every field has a static shape."""

    cache: object  # the model family's cache (KVCache, Mamba state, ...)
    next_token: jax.Array  # [B] token to feed at the next step (already in `out`)
    out: jax.Array  # [B, N] generated tokens
    num_new: jax.Array  # [B] tokens generated so far (stop token included)
    done: jax.Array  # [B] row finished (stop token or length)
    seen: jax.Array  # [B, V] tokens present in prompt or output (repetition penalty)
    step: jax.Array  # [] decode steps run so far (= forward passes after prefill)
    key: jax.Array  # PRNG key


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shapes of one generate call (the compile key besides the model config)."""

    batch: int  # padded batch
    slots: int  # cache length S
    max_new_tokens: int
    prefill_chunk: int
    single_pass: bool = False  # the longest prompt fits one chunk: prefill is one forward, no loop
    packed: bool = False  # one forward over the prompts packed end to end, `prefill_chunk` tokens wide


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# A prefill pass of fewer rows (batch x chunk) than this costs about as much as one of this many: below
# it XLA CPU's GEMM is short of rows (SmolLM2 bf16, one 125-token prompt: 4 x 32 tokens 0.22 s, 1 x 128
# tokens 0.12 s).
PASS_MIN_ROWS = 256


PACK_BUCKET = 128  # a packed prefill's width is the prompts' total rounded up to this
MAX_PACKED = 4096  # widest packed prefill (one pass: its activations grow with it)


def _chunked_rows(batch: int, longest: int, chunk: int) -> int:
    """Rows a chunked prefill computes, a pass counted as at least `PASS_MIN_ROWS`."""
    return (_round_up(longest, chunk) // chunk) * max(batch * chunk, PASS_MIN_ROWS)


def packs(family, cfg) -> bool:
    """Whether the model prefills packed prompts fast: its family honours `cache_rows` and the packed
    attention runs a kernel on this backend (its jnp spec gathers a cache row per token)."""
    return "cache_rows" in family.capabilities(cfg).extras and attend.packed_is_fast(cfg.head_dim)


def default_chunk(batch: int, longest: int) -> int:
    """The `CHUNK_BUCKETS` chunk that prefills `batch` rows of up to `longest` tokens for the fewest
    computed rows, each pass counted as at least `PASS_MIN_ROWS` (ties: fewer passes). One prompt takes
    the smallest chunk holding it; 16 prompts of up to 160 tokens take 5 x 32 (2560 rows: 1.8x faster
    than 1 x 256, whose 4096 rows are mostly padding)."""
    return min(CHUNK_BUCKETS, key=lambda c: (_chunked_rows(batch, longest, c), _round_up(longest, c) // c))


def make_plan(cfg, prompts: list[list[int]], max_new_tokens: int, prefill_chunk: int | None,
              max_len: int | None = None, step_tokens: int = 1, packable: bool = False) -> Plan:
    """Validate the request at the API edge and pick the shape bucket.

    prefill_chunk: tokens per prefill pass; None: `default_chunk`, or with `packable` (see `packs`)
    one packed pass where that computes no more rows (a 1.3x faster pass than a loop's).

    step_tokens: most tokens one decode step writes past the last one (speculative verify: K+1);
    the cache keeps that much room beyond the longest prompt + max_new_tokens.
    """
    check_token_ids(prompts, cfg.vocab_size)
    require(isinstance(max_new_tokens, int) and max_new_tokens >= 1,
            f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    longest = max(len(p) for p in prompts)
    batch = 1 << (len(prompts) - 1).bit_length()
    packed = False
    if prefill_chunk is None:
        prefill_chunk = default_chunk(batch, longest)
        width = _round_up(sum(len(p) for p in prompts), PACK_BUCKET)
        if packable and len(prompts) > 1 and width <= MAX_PACKED \
                and max(width, PASS_MIN_ROWS) <= _chunked_rows(batch, longest, prefill_chunk):
            prefill_chunk, packed = width, True
    require(isinstance(prefill_chunk, int) and prefill_chunk >= 1, f"prefill_chunk must be >= 1, got {prefill_chunk}")
    single_pass = packed or longest <= prefill_chunk
    # Room past the text: a looped chunk's writes and prompt slice may run a chunk past the longest
    # prompt; one pass only reads the first chunk of the prompt buffer; a packed one writes the text only.
    room = step_tokens if single_pass else max(prefill_chunk, step_tokens)
    needed = longest + max_new_tokens + room if packed else max(longest + max_new_tokens + room, prefill_chunk)
    slots = max_len if max_len is not None else _round_up(needed, SLOT_BUCKET)
    if slots < needed:
        raise InvalidInputError(
            f"the cache holds {slots} positions but the prompt ({longest} tokens) + max_new_tokens "
            f"({max_new_tokens}) + room for a prefill chunk or verify step ({room}), at least one prefill "
            f"chunk ({prefill_chunk}), need {needed}; raise max_len or shorten them")
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise InvalidInputError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{cfg.max_position_embeddings} positions")
    return Plan(batch=batch, slots=slots, max_new_tokens=max_new_tokens,
                prefill_chunk=prefill_chunk, single_pass=single_pass, packed=packed)


def stop_array(stop_token_ids) -> jax.Array:
    ids = list(stop_token_ids)
    require(len(ids) <= MAX_STOP_IDS, f"at most {MAX_STOP_IDS} stop token ids are supported, got {len(ids)}")
    return jnp.asarray(ids + [-1] * (MAX_STOP_IDS - len(ids)), jnp.int32)


def prefill_cache(family, params, cfg, plan: Plan, prompt_buf, prompt_lens, keep_hidden: bool = False):
    """A fresh cache holding the prompts, and the logits `[B, V]` after each row's last prompt token.

    Runs `prefill_chunk` tokens at a time with a traced trip count (the longest prompt's chunks), or
    one pass outside any loop when the plan is `single_pass`: XLA CPU ran a one-chunk loop 1.3x slower
    than the same forward unlooped (SmolLM2 bf16, 128 tokens: 0.155 vs 0.118 s); a `packed` plan's one
    pass runs every prompt end to end in a single sequence (`forward(..., cache_rows=)`).
    keep_hidden (static; a family with `hidden_states`, a plan that is not packed): also return the final
    hidden states `[B, S, D]` (fp32) at every prompt position, from the same passes split at the LM head
    (a drafter with layers of its own, Clover's augmenting block, prefills them from these).
    """
    b, c = plan.batch, plan.prefill_chunk
    cache = protocol.new_cache(family, params, cfg, b, plan.slots, jnp.float32)
    require(not (keep_hidden and plan.packed), "a packed prefill keeps no per-row hidden states")
    if plan.packed:
        tokens, positions, rows = _pack(prompt_buf, prompt_lens, c)
        logits, cache = family.forward(params, cfg, tokens, positions, cache, valid=rows >= 0, cache_rows=rows,
                                       logits="last")
        return cache, logits[:, 0], jnp.int32(1)

    def chunk(i, carry):
        cache, last_logits, *hidden = carry  # hidden: [] or [[B, S, D]]
        start = i * c
        tokens = lax.dynamic_slice_in_dim(prompt_buf, start, c, axis=1)  # [B, C]
        positions = start + jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
        valid = positions < prompt_lens[:, None]
        last = prompt_lens - 1 - start  # index of each row's last prompt token within this chunk
        here = (last >= 0) & (last < c)
        # Logits at each row's last valid token of the chunk only (the LM head on every position
        # was a fifth of a SmolLM2 prefill's FLOPs; SambaY also skips its cross-decoder there).
        if keep_hidden:  # the same pass as forward(logits="last"), split at the LM head
            x, cache = family.hidden_states(params, cfg, tokens, positions, cache, valid=valid)  # [B, C, D]
            logits = family.lm_head(params, cfg, last_valid(x, valid))
            hidden = [lax.dynamic_update_slice_in_dim(hidden[0], x.astype(jnp.float32), start, axis=1)]
        else:
            logits, cache = family.forward(params, cfg, tokens, positions, cache, valid=valid, logits="last")
        picked = logits[:, 0]  # [B, V]
        return (cache, jnp.where(here[:, None], picked, last_logits), *hidden)

    hidden = [jnp.zeros((b, prompt_buf.shape[1], cfg.hidden_size), jnp.float32)] if keep_hidden else []
    init = (cache, jnp.zeros((b, cfg.vocab_size), jnp.float32), *hidden)
    if plan.single_pass:
        num_chunks = jnp.int32(1)
        cache, logits, *hidden = chunk(0, init)
    else:
        num_chunks = (jnp.max(prompt_lens) + c - 1) // c
        cache, logits, *hidden = lax.fori_loop(0, num_chunks, chunk, init)
    return (cache, logits, num_chunks, *hidden)  # hidden: with keep_hidden only


def _pack(prompt_buf, prompt_lens, width: int):
    """The rows' prompts end to end in one sequence: tokens, positions and cache rows `[1, width]`
    (row -1 past the last prompt)."""
    ends = jnp.cumsum(prompt_lens)  # [B]
    t = jnp.arange(width, dtype=jnp.int32)
    row = jnp.searchsorted(ends, t, side="right").astype(jnp.int32)  # the first row ending past t
    inside = t < ends[-1]
    r = jnp.minimum(row, prompt_lens.shape[0] - 1)
    pos = jnp.where(inside, t - (ends[r] - prompt_lens[r]), 0)
    tokens = jnp.where(inside, prompt_buf[r, pos], 0)
    return tokens[None], pos[None], jnp.where(inside, row, -1)[None]


@functools.partial(jax.jit, static_argnames=("family", "cfg", "plan", "keep_hidden"))
def prefill(params, prompt_buf, prompt_lens, sampling: SamplingParams, stop_ids, key, *, family, cfg, plan: Plan,
            keep_hidden: bool = False):
    """Run the prompts through the model chunk by chunk and choose the first new token.

    prompt_buf: [B, S] right-padded prompts; prompt_lens: [B] (0 for batch-padding rows). Returns
    (state, prefill passes), and with `keep_hidden` the prompt's hidden states `[B, S, D]` too
    (`prefill_cache`).
    """
    b, vocab = plan.batch, cfg.vocab_size
    cache, logits, num_chunks, *hidden = prefill_cache(family, params, cfg, plan, prompt_buf, prompt_lens,
                                                       keep_hidden)
    in_prompt = jnp.arange(plan.slots)[None] < prompt_lens[:, None]
    seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], prompt_buf].max(in_prompt)
    key, sub = jax.random.split(key)
    first = choose(logits, sub, sampling, seen)
    active = prompt_lens > 0
    out = jnp.zeros((b, plan.max_new_tokens), jnp.int32).at[:, 0].set(jnp.where(active, first, 0))
    done = ~active | jnp.isin(first, stop_ids) | (plan.max_new_tokens == 1)
    seen = seen.at[jnp.arange(b), first].set(True)
    state = DecodeState(cache=cache, next_token=first, out=out, num_new=active.astype(jnp.int32), done=done,
                        seen=seen, step=jnp.zeros((), jnp.int32), key=key)
    return (state, num_chunks, *hidden)


@functools.partial(jax.jit, static_argnames=("family", "cfg"), donate_argnames=("state",))
def decode(params, state: DecodeState, sampling: SamplingParams, stop_ids, until, *, family, cfg):
    """Advance every unfinished row until `until` tokens are generated or all rows are done."""
    b, n = state.out.shape

    def cond(s):
        return (s.step + 1 < until) & ~jnp.all(s.done)

    def body(s):
        positions = s.cache.lengths[:, None]  # [B, 1]: slot s holds position s
        logits, cache = family.forward(params, cfg, s.next_token[:, None], positions, s.cache, valid=~s.done[:, None])
        key, sub = jax.random.split(s.key)
        tok = choose(logits[:, 0], sub, sampling, s.seen)
        tok = jnp.where(s.done, 0, tok)
        out = lax.dynamic_update_slice(s.out, tok[:, None], (0, s.step + 1))
        num_new = s.num_new + (~s.done).astype(jnp.int32)
        done = s.done | jnp.isin(tok, stop_ids) | (num_new >= n)
        seen = s.seen.at[jnp.arange(b), tok].max(~s.done)
        return DecodeState(cache=cache, next_token=tok, out=out, num_new=num_new, done=done, seen=seen,
                           step=s.step + 1, key=key)

    return lax.while_loop(cond, body, state)


OPTIONS = {"max_new_tokens": 128, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
           "repetition_penalty": 1.0, "stop_token_ids": None, "seed": 0, "prefill_chunk": None, "max_len": None}


@dataclasses.dataclass
class Request:
    """A validated generate call: its shape plan and the device inputs."""

    plan: Plan
    sampling: SamplingParams
    stop_ids: jax.Array  # [MAX_STOP_IDS]
    prompt_buf: jax.Array  # [B, S] right-padded prompts
    prompt_lens: jax.Array  # [B]
    key: jax.Array


def make_request(model, prompts: list[list[int]], options: dict, step_tokens: int = 1,
                 packable: bool = False) -> Request:
    """Validate `options` (names and defaults of `OPTIONS`) and the prompts, and lay out the inputs
    (`packable`: a packed prefill may be planned, see `make_plan`)."""
    unknown = set(options) - set(OPTIONS)
    require(not unknown, f"unknown options: {sorted(unknown)}; known: {sorted(OPTIONS)}")
    o = OPTIONS | options
    plan = make_plan(model.cfg, prompts, o["max_new_tokens"], o["prefill_chunk"], o["max_len"], step_tokens, packable)
    sampling = SamplingParams.create(o["temperature"], o["top_k"], o["top_p"], o["min_p"], o["repetition_penalty"])
    stops = model.cfg.eos_token_ids if o["stop_token_ids"] is None else o["stop_token_ids"]
    buf = np.zeros((plan.batch, plan.slots), np.int32)
    lens = np.zeros((plan.batch,), np.int32)
    for i, ids in enumerate(prompts):
        buf[i, : len(ids)] = ids
        lens[i] = len(ids)
    return Request(plan, sampling, stop_array(stops), jnp.asarray(buf), jnp.asarray(lens),
                   jax.random.PRNGKey(o["seed"]))


@registry.strategy("ar")
def generate(model, prompts: list[list[int]], **options) -> GenerationResult:
    """Generate up to `max_new_tokens` for each prompt (a list of token-id lists).

    Options (defaults in `OPTIONS`): max_new_tokens=128, temperature=0 (greedy), top_k=0, top_p=1,
    min_p=0, repetition_penalty=1, stop_token_ids=None (the model's EOS ids; [] never stops early),
    seed=0, prefill_chunk=None (`default_chunk`), max_len=None (cache slots; default
    from the bucket rule). Returns
    tokens `[B, max_new_tokens]`, per-row lengths and stats: forward_passes, prefill_s, decode_s
    (compile time excluded, reported as `compile_s`), tokens_per_s (decode only).
    """
    req = make_request(model, prompts, options, packable=packs(model.family, model.cfg))
    plan = req.plan
    statics = {"family": model.family, "cfg": model.cfg}
    t0 = time.perf_counter()
    (state, chunks), compile_prefill = compiled.run(prefill, statics | {"plan": plan}, model.params, req.prompt_buf,
                                                    req.prompt_lens, req.sampling, req.stop_ids, req.key)
    jax.block_until_ready(state)
    t1 = time.perf_counter()
    state, compile_decode = compiled.run(decode, statics, model.params, state, req.sampling, req.stop_ids,
                                         jnp.int32(plan.max_new_tokens))
    out, num_new, steps = jax.device_get((state.out, state.num_new, state.step))
    t2 = time.perf_counter()
    n = len(prompts)
    new_tokens = int(num_new[:n].sum())
    prefill_s, decode_s = t1 - t0 - compile_prefill, t2 - t1 - compile_decode
    stats = {"forward_passes": int(chunks) + int(steps), "prefill_chunks": int(chunks), "decode_steps": int(steps),
             "prefill_s": prefill_s, "decode_s": decode_s, "compile_s": compile_prefill + compile_decode,
             "new_tokens": new_tokens, "batch_bucket": plan.batch,
             "cache_slots": plan.slots, "prompt_tokens": int(sum(len(p) for p in prompts)),
             "tokens_per_s": (new_tokens - n) / decode_s if decode_s > 0 else 0.0}
    return GenerationResult(tokens=out[:n], lengths=num_new[:n], stats=stats)


def stream(model, prompt: list[int], *, steps_per_chunk: int = 8, **options) -> Iterator[str]:
    """Yield the decoded text of one prompt piece by piece as it is generated.

    Runs the same compiled decode program as `generate`, `steps_per_chunk` tokens per call, so the
    per-token path stays on device; only the new tokens cross to the host between chunks.
    """
    require(steps_per_chunk >= 1, f"steps_per_chunk must be >= 1, got {steps_per_chunk}")
    registry.check("ar", model, options)
    require(model.tokenizer is not None, "streaming text needs a model with a tokenizer")
    req = make_request(model, [prompt], options)
    plan, sampling, stops = req.plan, req.sampling, req.stop_ids
    statics = {"family": model.family, "cfg": model.cfg}
    (state, _), _ = compiled.run(prefill, statics | {"plan": plan}, model.params, req.prompt_buf, req.prompt_lens,
                                 sampling, stops, req.key)
    stop_set = {int(s) for s in stops if s >= 0}
    text = ""
    while True:
        n_done = int(state.num_new[0])
        ids = np.asarray(state.out[0, :n_done]).tolist()
        if ids and ids[-1] in stop_set:
            ids = ids[:-1]  # do not print the stop token
        full = model.tokenizer.decode(ids)
        if not full.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
            yield full[len(text):]
            text = full
        if bool(state.done[0]) or n_done >= plan.max_new_tokens:
            break
        state, _ = compiled.run(decode, statics, model.params, state, sampling, stops,
                                jnp.int32(n_done + steps_per_chunk))
