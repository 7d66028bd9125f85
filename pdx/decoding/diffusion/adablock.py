"""AdaBlock-dLLM (Lu et al. 2025, "Semantic-Aware Diffusion LLM Inference via Adaptive Block Size"):
each block ends where the model places a confident delimiter, not on a fixed grid.

At a block's first step (the authors' `compute_block_length`, from the same pass that makes that
step's commits): among the next W = G / 4 slots (G the answer length), those whose candidate is a
delimiter; the most confident of them (the first on ties) ends the block, itself included, if its
confidence is >= `delimiter_threshold`; otherwise the block is `block_size` slots. Inside a block,
Fast-dLLM's threshold rule commits, as in the authors' code.

Design (static shapes, batches): blocks are per row, so a row's block boundaries are its own whatever
else is in the batch; the loop keeps each row's block start, end and step. Every step reads the A =
max(W, block_size) slots from each row's block start (gathered per row). With a prefix or dual cache a
row refreshes its cache at its own block starts: a step where some rows start a block and others do not
runs the full pass and the cached pass and keeps, per row, the one that row needs (the cost of batching
rows whose blocks do not line up; a step where all or none start runs one pass). The dual cache's
window is the A slots from the block start (their keys fresh, the suffix after them cached), so the
slots between a short block's end and A are read fresh rather than from the refresh pass as in the
authors' code, which feeds the block alone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pdx.decoding import registry
from pdx.decoding.diffusion import core, policies
from pdx.decoding.result import GenerationResult
from pdx.errors import require
from pdx.masks import BIDIRECTIONAL
from pdx.models import protocol

SCAN = 0.25  # the share of the answer length scanned for a delimiter at a block's start


@dataclasses.dataclass(frozen=True)
class AdaBlock:
    """The static part of the rule: the delimiter ids and the scan width W (knobs: `threshold`,
    `delimiter_threshold`)."""

    delimiters: tuple[int, ...]
    scan: int

    def block_length(self, x0, conf, scan, knobs, default):
        """Slots of each row's new block `[B]`: up to its most confident delimiter among `scan [B, A]`,
        else `default [B]`."""
        found = scan & jnp.isin(x0, jnp.asarray(self.delimiters, jnp.int32))  # [B, A]
        score = jnp.where(found, conf, -jnp.inf)
        best = jnp.argmax(score, axis=-1)  # the first of equals
        ok = jnp.max(score, axis=-1) >= knobs["delimiter_threshold"]
        return jnp.where(ok, best + 1, default)


def _rows(a, starts, n: int):
    """`a [R, W, ...]` sliced per row: columns starts[r] .. starts[r] + n - 1 (within a's width)."""
    idx = starts[:, None] + jnp.arange(n)  # [R, n]
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def _select_rows(pick, new, old):
    """Per cache row, `new` where `pick [R]` else `old` (k/v rows sit on axis 0 per layer, 1 stacked)."""
    axis = 0 if new.per_layer else 1

    def choose(n, o):
        shape = [1] * n.ndim
        shape[axis] = -1
        return jnp.where(pick.reshape(shape), n, o)

    return dataclasses.replace(new, k=jax.tree.map(choose, new.k, old.k), v=jax.tree.map(choose, new.v, old.v))


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def decode(params, x, valid, prompt, key, knobs, *, cfg, spec: core.Spec):
    """`core.decode`'s contract with row-wise adaptive blocks; also returns block_ends [B, G] (True at
    each block's last slot)."""
    b, w = x.shape
    p, g, a, shift = spec.prompt_width, spec.gen_length, spec.ahead, spec.logit_shift
    mask_id, rule = cfg.mask_token_id, spec.policy
    guide = 2 if spec.guidance else 1
    n = (g if spec.cache == "prefix" else a) + shift  # a cached pass's window
    slots = p + g + n
    cols, row = jnp.arange(a), jnp.arange(b)[:, None]
    cache = None if spec.cache == "none" else protocol.new_cache(spec.family, params, cfg, guide * b, slots,
                                                                 params["embed"].dtype)

    def full_pass(xin, vin, cache, starts):
        r = xin.shape[0]
        if cache is not None:
            cache = dataclasses.replace(cache, lengths=jnp.zeros((r,), jnp.int32))
        logits, cache = spec.family.forward(params, cfg, xin, jnp.broadcast_to(jnp.arange(w), xin.shape), cache,
                                            mask_mode=BIDIRECTIONAL, valid=vin, refill=cache is not None)
        return _rows(jnp.pad(logits, ((0, 0), (0, a), (0, 0))), starts - shift, a), cache

    def cached_pass(xin, vin, cache, starts):
        lo = starts - shift  # [R]
        tokens, tok_valid = _rows(jnp.pad(xin, ((0, 0), (0, n))), lo, n), _rows(jnp.pad(vin, ((0, 0), (0, n))), lo, n)
        seen = jnp.arange(slots)[None] < lo[:, None]  # [R, S]
        if spec.cache == "dual":
            seen |= jnp.arange(slots)[None] >= (lo + n)[:, None]
        slot_valid = jnp.pad(vin, ((0, 0), (0, slots - w)))
        logits, cache = spec.family.forward(params, cfg, tokens, lo[:, None] + jnp.arange(n), dataclasses.replace(
            cache, lengths=lo), mask_mode=BIDIRECTIONAL, valid=tok_valid, cache_visible=slot_valid & seen)
        return logits[:, :a], cache

    def both(xin, vin, cache, starts, refresh):
        fresh, fresh_cache = full_pass(xin, vin, cache, starts)
        kept, kept_cache = cached_pass(xin, vin, cache, starts)
        return jnp.where(refresh[:, None, None], fresh, kept), _select_rows(refresh, fresh_cache, kept_cache)

    def body(c):
        start, active = c["start"], c["active"]
        xin, vin = core.model_inputs(spec, c["x"], valid, prompt, mask_id)
        starts = jnp.tile(start, guide)
        if cache is None:
            logits, new_cache = full_pass(xin, vin, None, starts)
        else:
            refresh = jnp.tile((c["step"] == 0) & active, guide)  # rows starting a block
            idle = jnp.tile(~active, guide)
            which = jnp.where(jnp.all(refresh | idle), 0, jnp.where(jnp.any(refresh), 2, 1))
            logits, new_cache = lax.switch(which, [
                lambda: full_pass(xin, vin, c["cache"], starts), lambda: cached_pass(xin, vin, c["cache"], starts),
                lambda: both(xin, vin, c["cache"], starts, refresh)])
        logits = core.guided(spec, logits, knobs)  # [B, A, V]
        xp = jnp.pad(c["x"], ((0, 0), (0, a)))
        span = _rows(xp, start, a)  # [B, A]
        inside = start[:, None] + cols < w
        ahead = (span == mask_id) & inside & active[:, None]
        logits, x0, conf, noise = core.candidates(spec, logits, ahead, jax.random.fold_in(key, c["t"]), knobs,
                                                  mask_id)
        first = c["step"] == 0  # [B]: the row's block starts here
        length = rule.block_length(x0, conf, ahead & (cols < rule.scan), knobs,
                                   jnp.minimum(spec.block_size, w - start))
        end = jnp.where(first, start + length, c["end"])
        masked = ahead & (cols < (end - start)[:, None])
        decoded = jnp.mean(c["x"][:, p:] != mask_id, axis=1, dtype=jnp.float32)
        ctx = policies.StepContext(logits, x0, jnp.where(masked, conf, -jnp.inf), masked, c["step"], noise,
                                   decoded, ahead, c["t"])
        commit = policies.Threshold().commit(ctx, knobs) & masked
        xs = xp.at[row, start[:, None] + cols].set(jnp.where(commit, x0, span))[:, :w]
        steps_pad = jnp.pad(c["commit_step"], ((0, 0), (0, a)))
        commit_step = steps_pad.at[row, start[:, None] - p + cols].set(
            jnp.where(commit, c["t"], _rows(steps_pad, start - p, a)))[:, :g]
        ends = c["block_ends"].at[row[:, 0], end - 1 - p].max(first & active, mode="drop")
        gen = xs[:, p:]
        done = c["done"] | spec.stop(gen, mask_id, cfg.eos_token_ids) | ~jnp.any(gen == mask_id, axis=-1)
        block_done = ~jnp.any(masked & ~commit, axis=-1)
        start = jnp.where(block_done & active, end, start)
        return dict(
            x=xs, cache=new_cache, done=done, commit_step=commit_step, block_ends=ends, end=end, start=start,
            active=~done & (start < w), step=jnp.where(block_done, 0, c["step"] + 1),
            committed=c["committed"].at[:, c["t"]].set(commit.sum(-1, dtype=jnp.int32)),
            row_nfe=c["row_nfe"] + jnp.any(masked, -1).astype(jnp.int32), t=c["t"] + 1)

    def cond(c):
        return jnp.any(c["active"]) & (c["t"] < g)

    zeros = jnp.zeros((b,), jnp.int32)
    init = dict(x=x, cache=cache, done=jnp.zeros((b,), bool), commit_step=jnp.full((b, g), -1, jnp.int32),
                block_ends=jnp.zeros((b, g), bool), start=zeros + p, end=zeros + p, active=jnp.ones((b,), bool),
                step=zeros, committed=jnp.zeros((b, g), jnp.int32), row_nfe=zeros, t=jnp.zeros((), jnp.int32))
    out = lax.while_loop(cond, body, init)
    return dict(x=out["x"], commit_step=out["commit_step"], nfe=out["t"], steps=out["t"], committed=out["committed"],
                row_nfe=out["row_nfe"], block_ends=out["block_ends"])


def default_delimiters(model) -> tuple[int, ...]:
    """The newline token(s) of the model's tokenizer (the authors' LLaDA delimiter); a model without a
    tokenizer (the tiny task dLLMs) ends blocks at its EOS tokens."""
    if model.tokenizer is not None:
        return tuple(model.tokenizer.encode("\n"))
    return tuple(model.cfg.eos_token_ids)


@registry.strategy("adablock")
def generate(model, prompts: list[list[int]], *, max_new_tokens: int = 32, seed: int = 0, block_size: int = 32,
             threshold: float = 0.9, delimiter_threshold: float = 0.3, delimiters: list[int] | None = None,
             cache: str = "none", temperature: float = 0.0, cfg_scale: float = 0.0,
             prompt_bucket: int = 16) -> GenerationResult:
    """AdaBlock over Fast-dLLM's threshold rule (defaults: the authors' LLaDA settings, tau 0.9, delimiter
    threshold 0.3, default block 32); thresholds traced. `block_size` is the block used when no confident
    delimiter shows; `delimiters` default to `default_delimiters(model)`."""
    core.check_shape(max_new_tokens, block_size)
    core.validate_threshold(threshold)
    delimiters = tuple(delimiters) if delimiters is not None else default_delimiters(model)
    require(len(delimiters) > 0 and all(0 <= d < model.cfg.vocab_size for d in delimiters),
            f"delimiters must be token ids in [0, {model.cfg.vocab_size}), got {list(delimiters)}")
    scan = int(SCAN * max_new_tokens)
    require(scan >= 1, f"max_new_tokens ({max_new_tokens}) must be at least {int(1 / SCAN)}: blocks end within "
            f"its first {SCAN:.0%}")
    policy = AdaBlock(delimiters, scan)
    return core.run(model, prompts, max_new_tokens=max_new_tokens, seed=seed, block_size=block_size, policy=policy,
                    cache=cache, temperature=temperature, threshold=threshold, cfg_scale=cfg_scale,
                    prompt_bucket=prompt_bucket, knobs=dict(delimiter_threshold=delimiter_threshold),
                    lookahead=scan, program=decode)
