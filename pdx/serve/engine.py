"""Continuous batching over a fixed set of slots, with SARATHI mixed steps.

Design:
- **Slots, per-slot KV regions**: the cache is one `[B, S]` KV cache (B = `max_batch` slots of S =
  `max_len` positions each); a request holds one slot from its first prefill chunk to its last token,
  and its position p lives in slot row r at column p. Per-slot rather than paged: a static shape per
  (B, S), no block tables, and the CPU cached-attention kernel reads each row's live slots only, so an
  idle tail costs memory, not time.
- **A few compiled step programs** per (B, S, chunk): while a prompt is pending, a single packed forward
  (`cache_rows`) over W = c + B token columns: one decode token of every running request, then up to
  c prompt tokens of the requests being prefilled (SARATHI's decode-maximal batch: the prefill
  piggybacks on the decodes, so no decode stalls behind a long prompt), c the smallest of the `widths`
  (chunk, chunk/2, chunk/4, chunk/8, at least 16) that holds the pending prompt tokens, so a short
  prompt's step does not pay for a whole chunk (on CPU a step's cost grows with its columns); otherwise
  the AR engine's batched one-token decode step over the B slots. Prompt chunks go shortest remaining
  prompt first. With `sarathi=False` a pending prompt is prefilled first, in chunks that carry no decodes
  (decodes wait: the baseline SARATHI fixes), first come first served.
- **Per-request knobs, traced**: temperature, top-k, top-p and the seed are `[B]` arrays of the step;
  a request's k-th token is drawn with `fold_in(PRNGKey(seed), k)`, so its sampled output does not
  depend on what else runs beside it. Stop tokens, stop strings and max_tokens are checked on the host
  after each step (the step's tokens come back to stream them anyway).
- Requests join and leave between steps: a bounded queue (`QueueFull` when full), a cancelled request
  (client gone) frees its slot before the next step.

Needs a family with the `cache_rows` extra (the Llama family); Mamba-2 and SambaY have no packed
forward (their recurrent state is per row, not per position), so they are refused here.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pdx.decoding.sampling import SamplingParams, check_token_ids, filter_logits
from pdx.errors import InvalidInputError, require
from pdx.models import protocol

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


class QueueFull(Exception):
    """The engine's queue is full: answer 429 and let the client retry."""


@dataclasses.dataclass(eq=False)
class Request:
    """One completion. `emit(text_delta, token_id, finish_reason)` is called from the engine thread for
    every new token (finish_reason None) and once at the end (text_delta the last held-back text)."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[str, int | None, str | None], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    # engine-owned
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    slot: int = -1
    prefilled: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    finish_reason: str | None = None

    def cancel(self) -> None:
        """Free the request's slot before the next step (thread-safe)."""
        self.cancelled.set()


def choose_rows(logits, temperature, top_k, top_p, keys):
    """Next token per row `[R]` from logits `[R, V]` with per-row knobs `[R]` and keys `[R, 2]`: greedy
    where temperature is 0; the vocabulary sort runs only when some row samples."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        col = lambda a: a[:, None]  # noqa: E731  [R, 1]: broadcasts against [R, V] in filter_logits
        p = SamplingParams(col(jnp.maximum(temperature, 1e-6)), col(top_k), col(top_p), col(jnp.zeros_like(top_p)),
                           col(jnp.ones_like(top_p)))
        filtered = filter_logits(logits, p)
        return jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(keys, filtered).astype(jnp.int32)

    return jnp.where(temperature > 0, lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy), greedy)


@functools.partial(jax.jit, static_argnames=("family", "cfg"), donate_argnames=("cache",))
def serve_step(params, cache, reset, tokens, positions, rows, temperature, top_k, top_p, seeds, counters, *, family,
               cfg):
    """One step: returns the cache and the token after each slot's last token this step `[B]` (meaningless
    for a slot without tokens or whose prompt is not finished). reset `[B]`: slots given to a new request
    since the last step, emptied first (a packed write only raises a row's length). Knobs, seeds,
    counters: `[B]`.

    Decode only: tokens/positions/rows `[B, 1]`, row b the newest token of slot b (rows[b] = -1: idle),
    the AR engine's batched decode step. Mixed: `[1, W]`, packed tokens of several slots (row -1:
    padding), one forward over the decodes and a prompt chunk (`cache_rows`)."""
    cache = dataclasses.replace(cache, lengths=jnp.where(reset, 0, cache.lengths))
    if tokens.shape[0] == 1 and tokens.shape[1] > 1:  # packed
        logits, cache = family.forward(params, cfg, tokens, positions, cache, valid=rows >= 0, cache_rows=rows,
                                       logits="last")  # [B, 1, V]
    else:
        logits, cache = family.forward(params, cfg, tokens, positions, cache, valid=rows >= 0)  # [B, 1, V]
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counters)
    return cache, choose_rows(logits[:, 0], temperature, top_k, top_p, keys)


def _newest(r: Request) -> tuple[int, int]:
    """(token, position) of a decoding request's newest token, the one its next step feeds."""
    return r.tokens[-1], len(r.prompt) + len(r.tokens) - 1


class Engine:
    """The scheduler. `submit` from any thread; `step` (or `run` in a thread) from one thread only."""

    def __init__(self, model, *, max_batch: int = 16, max_len: int = 2048, chunk: int = 256, sarathi: bool = True,
                 queue_size: int = 64):
        protocol.check(model.family, model.cfg, protocol.Needs(extras=frozenset({"cache_rows"})), "serving")
        for name, value, low in (("max_batch", max_batch, 1), ("max_len", max_len, 2), ("chunk", chunk, 1),
                                 ("queue_size", queue_size, 1)):
            require(isinstance(value, int) and value >= low, f"{name} must be an int >= {low}, got {value!r}")
        require(max_len <= model.cfg.max_position_embeddings,
                f"max_len {max_len} exceeds the model's context of {model.cfg.max_position_embeddings} positions")
        self.model, self.max_batch, self.max_len, self.chunk, self.sarathi = model, max_batch, max_len, chunk, sarathi
        self.queue_size = queue_size
        self.widths = sorted({max(chunk >> s, min(chunk, 16)) for s in range(4)})  # prompt columns of a mixed step
        self.cache = protocol.new_cache(model.family, model.params, model.cfg, max_batch, max_len, jnp.float32)
        self.slots: list[Request | None] = [None] * max_batch
        self.pending: collections.deque[Request] = collections.deque()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.fresh = np.zeros((max_batch,), bool)  # slots given to a new request since the last step
        self.observers: list[Callable[[str, Request, float], None]] = []  # metrics hooks: (event, request, value)

    def compile_all(self) -> None:
        """Compile every step program now (the decode step and one mixed step per width), so no request
        waits on a compile: each runs once over padding only, which writes nothing and moves no length."""
        m = self.model
        for shape in [(self.max_batch, 1)] + [(1, c + self.max_batch) for c in self.widths]:
            zeros, idle = np.zeros(shape, np.int32), np.full(shape, -1, np.int32)
            self.cache, _ = serve_step(m.params, self.cache, np.zeros_like(self.fresh), zeros, zeros, idle,
                                       *self._knobs(), family=m.family, cfg=m.cfg)
        jax.block_until_ready(self.cache)

    # -- requests ---------------------------------------------------------------------------------
    def validate(self, req: Request) -> None:
        """`InvalidInputError` (answer 400) for a request that can never run here."""
        check_token_ids([req.prompt], self.model.cfg.vocab_size)
        require(isinstance(req.max_tokens, int) and req.max_tokens >= 1,
                f"max_tokens must be an int >= 1, got {req.max_tokens!r}")
        if len(req.prompt) + req.max_tokens > self.max_len:
            raise InvalidInputError(f"the prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds "
                                    f"the server's context of {self.max_len} tokens")
        SamplingParams.create(req.temperature, req.top_k, req.top_p)  # range checks

    def submit(self, req: Request) -> None:
        """Queue `req` (validated); `QueueFull` at once when the queue holds `queue_size` requests."""
        self.validate(req)
        with self.wake:
            if len(self.pending) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting)")
            self.pending.append(req)
            self.wake.notify()

    def load(self) -> tuple[int, int]:
        """(requests waiting, slots busy)."""
        with self.lock:
            return len(self.pending), sum(s is not None for s in self.slots)

    # -- scheduling -------------------------------------------------------------------------------
    def _finish(self, req: Request, reason: str, tail: str = "") -> None:
        if req.slot >= 0:
            self.slots[req.slot] = None
        req.finish_reason = reason
        req.emit(tail, None, reason)
        for f in self.observers:
            f("finish", req, time.monotonic() - req.arrived)

    def _admit(self) -> None:
        """Drop cancelled requests, then give free slots to waiting ones (in arrival order)."""
        with self.lock:
            for r in [r for r in self.pending if r.cancelled.is_set()]:
                self.pending.remove(r)
                self._finish(r, FINISH_CANCELLED)
            for r in list(self.slots):
                if r is not None and r.cancelled.is_set():
                    self._finish(r, FINISH_CANCELLED)
            while self.pending and None in self.slots:
                r = self.pending.popleft()
                r.slot = self.slots.index(None)
                self.slots[r.slot] = r
                self.fresh[r.slot] = True

    def _pack(self):
        """The next step's columns (tokens, positions, rows) and the requests expecting a token: `[B, 1]`
        (slot b's newest token in row b) when no prompt is pending, else `[1, B + c]` packed: the decode
        tokens, then up to c prompt tokens (a short prompt behind a long one's last chunk rides along), c the
        smallest of `widths` holding every pending prompt token (or the chunk); prompts in `_prompt_order`."""
        prefilling = [r for r in self.slots if r is not None and r.prefilled < len(r.prompt)]
        decoding = [r for r in self.slots if r is not None and r.prefilled == len(r.prompt)]
        if prefilling and not self.sarathi:
            decoding = []  # the baseline: a pending prompt goes first, alone
        if not prefilling:
            tokens, positions, rows = (np.zeros((self.max_batch, 1), np.int32) for _ in range(3))
            rows[:] = -1
            for r in decoding:
                tokens[r.slot], positions[r.slot], rows[r.slot] = *_newest(r), r.slot
            return tokens, positions, rows, decoding
        need = min(sum(len(r.prompt) - r.prefilled for r in prefilling), self.chunk)
        budget = next(c for c in self.widths if c >= need)
        w = budget + self.max_batch
        tokens, positions, rows = np.zeros((1, w), np.int32), np.zeros((1, w), np.int32), np.full((1, w), -1, np.int32)
        for col, r in enumerate(decoding):  # the newest token of each running request
            tokens[0, col], positions[0, col], rows[0, col] = *_newest(r), r.slot
        col, expecting = len(decoding), list(decoding)
        for r in sorted(prefilling, key=self._prompt_order):  # prompt chunks, up to `budget` tokens in all
            n = min(len(r.prompt) - r.prefilled, budget - (col - len(decoding)))
            if n <= 0:
                break
            tokens[0, col:col + n] = r.prompt[r.prefilled:r.prefilled + n]
            positions[0, col:col + n] = np.arange(r.prefilled, r.prefilled + n)
            rows[0, col:col + n] = r.slot
            col, r.prefilled = col + n, r.prefilled + n
            if r.prefilled == len(r.prompt):
                expecting.append(r)
        return tokens, positions, rows, expecting

    def _prompt_order(self, r: Request):
        """SARATHI: shortest remaining prompt first (chunking makes a long prefill preemptible, so a short
        prompt arriving behind it is not held up by all of it); the baseline: first come, first served, as a
        scheduler without chunked prefill runs each prefill to its end."""
        return (len(r.prompt) - r.prefilled, r.arrived) if self.sarathi else (r.arrived,)

    def _knobs(self):
        slots = self.slots
        get = lambda f, d: np.asarray([d if r is None else f(r) for r in slots])  # noqa: E731
        return (get(lambda r: r.temperature, 0.0).astype(np.float32), get(lambda r: r.top_k, 0).astype(np.int32),
                get(lambda r: r.top_p, 1.0).astype(np.float32), get(lambda r: r.seed, 0).astype(np.int32),
                get(lambda r: len(r.tokens), 0).astype(np.int32))

    def step(self) -> bool:
        """Admit, run one packed forward, hand out its tokens. False when there was nothing to do."""
        self._admit()
        if all(r is None for r in self.slots):
            return False
        tokens, positions, rows, expecting = self._pack()
        m = self.model
        self.cache, nxt = serve_step(m.params, self.cache, self.fresh, tokens, positions, rows, *self._knobs(),
                                     family=m.family, cfg=m.cfg)
        self.fresh = np.zeros_like(self.fresh)
        nxt = np.asarray(nxt)
        now = time.monotonic()
        for r in expecting:
            self._emit(r, int(nxt[r.slot]), now)
        return True

    def _emit(self, r: Request, tok: int, now: float) -> None:
        if not r.tokens:  # its first token (a stop token included)
            for f in self.observers:
                f("first_token", r, now - r.arrived)
        if tok in r.stop_ids:
            return self._finish(r, FINISH_STOP, self._new_text(r, final=True)[0])
        r.tokens.append(tok)
        for f in self.observers:
            f("token", r, now)
        text, stopped = self._new_text(r)
        if stopped:
            return self._finish(r, FINISH_STOP, text)
        if len(r.tokens) >= r.max_tokens:
            return self._finish(r, FINISH_LENGTH, text + self._new_text(r, final=True)[0])
        r.emit(text, tok, None)

    def _new_text(self, r: Request, final: bool = False) -> tuple[str, bool]:
        """(text decoded since the last call, whether a stop string ended it). Until `final`, an incomplete
        UTF-8 tail and the last len(stop string) - 1 characters (a stop string may be starting) wait."""
        tok = self.model.tokenizer
        full = tok.decode(r.tokens, skip_special=True) if tok is not None else ""
        cut = min((full.find(s) for s in r.stop_strings if s in full), default=-1)
        if cut >= 0:
            ready = full[:cut]
        elif final:
            ready = full
        else:
            hold = max((len(s) - 1 for s in r.stop_strings), default=0)
            ready = full[: len(full) - hold].rstrip("\ufffd")
        ready = ready if len(ready) >= len(r.text) else r.text
        delta, r.text = ready[len(r.text):], ready
        return delta, cut >= 0

    def run(self, stop: threading.Event, idle_s: float = 0.05) -> None:
        """Step until `stop` is set, sleeping on the queue while idle; in-flight requests are then
        finished as cancelled."""
        while not stop.is_set():
            if not self.step():
                with self.wake:
                    self.wake.wait(idle_s)
        with self.lock:
            for r in list(self.pending):
                self._finish(r, FINISH_CANCELLED)
            self.pending.clear()
            for r in self.slots:
                if r is not None:
                    self._finish(r, FINISH_CANCELLED)
