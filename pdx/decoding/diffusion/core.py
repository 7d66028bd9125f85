"""The shared dLLM decoding loop: one jitted `lax.while_loop` over denoising steps.

Canvas layout (static shapes): every row is `[left padding | prompt | G generated slots]` of width
W = P + G, where P is the longest prompt rounded up to a multiple of the block size (and of
`prompt_bucket`, to share compiles). Positions are column indices, so cache slot s holds position s
and block-causal attention blocks line up with decoding blocks; left padding is never attended to
and never decoded. Generated blocks sit at the same columns in every row, so slicing is static.

Per step: one model pass (full canvas, or the current block against a prefix / dual KV cache), the
block's logits become candidates and confidences, the policy picks positions to commit. A block
ends once no active row has a mask left in it. A row stops (is frozen) once the stop rule holds:
by default an EOS is committed and every slot before it is decoded (`eos_stop`; Learn2PD's
End-of-Text predictor plugs in as another `Spec.stop`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pdx.decoding import compiled
from pdx.decoding.diffusion import policies
from pdx.decoding.result import GenerationResult
from pdx.errors import require
from pdx.masks import BIDIRECTIONAL, MaskMode
from pdx.models import protocol

CACHE_MODES = ("none", "prefix", "dual")
OUTPUTS = ("x", "commit_step", "nfe", "steps", "committed", "row_nfe")  # what every decode program returns
REMASKING = ("low_confidence", "random")
ATTENTION = ("bidirectional", "block_causal")


def eos_stop(gen: jax.Array, mask_id: int, eos_ids: tuple[int, ...]) -> jax.Array:
    """Bool `[B]`: some EOS is committed in `gen [B, G]` and every slot before it is decoded."""
    if not eos_ids:
        return jnp.zeros(gen.shape[:1], bool)
    undecoded_before = jnp.cumsum(gen == mask_id, axis=-1) > 0  # [B, G], inclusive
    return jnp.any(jnp.isin(gen, jnp.asarray(eos_ids)) & ~undecoded_before, axis=-1)


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything static about one decode: shapes, policy, cache mode. Hashable; one compile each."""

    family: types.ModuleType  # model protocol module (init_cache, forward)
    prompt_width: int  # P
    gen_length: int  # G
    block_size: int  # K
    policy: object  # see policies.py
    remasking: str = "low_confidence"
    cache: str = "none"
    attention: str = "bidirectional"
    guidance: bool = False  # classifier-free guidance (its scale is a traced knob)
    logit_shift: int = 0  # 1 where logits at position i predict token i + 1 (Dream)
    stop: Callable = eos_stop
    lookahead: int = 0  # slots from the block start a step reads logits of and may commit (0: the block)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_size

    @property
    def ahead(self) -> int:
        """A = slots from the block start whose logits a step reads: the block, or the policy's lookahead
        (Prophet's all-in reads and commits every slot left in the answer)."""
        return max(self.lookahead, self.block_size)

    @property
    def mask_mode(self) -> MaskMode:
        return BIDIRECTIONAL if self.attention == "bidirectional" else MaskMode("block_causal", self.block_size)

    @property
    def window(self) -> int:
        """Tokens a cached pass feeds: the block, or with a prefix cache and bidirectional attention the
        block and its suffix (a fixed G tokens), which the block's queries see. Under block-causal attention
        they see no later block, so the block alone gives the same logits. At least the lookahead."""
        wide = self.cache == "prefix" and self.attention == "bidirectional"
        return max(self.gen_length if wide else self.block_size, self.ahead) + self.logit_shift

    @property
    def cache_slots(self) -> int:
        """A G-token prefix window may run G - K past the canvas (padding slots)."""
        return self.prompt_width + self.gen_length + self.window - self.block_size - self.logit_shift


# ---------------------------------------------------------------------------------------------
# Model passes. Each returns the current block's logits [B, K, V] and the updated cache.


def _positions(cols: jax.Array, b: int) -> jax.Array:
    return jnp.broadcast_to(cols, (b, cols.shape[0]))


def full_pass(params, cfg, spec: Spec, x, valid, cache, start):
    """Whole canvas `x [B, W]`; with a cache, refills every slot from it (a per-block refresh: the pass
    attends to no cached slot, so it costs what a pass without a cache does). Returns the logits of the
    A = `spec.ahead` slots from the block start (zeros past the canvas)."""
    b, w = x.shape
    if cache is not None:
        cache = dataclasses.replace(cache, lengths=jnp.zeros((b,), jnp.int32))
    logits, cache = spec.family.forward(params, cfg, x, _positions(jnp.arange(w), b), cache, mask_mode=spec.mask_mode,
                                        valid=valid, refill=cache is not None)
    logits = jnp.pad(logits, ((0, 0), (0, spec.ahead - spec.block_size), (0, 0)))  # the lookahead may run past W
    return lax.dynamic_slice_in_dim(logits, start - spec.logit_shift, spec.ahead, axis=1), cache


def cached_pass(params, cfg, spec: Spec, x, valid, cache, start):
    """Only the `spec.window` tokens from the current block on against the cache; the logits of its first
    `spec.ahead` slots.

    The window starts `logit_shift` columns early so its first logits predict the block's first
    slot. Prefix mode: the window's queries see cached slots before the window. Dual mode: also the
    cached suffix after it. The window's fresh keys overwrite its own slots, which no query reads.
    """
    b, w = x.shape
    k, shift, n = spec.block_size, spec.logit_shift, spec.window
    lo = start - shift
    pad = n - k - shift  # the prefix window may run past the canvas: padding, never attended
    xp = jnp.pad(x, ((0, 0), (0, pad)))
    vp = jnp.pad(valid, ((0, 0), (0, pad)))
    tokens = lax.dynamic_slice_in_dim(xp, lo, n, axis=1)  # [B, n]
    tok_valid = lax.dynamic_slice_in_dim(vp, lo, n, axis=1)
    slots = jnp.arange(cache.max_len)
    slot_valid = jnp.pad(valid, ((0, 0), (0, cache.max_len - w)))  # [B, S]
    seen = slots < lo
    if spec.cache == "dual":
        seen |= slots >= lo + n
    cache = dataclasses.replace(cache, lengths=jnp.full((b,), lo, jnp.int32))
    logits, cache = spec.family.forward(params, cfg, tokens, _positions(lo + jnp.arange(n), b), cache,
                                        mask_mode=spec.mask_mode, valid=tok_valid,
                                        cache_visible=slot_valid & seen[None])
    return logits[:, : spec.ahead], cache


# ---------------------------------------------------------------------------------------------
# The loop.


def model_inputs(spec: Spec, x, valid, prompt, mask_id: int):
    """The rows a pass feeds: the canvas, and with classifier-free guidance also its unconditional copy
    (prompt masked out, LLaDA's CFG) below it."""
    if not spec.guidance:
        return x, valid
    unconditional = jnp.where(prompt, mask_id, x)
    return jnp.concatenate([x, unconditional]), jnp.concatenate([valid, valid])


def guided(spec: Spec, logits, knobs):
    """Classifier-free guidance of a guided pass's logits (the conditional rows, then the unconditional)."""
    if not spec.guidance:
        return logits
    cond, uncond = jnp.split(logits, 2)
    return uncond + (knobs["cfg_scale"] + 1.0) * (cond - uncond)


def candidates(spec: Spec, logits, masked, key, knobs, mask_id: int):
    """The logits without the mask token `[B, K, V]`, candidate tokens `[B, K]` (Gumbel-max sampling at
    `temperature`, argmax at 0), confidences and the temperature-scaled noise `[B, K, V]`.

    The mask token itself is never a candidate (its logit is dropped before sampling and softmax)."""
    logits = logits.at[..., mask_id].set(-jnp.inf)
    kg, kr = jax.random.split(key)
    noise = knobs["temperature"] * jax.random.gumbel(kg, logits.shape, logits.dtype)  # [B, K, V]
    x0 = jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)  # [B, K]
    if spec.remasking == "low_confidence":
        probs = jax.nn.softmax(logits, axis=-1)
        conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    else:
        conf = jax.random.uniform(kr, x0.shape)
    return logits, x0, jnp.where(masked, conf, -jnp.inf), noise


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def decode(params, x, valid, prompt, key, knobs, *, cfg, spec: Spec):
    """Denoise the generated region of `x [B, W]` (valid, prompt: [B, W] bool). Returns a dict:
    x [B, W], commit_step [B, G] (the step each slot was committed at, -1 if never), nfe,
    steps, steps_per_block [num_blocks], committed [B, G] (tokens committed per row per step) and
    row_nfe [B] (steps in which the row still had masks in the block: what it would cost alone)."""
    b, w = x.shape
    p, g, k, a = spec.prompt_width, spec.gen_length, spec.block_size, spec.ahead
    mask_id = cfg.mask_token_id
    rows = 2 * b if spec.guidance else b
    beyond = ((0, 0), (0, a - k))  # a lookahead from the last blocks runs past the canvas: padding, never masked

    cache = None
    if spec.cache != "none":
        cache = protocol.new_cache(spec.family, params, cfg, rows, spec.cache_slots, params["embed"].dtype)

    def body(c):
        start = p + c["block"] * k
        xin, vin = model_inputs(spec, c["x"], valid, prompt, mask_id)
        if cache is None:
            logits, new_cache = full_pass(params, cfg, spec, xin, vin, None, start)
        else:
            passes = [functools.partial(f, params, cfg, spec) for f in (cached_pass, full_pass)]
            logits, new_cache = lax.cond(c["step"] == 0, passes[1], passes[0], xin, vin, c["cache"], start)
        logits = guided(spec, logits, knobs)  # [B, A, V]
        span = lax.dynamic_slice_in_dim(jnp.pad(c["x"], beyond), start, a, axis=1)  # [B, A]: the block first
        inside = (start + jnp.arange(a) < w) & ~c["done"][:, None]
        ahead = (span == mask_id) & inside  # [B, A] masked slots from the block start
        masked = ahead & (jnp.arange(a) < k)  # [B, A] those of the block
        logits, x0, conf, noise = candidates(spec, logits, masked, jax.random.fold_in(key, c["t"]), knobs, mask_id)
        decoded = jnp.mean(c["x"][:, p:] != mask_id, axis=1, dtype=jnp.float32)  # [B]
        ctx = policies.StepContext(logits, x0, conf, masked, c["step"], noise, decoded, ahead, c["t"])
        commit, tokens, policy_state = spec.policy.step(ctx, knobs, c["policy"])
        commit &= ahead
        span = jnp.where(commit, tokens, span)
        xs = lax.dynamic_update_slice_in_dim(jnp.pad(c["x"], beyond), span, start, axis=1)[:, :w]
        steps_pad = jnp.pad(c["commit_step"], beyond)
        when = lax.dynamic_slice_in_dim(steps_pad, start - p, a, axis=1)
        commit_step = lax.dynamic_update_slice_in_dim(steps_pad, jnp.where(commit, c["t"], when), start - p,
                                                      axis=1)[:, :g]
        gen = xs[:, p:]
        done = c["done"] | spec.stop(gen, mask_id, cfg.eos_token_ids) | ~jnp.any(gen == mask_id, axis=-1)
        block = lax.dynamic_slice_in_dim(xs, start, k, axis=1)  # [B, K]
        finished = ~jnp.any((block == mask_id) & ~done[:, None])
        return dict(
            x=xs, cache=new_cache, policy=policy_state, done=done, commit_step=commit_step,
            committed=c["committed"].at[:, c["t"]].set(commit.sum(-1, dtype=jnp.int32)),
            row_nfe=c["row_nfe"] + jnp.any(masked, -1).astype(jnp.int32),
            steps_per_block=c["steps_per_block"].at[c["block"]].add(1),
            block=c["block"] + finished.astype(jnp.int32), step=jnp.where(finished, 0, c["step"] + 1),
            t=c["t"] + 1,
        )

    def cond(c):
        return (c["block"] < spec.num_blocks) & ~jnp.all(c["done"]) & (c["t"] < g)

    zero = jnp.zeros((), jnp.int32)
    init = dict(x=x, cache=cache, policy=spec.policy.init_state(b, a, cfg.vocab_size), done=jnp.zeros((b,), bool),
                commit_step=jnp.full((b, g), -1, jnp.int32),
                committed=jnp.zeros((b, g), jnp.int32), row_nfe=jnp.zeros((b,), jnp.int32),
                steps_per_block=jnp.zeros((spec.num_blocks,), jnp.int32),
                block=zero, step=zero, t=zero)
    out = lax.while_loop(cond, body, init)
    return dict(x=out["x"], commit_step=out["commit_step"], nfe=out["t"], steps=out["t"],
                steps_per_block=out["steps_per_block"], committed=out["committed"], row_nfe=out["row_nfe"])


# ---------------------------------------------------------------------------------------------
# Host side: validation, canvas, result.


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def build_canvas(prompts: list[list[int]], gen_length: int, block_size: int, mask_id: int, pad_id: int,
                 bucket: int = 16):
    """Left-padded canvas `x [B, W]`, `valid [B, W]`, `prompt [B, W]` (numpy) and the prompt width P."""
    p = _round_up(max(len(q) for q in prompts), math.lcm(block_size, bucket))
    w = p + gen_length
    x = np.full((len(prompts), w), pad_id, np.int32)
    valid = np.zeros((len(prompts), w), bool)
    prompt = np.zeros((len(prompts), w), bool)
    for i, q in enumerate(prompts):
        x[i, p - len(q) : p] = q
        prompt[i, p - len(q) : p] = True
    x[:, p:] = mask_id
    valid[:] = prompt
    valid[:, p:] = True
    return x, valid, prompt, p


def check_prompts(prompts, vocab_size: int, mask_id: int) -> None:
    require(isinstance(prompts, list | tuple) and len(prompts) > 0, "prompts must be a non-empty list of token lists")
    for q in prompts:
        require(len(q) > 0, "every prompt needs at least one token")
        require(all(0 <= int(t) < vocab_size for t in q), f"prompt token ids must be in [0, {vocab_size})")
        require(mask_id not in q, f"prompts must not contain the mask token id {mask_id}")


def run(model, prompts, *, max_new_tokens: int, seed: int, block_size: int, policy, remasking: str = "low_confidence",
        cache: str = "none", attention: str = "bidirectional", temperature: float = 0.0, threshold: float = 1.0,
        factor: float = 1.0, cfg_scale: float = 0.0, prompt_bucket: int = 16, stop: Callable = eos_stop,
        knobs: dict[str, float] | None = None, lookahead: int = 0, program: Callable | None = None) -> GenerationResult:
    """Validate, build the canvas, run the compiled loop and package a `GenerationResult`.

    The caller (a registered strategy) has checked that the family is a masked-diffusion LLM with
    the attention and cache extras these options need (`pdx.decoding.registry`). `knobs`: the policy's own
    traced scalars (validated by the caller), beside temperature, threshold, factor and cfg_scale.
    `lookahead`: slots from the block start the policy reads and may commit (`Spec.lookahead`). `program`: the
    jitted loop (default `decode`; AdaBlock's row-wise blocks bring their own, with the same signature and
    outputs, `steps_per_block` aside, plus any extra stats)."""
    cfg = model.cfg
    caps = model.family.capabilities(cfg)
    mask_id = cfg.mask_token_id
    check_shape(max_new_tokens, block_size)
    require(cache in CACHE_MODES, f"cache must be one of {CACHE_MODES}, got {cache!r}")
    require(remasking in REMASKING, f"remasking must be one of {REMASKING}, got {remasking!r}")
    require(attention in ATTENTION, f"attention must be one of {ATTENTION}, got {attention!r}")
    require(temperature >= 0, f"temperature must be >= 0, got {temperature}")
    require(cfg_scale >= 0, f"cfg_scale must be >= 0, got {cfg_scale}")
    check_prompts(prompts, cfg.vocab_size, mask_id)
    shift = caps.logit_shift
    pad_id = next(t for t in (cfg.pad_token_id, *cfg.eos_token_ids, 0) if t is not None)
    x, valid, prompt, p = build_canvas([list(q) for q in prompts], max_new_tokens, block_size, mask_id, pad_id,
                                       prompt_bucket)
    spec = Spec(model.family, p, max_new_tokens, block_size, policy, remasking, cache, attention, cfg_scale > 0,
                shift, stop, lookahead)
    knobs = {name: jnp.float32(v) for name, v in
             dict(temperature=temperature, threshold=threshold, factor=factor, cfg_scale=cfg_scale,
                  **(knobs or {})).items()}
    args = (jnp.asarray(x), jnp.asarray(valid), jnp.asarray(prompt), jax.random.PRNGKey(seed), knobs)
    t0 = time.perf_counter()
    out, compile_s = compiled.run(program or decode, {"cfg": cfg, "spec": spec}, model.params, *args)
    out = jax.device_get(out)
    decode_s = time.perf_counter() - t0 - compile_s
    gen = out["x"][:, p:]
    tokens, lengths = finish_rows(gen, mask_id, cfg.eos_token_ids, pad_id)
    steps = int(out["steps"])
    committed = out["committed"][:, :steps]
    extra = {key: value.tolist() for key, value in out.items() if key not in OUTPUTS}  # e.g. steps_per_block
    stats = dict(forward_passes=int(out["nfe"]), nfe=int(out["nfe"]), steps=steps, **extra,
                 committed_per_step=committed.tolist(),
                 row_nfe=out["row_nfe"].tolist(),
                 tokens_per_step=float(committed.sum() / max(out["row_nfe"].sum(), 1)),
                 commit_step=out["commit_step"], compile_s=compile_s, decode_s=decode_s)
    return GenerationResult(tokens=tokens, lengths=lengths, stats=stats)


def finish_rows(gen: np.ndarray, mask_id: int, eos_ids: tuple[int, ...], pad_id: int):
    """Cut each row after its first EOS (the stop token included) and pad the rest: tokens [B, G], lengths [B]."""
    tokens = np.array(gen, np.int32)
    lengths = np.full(len(gen), gen.shape[1], np.int32)
    for i, row in enumerate(gen):
        hits = np.flatnonzero(np.isin(row, eos_ids)) if eos_ids else []
        if len(hits):
            lengths[i] = hits[0] + 1
            tokens[i, hits[0] + 1 :] = pad_id
    return tokens, lengths


def check_shape(gen_length: int, block_size: int) -> None:
    require(gen_length > 0 and block_size > 0, "max_new_tokens and block_size must be positive")
    require(gen_length % block_size == 0,
            f"max_new_tokens ({gen_length}) must be a multiple of block_size ({block_size})")


def validate_threshold(threshold: float) -> None:
    require(0 < threshold <= 1, f"threshold must be in (0, 1], got {threshold}")


def validate_steps(steps: int, gen_length: int, block_size: int) -> int:
    """Steps per block for LLaDA's fixed schedule."""
    blocks = gen_length // block_size
    require(steps >= blocks, f"steps ({steps}) must be at least the number of blocks ({blocks})")
    require(steps % blocks == 0, f"steps ({steps}) must be a multiple of the number of blocks ({blocks})")
    require(steps // blocks <= block_size,
            f"steps per block ({steps // blocks}) cannot exceed block_size ({block_size}): at most one step per token")
    return steps // blocks

