"""SambaY decoder-hybrid-decoder (Phi-4-mini-flash) as pure functions.

Implements the model protocol (`pdx.models.protocol`, `docs/model-protocol.md`):
    cfg = Config(...)                                     # frozen, static under jit
    params = init_params(cfg, key)                        # or pdx.io.sambay_checkpoint.load
    cache = init_cache(cfg, batch, max_len, dtype)        # fixed size
    logits, cache = forward(params, cfg, tokens, positions, cache, valid=...)
Causal only; rolled back from a traced forward's inputs (`rollback`).

Layout for L layers (L % 4 == 0, h = L / 2), every layer `x += mixer(LN(x)); x += MLP(LN(x))`:
    layers 0 .. h-1   self-decoder: Mamba (even) / sliding-window differential attention (odd)
    layer  h          Mamba whose pre-gate SSM output y is the memory m
    layer  h+1        full differential attention; its keys/values are the one shared KV cache
    layers h+2 .. L-1 cross-decoder: GMU(x, m) (even) / cross-attention on the shared KV (odd)
No positional encoding: order comes from the Mamba recurrences and the causal masks.

Decoding touches O(1) Mamba states, O(W) ring buffers and one full KV (read by layer h+1 and every
cross-attention layer). With `logits="last"` a forward runs the cross-decoder (and layer h+1's
attention) on each row's last valid token only: prefill cost is linear in the prompt length.

Params (weights `[out, in]`; groups stacked on a leading axis and run with `lax.scan`; P = h/2
self-decoder pairs, X = (h-2)/2 cross-decoder pairs; Di = expand * D, Hd = D / N):
    embed [V, D]; final_norm {w, b} [D]; lm_head [V, D] (absent when tied)
    self.mamba [P, ...], memory [...]: mixer params (pdx.ssm.mamba1) + ln1_w/b, ln2_w/b, fc1 [2F, D], fc2 [D, F]
    self.swa [P, ...], full [...]: wqkv [(N+2K) Hd, D], bqkv, wo [D, N Hd], bo [D], lambda_q1/k1/q2/k2 [Hd],
        subln [2 Hd], norms, fc1, fc2
    cross.gmu [X, ...]: in_proj [Di, D], out_proj [D, Di], norms, fc1, fc2
    cross.attn [X, ...]: wq [N Hd, D], bq, wo, bo, lambdas, subln, norms, fc1, fc2
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pdx import masks
from pdx.errors import ConfigError, InvalidInputError, require
from pdx.models import hybrid_layers as hl
from pdx.models import layers as nn
from pdx.models import protocol
from pdx.ssm import mamba1


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F (the MLP's fc1 is [2F, D])
    num_layers: int  # L, a multiple of 4
    num_heads: int  # N, even (differential attention pairs heads)
    num_kv_heads: int  # K, even
    sliding_window: int  # W, keys a self-decoder attention layer sees (the current token included)
    mamba_d_state: int = 16  # N_s
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int = 0  # 0: ceil(D / 16) as mamba_ssm's "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    scan_chunk: int = 64  # selective-scan chunk (prefill only)
    max_position_embeddings: int = 262144
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "mamba_d_state", "mamba_expand", "scan_chunk"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}", ConfigError)
        require(self.num_layers % 4 == 0, f"SambaY needs num_layers divisible by 4 (self-decoder pairs, memory "
                f"layer, shared-KV layer, cross-decoder pairs), got {self.num_layers}", ConfigError)
        require(isinstance(self.sliding_window, int) and self.sliding_window >= 1,
                f"sliding_window must be an int >= 1, got {self.sliding_window!r}", ConfigError)
        require(self.num_heads % 2 == 0 and self.num_kv_heads % 2 == 0,
                f"differential attention pairs heads: num_heads ({self.num_heads}) and num_kv_heads "
                f"({self.num_kv_heads}) must be even", ConfigError)
        require(self.num_heads % self.num_kv_heads == 0,
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})", ConfigError)
        require(self.hidden_size % self.num_heads == 0,
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})", ConfigError)
        require(isinstance(self.mamba_d_conv, int) and self.mamba_d_conv >= 2,
                f"mamba_d_conv must be an int >= 2, got {self.mamba_d_conv!r}", ConfigError)
        require(isinstance(self.mamba_dt_rank, int) and self.mamba_dt_rank >= 0,
                f"mamba_dt_rank must be an int >= 0 (0 = auto), got {self.mamba_dt_rank!r}", ConfigError)

    @property
    def head_dim(self) -> int:  # Hd
        return self.hidden_size // self.num_heads

    @property
    def d_inner(self) -> int:  # Di
        return self.mamba_expand * self.hidden_size

    @property
    def dt_rank(self) -> int:  # R
        return self.mamba_dt_rank or math.ceil(self.hidden_size / 16)

    @property
    def self_pairs(self) -> int:  # P: (Mamba, SWA) pairs below the memory layer
        return self.num_layers // 4

    @property
    def cross_pairs(self) -> int:  # X: (GMU, cross-attention) pairs above the shared-KV layer
        return self.num_layers // 4 - 1

    def layer_kinds(self) -> tuple[str, ...]:
        """The kind of every layer: mamba, swa, memory, full, gmu, cross."""
        h = self.num_layers // 2
        kinds = ["mamba" if i % 2 == 0 else "swa" for i in range(h)] + ["memory", "full"]
        return tuple(kinds + ["gmu" if i % 2 == 0 else "cross" for i in range(h + 2, self.num_layers)])


# microsoft/Phi-4-mini-flash-reasoning (3.8B): d_model 2560, 32 layers, 40 heads / 20 kv heads, window 512.
PHI4_MINI_FLASH = Config(vocab_size=200064, hidden_size=2560, intermediate_size=10240, num_layers=32, num_heads=40,
                         num_kv_heads=20, sliding_window=512, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                         mamba_dt_rank=160, bos_token_id=199999, eos_token_ids=(199999,), pad_token_id=199999)

# Small geometries for tests and the CPU training run.
TINY = Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_layers=8, num_heads=4, num_kv_heads=2,
              sliding_window=4, mamba_d_state=4, mamba_dt_rank=4, scan_chunk=8)


def _depths(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Layer indices of each attention group (differential attention's lambda_init depends on the depth)."""
    kinds = cfg.layer_kinds()
    return {k: tuple(i for i, kind in enumerate(kinds) if kind == k) for k in ("swa", "full", "cross")}


# ----------------------------------------------------------------------------------------------
# Params


def _norms(n: int | None, d: int, dtype) -> dict:
    shape = (d,) if n is None else (n, d)
    return {"ln1_w": jnp.ones(shape, dtype), "ln1_b": jnp.zeros(shape, dtype),
            "ln2_w": jnp.ones(shape, dtype), "ln2_b": jnp.zeros(shape, dtype)}


def _stack(n: int | None, make, key):
    """`make(key)` once (n None) or n times stacked on a leading axis."""
    if n is None:
        return make(key)
    return jax.tree.map(lambda *a: jnp.stack(a), *[make(k) for k in jax.random.split(key, n)]) if n else None


def init_params(cfg: Config, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random params (normal(scale) weights, zero biases, unit norms, lambdas ~ normal(0.1)): tests and training."""
    D, F, N, K, Hd, Di, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.d_inner, cfg.vocab_size)
    normal = lambda k, shape, s=scale: (s * jax.random.normal(k, shape)).astype(dtype)

    def mlp(k):
        k1, k2 = jax.random.split(k)
        return {"fc1": normal(k1, (2 * F, D)), "fc2": normal(k2, (D, F))}

    def mamba(k):
        k1, k2 = jax.random.split(k)
        p = mamba1.init_mixer_params(k1, D, Di, cfg.mamba_d_state, cfg.dt_rank, cfg.mamba_d_conv, dtype, scale,
                                     cfg.mamba_proj_bias)
        if not cfg.mamba_conv_bias:
            del p["conv_bias"]
        return p | mlp(k2) | _norms(None, D, dtype)

    def attn(k, q_only=False):
        ks = jax.random.split(k, 4)
        rows = N * Hd if q_only else (N + 2 * K) * Hd
        lam = {name: normal(kk, (Hd,), 0.1) for name, kk in zip(("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"),
                                                                 jax.random.split(ks[2], 4))}
        w, bias = ("wq", "bq") if q_only else ("wqkv", "bqkv")
        p = {w: normal(ks[0], (rows, D)), bias: jnp.zeros((rows,), dtype),
             "wo": normal(ks[1], (D, N * Hd)), "bo": jnp.zeros((D,), dtype), "subln": jnp.ones((2 * Hd,), dtype)}
        return p | lam | mlp(ks[3]) | _norms(None, D, dtype)

    def gmu(k):
        k1, k2, k3 = jax.random.split(k, 3)
        return {"in_proj": normal(k1, (Di, D)), "out_proj": normal(k2, (D, Di))} | mlp(k3) | _norms(None, D, dtype)

    ks = jax.random.split(key, 9)
    P, X = cfg.self_pairs, cfg.cross_pairs
    params = {
        "embed": normal(ks[0], (V, D)),
        "self": {"mamba": _stack(P, mamba, ks[1]), "swa": _stack(P, attn, ks[2])},
        "memory": mamba(ks[3]),
        "full": attn(ks[4]),
        "cross": {"gmu": _stack(X, gmu, ks[5]), "attn": _stack(X, functools.partial(attn, q_only=True), ks[6])},
        "final_norm": {"w": jnp.ones((D,), dtype), "b": jnp.zeros((D,), dtype)},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = normal(ks[7], (V, D))
    return params


# ----------------------------------------------------------------------------------------------
# Cache


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["conv", "ssm", "swa_k", "swa_v", "k", "v", "lengths"], meta_fields=[])
@dataclasses.dataclass
class SambaYCache:
    """Fixed-size decoding state.

    conv: [P+1, B, K_conv-1, Di] and ssm: [P+1, B, Di, N_s] (fp32) of the P self-decoder Mamba
    layers and the memory layer (last); swa_k, swa_v: [P, B, K, W, Hd] ring buffers (position p in
    slot p % W); k, v: [B, K, S, Hd] the one shared full KV (slot s holds position s); lengths: [B]
    tokens consumed per row (also the next write offset).
    """

    conv: jax.Array
    ssm: jax.Array
    swa_k: jax.Array
    swa_v: jax.Array
    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def capabilities(cfg: Config) -> protocol.Capabilities:
    return protocol.Capabilities(name="SambaY", objective=protocol.CAUSAL_LM, mask_modes=frozenset({"causal"}),
                                 extras=frozenset(), rollback=protocol.ROLLBACK_TRACE)


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.float32, *,
               per_layer: bool | None = None) -> SambaYCache:
    """Zero cache for `batch` rows and `max_len` shared-KV slots; only `k, v` grow with `max_len`.
    `per_layer` is accepted for the protocol: the cache has one layout (a single full KV)."""
    del per_layer
    require(isinstance(max_len, int) and max_len >= 1, f"max_len must be an int >= 1, got {max_len!r}")
    P, K, Hd, Di, W = cfg.self_pairs, cfg.num_kv_heads, cfg.head_dim, cfg.d_inner, cfg.sliding_window
    return SambaYCache(
        conv=jnp.zeros((P + 1, batch, cfg.mamba_d_conv - 1, Di), dtype),
        ssm=jnp.zeros((P + 1, batch, Di, cfg.mamba_d_state), jnp.float32),
        swa_k=jnp.zeros((P, batch, K, W, Hd), dtype),
        swa_v=jnp.zeros((P, batch, K, W, Hd), dtype),
        k=jnp.zeros((batch, K, max_len, Hd), dtype),
        v=jnp.zeros((batch, K, max_len, Hd), dtype),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def cache_bytes(cache: SambaYCache) -> int:
    """Bytes held by the cache (all buffers)."""
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))


# ----------------------------------------------------------------------------------------------
# Blocks


def _mlp_block(p: dict, cfg: Config, x: jax.Array) -> jax.Array:
    with jax.named_scope("mlp"):
        return x + hl.glu_mlp(hl.layer_norm(x, p["ln2_w"], p["ln2_b"], cfg.layer_norm_eps), p["fc1"], p["fc2"])


def _mamba_block(p: dict, cfg: Config, x, conv, ssm, valid, step, trace: bool):
    """Mamba layer; returns (x, memory y [B, T, Di], conv, ssm, `mamba1.MixerTrace` or None)."""
    with jax.named_scope("mamba"):
        h = hl.layer_norm(x, p["ln1_w"], p["ln1_b"], cfg.layer_norm_eps)
        out, y, conv, ssm, *tr = mamba1.mixer(p, h, conv, ssm, valid, step, cfg.scan_chunk, trace=trace)
    return _mlp_block(p, cfg, x + out), y, conv, ssm, (tr[0] if trace else None)


def _qkv(p: dict, cfg: Config, h: jax.Array):
    """q [B, T, N, Hd] and k, v [B, K, T, Hd] of a self-attention layer."""
    b, t, _ = h.shape
    N, K, Hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = nn.dense("btd,fd->btf", h, p["wqkv"]) + p["bqkv"].astype(h.dtype)
    q, k, v = jnp.split(qkv, [N * Hd, (N + K) * Hd], axis=-1)
    k = k.reshape(b, t, K, Hd).transpose(0, 2, 1, 3)
    v = v.reshape(b, t, K, Hd).transpose(0, 2, 1, 3)
    return q.reshape(b, t, N, Hd), k, v


def _attend_out(p: dict, cfg: Config, x, q, segments, lam_init):
    """Differential attention of q over segments, out_proj, residual, then the MLP block."""
    b, t = q.shape[:2]
    with jax.named_scope("diff_attention"):
        lam = hl.diff_lambda(p["lambda_q1"], p["lambda_k1"], p["lambda_q2"], p["lambda_k2"], lam_init)
        o = hl.diff_attention(q, segments, lam, lam_init, p["subln"])
        o = nn.dense("btf,df->btd", o.reshape(b, t, -1), p["wo"]) + p["bo"].astype(x.dtype)
    return _mlp_block(p, cfg, x + o)


def _group(fn, carry, params, xs, stacked: bool):
    """Run `fn(carry, (p, *x)) -> (carry, out)` over a layer group: `lax.scan` over stacked params
    (`stacked`), else a Python loop over a tuple of per-layer params (see `unstack_layers`), slicing
    the per-layer states `xs` (arrays with a leading layer axis). Returns (carry, stacked outs)."""
    if stacked:
        return lax.scan(fn, carry, (params, *xs))
    outs = []
    for i, p in enumerate(params):
        carry, out = fn(carry, (p, *(a[i] for a in xs)))
        outs.append(out)
    return carry, (None if outs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outs))


def _pairs(a, b, depths: tuple[int, ...]):
    """A group's params: `(a, b, depth [n])` stacked, or a tuple of per-layer triples when unstacked."""
    d = jnp.asarray(depths, jnp.float32)
    if isinstance(a, dict):
        return (a, b, d), True
    return tuple((ai, bi, d[i]) for i, (ai, bi) in enumerate(zip(a, b))), False


def lambda_init(depth) -> jax.Array:
    """Differential attention's `0.8 - 0.6 exp(-0.3 depth)` of a (possibly traced) layer depth."""
    return 0.8 - 0.6 * jnp.exp(-0.3 * jnp.asarray(depth, jnp.float32))


# ----------------------------------------------------------------------------------------------
# Forward


def _check_inputs(cfg: Config, tokens, positions, cache, valid, logits) -> None:
    """API-edge validation: shapes always, token ids when they are concrete (not traced)."""
    require(logits in ("all", "last"), f"logits must be 'all' or 'last', got {logits!r}")
    require(tokens.ndim == 2, f"tokens must be [batch, time], got shape {tokens.shape}")
    require(positions.shape == tokens.shape, f"positions {positions.shape} must match tokens {tokens.shape}")
    require(valid is None or valid.shape == tokens.shape,
            f"valid {getattr(valid, 'shape', None)} must match tokens {tokens.shape}")
    if cache is not None:
        require(cache.lengths.shape == (tokens.shape[0],),
                f"cache holds {cache.lengths.shape[0]} rows, tokens have {tokens.shape[0]}")
        require(cache.swa_k.shape[3] == cfg.sliding_window and cache.ssm.shape[0] == cfg.self_pairs + 1
                and cache.k.shape[1] == cfg.num_kv_heads, "cache does not fit the config", InvalidInputError)
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
        require(0 <= lo and hi < cfg.vocab_size, f"token ids must be in [0, {cfg.vocab_size}), got [{lo}, {hi}]")


def forward(
    params: dict,
    cfg: Config,
    tokens: jax.Array,
    positions: jax.Array,
    cache: SambaYCache | None = None,
    *,
    mask_mode: str | masks.MaskMode = "causal",
    valid: jax.Array | None = None,
    cache_visible: jax.Array | None = None,
    refill: bool = False,
    tree_mask: jax.Array | None = None,
    cache_rows: jax.Array | None = None,
    logits: str = "all",
    trace: bool = False,
):
    """Logits (fp32) and the updated cache; with `trace`, also a `SambaYTrace` (for `rollback`).

    tokens, positions: [B, T] int32; with a cache, row b's tokens sit at positions lengths[b] + t.
    `valid [B, T]` marks real tokens, a per-row prefix (right padding): padding gets dt = 0, stays
    out of conv windows and ring buffers and is never attended to, so it leaves every state as it
    was, and `lengths` advances by `valid.sum(-1)`. A cache with T == 1 runs the O(1) Mamba steps.
    logits (static): "all" -> `[B, T, V]`; "last" -> `[B, 1, V]` at each row's last valid token,
    running layer h+1's attention and the cross-decoder on that token only (linear prefill).
    Causal only, no extras (`cache_visible`, `refill`, `tree_mask`, `cache_rows`: an `UnsupportedError`).
    """
    protocol.check_forward(capabilities(cfg), masks.as_mask_mode(mask_mode), cache_visible, tree_mask,
                           cache_rows, refill)
    _check_inputs(cfg, tokens, positions, cache, valid, logits)
    require(cache is not None or not trace, "forward(..., trace=True) traces a cached forward (for rollback)")
    b, t = tokens.shape
    step = cache is not None and t == 1
    valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    W, eps = cfg.sliding_window, cfg.layer_norm_eps
    depths = _depths(cfg)
    x = nn.embed(params["embed"], tokens)  # [B, T, D]
    causal = masks.CAUSAL
    win_vis = masks.visibility(positions, positions, valid, causal, W)  # [B, T, T]
    if cache is not None:
        lengths = cache.lengths
        ring_pos, ring_valid = hl.ring_positions(lengths, W)  # [B, W]
        ring_vis = masks.visibility(positions, ring_pos, ring_valid, causal, W)  # [B, T, W]
        conv, ssm, swa_k, swa_v = cache.conv, cache.ssm, cache.swa_k, cache.swa_v

    # Self-decoder: (Mamba, sliding-window attention) pairs.
    def self_pair(x, xs):
        (pm, pa, depth), *states = xs
        conv_i, ssm_i, rk, rv = states if states else (None,) * 4
        x, _, conv_i, ssm_i, tr = _mamba_block(pm, cfg, x, conv_i, ssm_i, valid, step, trace)
        with jax.named_scope("swa"):
            q, k, v = _qkv(pa, cfg, hl.layer_norm(x, pa["ln1_w"], pa["ln1_b"], eps))
            segments = [(k, v, win_vis)]
            if states:
                segments.insert(0, (rk, rv, ring_vis))
                rk, rv = hl.ring_write(rk, k, lengths, valid), hl.ring_write(rv, v, lengths, valid)
            x = _attend_out(pa, cfg, x, q, segments, lambda_init(depth))
        return x, ((conv_i, ssm_i, rk, rv, (tr, k, v) if trace else None) if states else None)

    pairs, stacked = _pairs(params["self"]["mamba"], params["self"]["swa"], depths["swa"])
    if cache is None:
        x, _ = _group(self_pair, x, pairs, (), stacked)
        conv_m = ssm_m = None
    else:
        x, (conv_s, ssm_s, swa_k, swa_v, self_trace) = _group(self_pair, x, pairs,
                                                             (conv[:-1], ssm[:-1], swa_k, swa_v), stacked)
        conv_m, ssm_m = conv[-1], ssm[-1]

    # Memory layer (Mamba): y is the memory the GMUs read.
    x, m, conv_m, ssm_m, memory_trace = _mamba_block(params["memory"], cfg, x, conv_m, ssm_m, valid, step, trace)

    # Layer h+1: full attention; its keys/values become the shared KV.
    pf = params["full"]
    hf = hl.layer_norm(x, pf["ln1_w"], pf["ln1_b"], eps)
    q, k_new, v_new = _qkv(pf, cfg, hf)
    if logits == "last":  # the rest runs on each row's last valid token only
        last = jnp.maximum(valid.sum(-1) - 1, 0)[:, None]  # [B, 1]
        x = jnp.take_along_axis(x, last[:, :, None], axis=1)  # [B, 1, D]
        m = jnp.take_along_axis(m, last[:, :, None], axis=1)  # [B, 1, Di]
        q = jnp.take_along_axis(q, last[:, :, None, None], axis=1)  # [B, 1, N, Hd]
        q_pos = jnp.take_along_axis(positions, last, axis=1)  # [B, 1]
        q_valid = valid.any(-1)[:, None]
    else:
        q_pos, q_valid = positions, valid
    shared = [(k_new, v_new, masks.visibility(q_pos, positions, valid, causal, 0) & q_valid[:, :, None])]
    if cache is not None:
        rows = jnp.arange(b)[:, None]
        slots = lengths[:, None] + jnp.arange(t)[None, :]  # [B, T]
        ck = cache.k.at[rows, :, slots].set(k_new.astype(cache.k.dtype).transpose(0, 2, 1, 3), mode="drop")
        cv = cache.v.at[rows, :, slots].set(v_new.astype(cache.v.dtype).transpose(0, 2, 1, 3), mode="drop")
        slot_pos = jnp.broadcast_to(jnp.arange(ck.shape[2])[None], (b, ck.shape[2]))
        cache_vis = masks.visibility(q_pos, slot_pos, slot_pos < lengths[:, None], causal, 0)  # [B, T', S]
        shared.insert(0, (ck, cv, cache_vis))
    x = _attend_out(pf, cfg, x, q, shared, lambda_init(depths["full"][0]))

    # Cross-decoder: (GMU on the memory, cross-attention on the shared KV) pairs.
    def cross_pair(x, xs):
        (pg, pa, depth), = xs
        with jax.named_scope("gmu"):
            x = x + hl.gmu(hl.layer_norm(x, pg["ln1_w"], pg["ln1_b"], eps), m, pg["in_proj"], pg["out_proj"])
        x = _mlp_block(pg, cfg, x)
        with jax.named_scope("cross_attention"):
            h = hl.layer_norm(x, pa["ln1_w"], pa["ln1_b"], eps)
            qc = (nn.dense("btd,fd->btf", h, pa["wq"]) + pa["bq"].astype(h.dtype)).reshape(*h.shape[:2], cfg.num_heads,
                                                                                           cfg.head_dim)
            x = _attend_out(pa, cfg, x, qc, shared, lambda_init(depth))
        return x, None

    if cfg.cross_pairs:
        cpairs, stacked = _pairs(params["cross"]["gmu"], params["cross"]["attn"], depths["cross"])
        x, _ = _group(cross_pair, x, cpairs, (), stacked)

    x = hl.layer_norm(x, params["final_norm"]["w"], params["final_norm"]["b"], eps)
    out = nn.lm_head(params, cfg, x)
    new_cache = None
    if cache is not None:
        new_cache = SambaYCache(
            conv=jnp.concatenate([conv_s, conv_m[None]]).astype(cache.conv.dtype),
            ssm=jnp.concatenate([ssm_s, ssm_m[None]]), swa_k=swa_k, swa_v=swa_v, k=ck, v=cv,
            lengths=lengths + valid.sum(-1, dtype=jnp.int32))
    if trace:
        (mamba_tr, swa_k_new, swa_v_new) = self_trace
        mixer = jax.tree.map(lambda s, m: jnp.concatenate([s, m[None]]), mamba_tr, memory_trace)  # [P+1, ...]
        return out, new_cache, SambaYTrace(mixer, swa_k_new, swa_v_new)
    return out, new_cache


@functools.partial(jax.tree_util.register_dataclass, data_fields=["mixer", "swa_k", "swa_v"], meta_fields=[])
@dataclasses.dataclass
class SambaYTrace:
    """A traced forward's per-position inputs: the P+1 Mamba layers' `mamba1.MixerTrace` (stacked `[P+1, B, T,
    ...]`, the memory layer last) and the self-decoder attention's new keys/values `[P, B, K, T, Hd]`."""

    mixer: mamba1.MixerTrace
    swa_k: jax.Array
    swa_v: jax.Array


def rollback(params: dict, cfg: Config, before: SambaYCache, after: SambaYCache, trace: SambaYTrace,
             keep: jax.Array) -> SambaYCache:
    """The cache as if the traced forward from `before` had consumed only its first `keep [B]` tokens:
    Mamba states rebuilt from the trace (`mamba1.rewind`), ring buffers rewritten from `before` with the
    kept keys only (a rejected token may have overwritten a live slot), the shared KV cut by `lengths`."""
    keep = keep.astype(jnp.int32)
    mamba = params["self"]["mamba"]
    a_self = mamba["A_log"] if isinstance(mamba, dict) else jnp.stack([p["A_log"] for p in mamba])
    A_log = jnp.concatenate([a_self, params["memory"]["A_log"][None]])  # [P+1, Di, N]
    conv, ssm = jax.vmap(mamba1.rewind, in_axes=(0, 0, 0, 0, None))(A_log, before.conv, before.ssm, trace.mixer, keep)
    kept = jnp.arange(trace.swa_k.shape[3])[None] < keep[:, None]  # [B, T]
    ring = jax.vmap(hl.ring_write, in_axes=(0, 0, None, None))
    return SambaYCache(conv=conv.astype(before.conv.dtype), ssm=ssm,
                       swa_k=ring(before.swa_k, trace.swa_k, before.lengths, kept),
                       swa_v=ring(before.swa_v, trace.swa_v, before.lengths, kept),
                       k=after.k, v=after.v, lengths=before.lengths + keep)


def is_per_layer(params: dict) -> bool:
    return not isinstance(params["self"]["mamba"], dict)


def unstack_layers(params: dict) -> dict:
    """Params with every layer group as a tuple of per-layer dicts: the fast decode layout on XLA CPU
    (a weight sliced out of a stacked array inside `lax.scan` is copied before each matmul)."""
    def split(group):
        if group is None or not isinstance(group, dict):
            return group
        n = jax.tree.leaves(group)[0].shape[0]
        return tuple(jax.tree.map(lambda a, i=i: a[i], group) for i in range(n))

    return params | {"self": {k: split(v) for k, v in params["self"].items()},
                     "cross": {k: split(v) for k, v in params["cross"].items()}}


def stack_layers(params: dict) -> dict:
    """Inverse of `unstack_layers`."""
    def stack(group):
        if group is None or isinstance(group, dict):
            return group
        return jax.tree.map(lambda *a: jnp.stack(a), *group)

    return params | {"self": {k: stack(v) for k, v in params["self"].items()},
                     "cross": {k: stack(v) for k, v in params["cross"].items()}}


def num_params(params: dict) -> int:
    return sum(a.size for a in jax.tree.leaves(params))
