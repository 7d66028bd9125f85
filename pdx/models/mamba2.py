"""Mamba-2 language model (transformers' `Mamba2ForCausalLM` geometry) as pure functions.

Implements the model protocol (`pdx.models.protocol`, `docs/model-protocol.md`):
    cfg = Config(...)                                     # frozen, static under jit
    params = init_params(cfg, key)                        # or pdx.io.mamba2_checkpoint.load
    cache = init_cache(cfg, batch, max_len, dtype)        # fixed size: max_len is not needed
    logits, cache = forward(params, cfg, tokens, positions, cache, valid=...)
Causal only; rolled back from a traced forward's inputs (`rollback`); layers can be skipped.

Each block: x += out_proj(gated_rmsnorm(SSD(silu(conv(xBC))) + D x, z)) with (z, xBC, dt) =
in_proj(rmsnorm(x)). Prefill runs the chunked SSD scan; a one-token forward with a cache runs the
O(1) recurrence (`ssd_step`), whose cost does not depend on the context length.

Params (layers stacked on a leading axis L and run with `lax.scan`, weights `[out, in]`;
I = num_heads * head_dim, E = 2 I + 2 G N + H, Cv = I + 2 G N channels through the conv):
    embed [V, D]; final_norm [D]; lm_head [V, D] (absent when tied)
    layers: norm [L, D], in_proj [L, E, D], in_proj_bias [L, E] (use_bias), conv_weight [L, Cv, K],
            conv_bias [L, Cv] (use_conv_bias), dt_bias [L, H], A_log [L, H], D [L, H],
            gate_norm [L, I], out_proj [L, D, I], out_proj_bias [L, D] (use_bias)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pdx import masks
from pdx.errors import ConfigError, require
from pdx.models import layers as nn
from pdx.models import protocol
from pdx.ssm.conv import causal_conv1d, causal_conv1d_step, window_after
from pdx.ssm.ssd import discretize_dt, ssd_chunked, ssd_step


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int  # D (d_model)
    num_layers: int
    num_heads: int  # H
    head_dim: int = 64  # P
    state_size: int = 128  # N
    n_groups: int = 1  # G: heads per group share B and C
    conv_kernel: int = 4  # K
    chunk_size: int = 256  # Q, prefill only
    use_bias: bool = False  # biases on in_proj / out_proj
    use_conv_bias: bool = True
    rms_norm_eps: float = 1e-5  # block norms, final norm and the gated norm
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    tie_embeddings: bool = True
    # No positional limit: a recurrent state has none; engines that check a context bound read this.
    max_position_embeddings: int = 1 << 30
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "state_size", "n_groups",
                     "chunk_size"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}", ConfigError)
        require(self.num_heads % self.n_groups == 0,
                f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})", ConfigError)
        require(isinstance(self.conv_kernel, int) and self.conv_kernel >= 2,
                f"conv_kernel must be an int >= 2, got {self.conv_kernel!r}", ConfigError)
        lo, hi = self.dt_limit
        require(0.0 <= lo <= hi, f"dt_limit must satisfy 0 <= min <= max, got {self.dt_limit}", ConfigError)

    @property
    def intermediate_size(self) -> int:  # I
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:  # Cv: x, B and C go through the conv together
        return self.intermediate_size + 2 * self.n_groups * self.state_size


FEW_TOKENS = 16  # forwards up to this long (decode, speculative verify) loop over per-layer weights in place

# state-spaces/mamba2-130m geometry (vocab padded to a multiple of 16, GPT-NeoX tokenizer).
MAMBA2_130M = Config(vocab_size=50288, hidden_size=768, num_layers=24, num_heads=24, head_dim=64, state_size=128,
                     eos_token_ids=(0,))


def init_params(cfg: Config, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random params as the reference initialises them (A in [1, 16], dt in [1e-3, 0.1], D = 1), norms at one."""
    L, D, H, Di, Cv, K, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.conv_dim,
                             cfg.conv_kernel, cfg.vocab_size)
    E = Di + Cv + H
    ks = jax.random.split(key, 7)
    dt = jnp.exp(jax.random.uniform(ks[3], (L, H), minval=math.log(1e-3), maxval=math.log(0.1)))
    layers = {
        "norm": jnp.ones((L, D), dtype),
        "in_proj": (scale * jax.random.normal(ks[0], (L, E, D))).astype(dtype),
        "conv_weight": (jax.random.normal(ks[1], (L, Cv, K)) / math.sqrt(K)).astype(dtype),
        "dt_bias": (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype),  # inverse softplus
        "A_log": jnp.log(jax.random.uniform(ks[4], (L, H), minval=1.0, maxval=16.0)).astype(dtype),
        "D": jnp.ones((L, H), dtype),
        "gate_norm": jnp.ones((L, Di), dtype),
        "out_proj": (scale * jax.random.normal(ks[2], (L, D, Di))).astype(dtype),
    }
    if cfg.use_conv_bias:
        layers["conv_bias"] = jnp.zeros((L, Cv), dtype)
    if cfg.use_bias:
        layers["in_proj_bias"] = jnp.zeros((L, E), dtype)
        layers["out_proj_bias"] = jnp.zeros((L, D), dtype)
    params = {"embed": (scale * jax.random.normal(ks[5], (V, D))).astype(dtype), "layers": layers,
              "final_norm": jnp.ones((D,), dtype)}
    if not cfg.tie_embeddings:
        params["lm_head"] = (scale * jax.random.normal(ks[6], (V, D))).astype(dtype)
    return params


@functools.partial(jax.tree_util.register_dataclass, data_fields=["conv", "ssm", "lengths"], meta_fields=[])
@dataclasses.dataclass
class Mamba2Cache:
    """Recurrent state of every layer; its size does not depend on the context length.

    conv: [L, B, K-1, Cv] last conv inputs of each row; ssm: [L, B, H, P, N] fp32 (it accumulates
    over the whole context, so it stays fp32 whatever the cache dtype); lengths: [B] int32 tokens
    consumed per row.
    """

    conv: jax.Array
    ssm: jax.Array
    lengths: jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=["conv_in", "x", "dt", "B"], meta_fields=[])
@dataclasses.dataclass
class StateTrace:
    """Per-position SSM inputs of a multi-token forward, enough to rebuild the state after any prefix (`rewind`).

    conv_in: [L, B, T, Cv] conv inputs; x: [L, B, T, H, P] SSM inputs; dt: [L, B, T, H] discretized
    steps (0 at padding); B: [L, B, T, G, N]. About T (Cv + H P) floats per layer and row: far
    smaller than T copies of the state.
    """

    conv_in: jax.Array
    x: jax.Array
    dt: jax.Array
    B: jax.Array


def capabilities(cfg: Config) -> protocol.Capabilities:
    return protocol.Capabilities(name="Mamba-2", objective=protocol.CAUSAL_LM, mask_modes=frozenset({"causal"}),
                                 extras=frozenset(), rollback=protocol.ROLLBACK_TRACE, layer_skip=True)


def init_cache(cfg: Config, batch: int, max_len: int = 0, dtype=jnp.float32, *,
               per_layer: bool | None = None) -> Mamba2Cache:
    """Zero states for `batch` rows. `max_len` and `per_layer` are accepted for the protocol: the state
    is O(1) in the context and has one layout (a few KB per layer, read whole every step)."""
    del max_len, per_layer
    return Mamba2Cache(
        conv=jnp.zeros((cfg.num_layers, batch, cfg.conv_kernel - 1, cfg.conv_dim), dtype),
        ssm=jnp.zeros((cfg.num_layers, batch, cfg.num_heads, cfg.head_dim, cfg.state_size), jnp.float32),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def _gated_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, groups: int, eps: float) -> jax.Array:
    """RMSNorm of `y * silu(z)` over each of `groups` channel groups (Mamba-2's norm_before_gate=False): `[..., I]`."""
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    gated = gated.reshape(*gated.shape[:-1], groups, -1)  # [..., G, I/G]
    return nn.rms_norm(gated, weight.reshape(groups, -1), eps).reshape(y.shape).astype(y.dtype)


def _check_inputs(cfg: Config, tokens, positions, cache, valid) -> None:
    """API-edge validation: shapes always, token ids when they are concrete (not traced)."""
    require(tokens.ndim == 2, f"tokens must be [batch, time], got shape {tokens.shape}")
    require(positions.shape == tokens.shape, f"positions {positions.shape} must match tokens {tokens.shape}")
    require(valid is None or valid.shape == tokens.shape, f"valid {getattr(valid, 'shape', None)} must match "
            f"tokens {tokens.shape}")
    if cache is not None:
        require(cache.lengths.shape == (tokens.shape[0],),
                f"cache holds {cache.lengths.shape[0]} rows, tokens have {tokens.shape[0]}")
        require(cache.ssm.shape[0] == cfg.num_layers and cache.ssm.shape[2:] == (cfg.num_heads, cfg.head_dim,
                cfg.state_size), f"cache state {cache.ssm.shape} does not fit the config")
    if not isinstance(tokens, jax.core.Tracer) and tokens.size:
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
        require(0 <= lo and hi < cfg.vocab_size, f"token ids must be in [0, {cfg.vocab_size}), got [{lo}, {hi}]")


def _mixer(p: dict, cfg: Config, h: jax.Array, conv_state, ssm_state, valid: jax.Array, step: bool):
    """One Mamba-2 mixer on normed `h [B, T, D]`; returns `(out [B, T, D], conv_state, ssm_state, trace_parts)`.

    `step` (static) takes the O(1) path for T == 1: one conv window, one SSD recurrence step.
    """
    b, t, _ = h.shape
    Di, G, N, H, P = cfg.intermediate_size, cfg.n_groups, cfg.state_size, cfg.num_heads, cfg.head_dim
    zxbcdt = nn.dense("btd,ed->bte", h, p["in_proj"])  # [B, T, E]
    if cfg.use_bias:
        zxbcdt = zxbcdt + p["in_proj_bias"].astype(zxbcdt.dtype)
    z, conv_in, dt = jnp.split(zxbcdt, [Di, Di + cfg.conv_dim], axis=-1)  # [B, T, I], [B, T, Cv], [B, T, H]
    conv_bias = p.get("conv_bias")
    with jax.named_scope("conv"):
        if step:
            xbc, new_conv = causal_conv1d_step(conv_in[:, 0], p["conv_weight"], conv_bias, conv_state)
            new_conv = jnp.where(valid[:, :, None], new_conv, conv_state)  # frozen rows keep their window
            xbc = xbc[:, None]
        else:
            xbc, new_conv = causal_conv1d(conv_in, p["conv_weight"], conv_bias, conv_state, valid)
        xbc = jax.nn.silu(xbc)  # [B, T, Cv]
    x, B, C = jnp.split(xbc, [Di, Di + G * N], axis=-1)
    x = x.reshape(b, t, H, P)
    B, C = B.reshape(b, t, G, N), C.reshape(b, t, G, N)
    dt = jnp.where(valid[..., None], discretize_dt(dt, p["dt_bias"], cfg.dt_limit), 0.0)  # [B, T, H]
    A = -jnp.exp(p["A_log"].astype(jnp.float32))  # [H]
    with jax.named_scope("ssd"):
        if step:
            y, new_ssm = ssd_step(ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
            y = y[:, None]
        else:
            y, new_ssm = ssd_chunked(x, dt, A, B, C, cfg.chunk_size, ssm_state)
        y = y + p["D"].astype(y.dtype)[:, None] * x  # [B, T, H, P]
    with jax.named_scope("gate_out"):
        y = _gated_rms_norm(y.reshape(b, t, Di), z, p["gate_norm"], G, cfg.rms_norm_eps)
        out = nn.dense("bti,di->btd", y, p["out_proj"])
        if cfg.use_bias:
            out = out + p["out_proj_bias"].astype(out.dtype)
    return out, new_conv, new_ssm, (conv_in, x, dt, B)


def forward(
    params: dict,
    cfg: Config,
    tokens: jax.Array,
    positions: jax.Array,
    cache: Mamba2Cache | None = None,
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
    """Logits `[B, T, V]` (fp32; `[B, 1, V]` at each row's last valid token with logits="last") and
    the updated cache; with `trace`, also a `StateTrace` (for `rollback`).

    tokens, positions: [B, T] int32 (positions only checked: the recurrence carries order).
    `valid [B, T]` marks real tokens, a per-row prefix (right padding): padding gets dt = 0 and is
    kept out of the conv window, so it leaves every state as it was and `lengths` advances by
    `valid.sum(-1)`. A cache with T == 1 runs the O(1) step; anything else runs the chunked scan
    (starting from the cache's states if given). Only mask_mode "causal" exists for a recurrence, and
    no extras (`cache_visible`, `refill`, `tree_mask`, `cache_rows`): passing them raises `UnsupportedError`.
    """
    protocol.check_forward(capabilities(cfg), masks.as_mask_mode(mask_mode), cache_visible, tree_mask,
                           cache_rows, refill)
    _check_inputs(cfg, tokens, positions, cache, valid)
    require(cache is not None or not trace, "forward(..., trace=True) traces a cached forward (for rollback)")
    require(logits in ("all", "last"), f"logits must be 'all' or 'last', got {logits!r}")
    b, t = tokens.shape
    step = cache is not None and t == 1
    valid = jnp.ones((b, t), bool) if valid is None else valid.astype(bool)
    states = cache if cache is not None else init_cache(cfg, b)
    x = jnp.take(params["embed"], tokens, axis=0)  # [B, T, D]

    def layer(x, xs):
        p, conv_state, ssm_state = xs
        with jax.named_scope("mamba2_block"):
            h = nn.rms_norm(x, p["norm"], cfg.rms_norm_eps)
            out, conv_state, ssm_state, parts = _mixer(p, cfg, h, conv_state, ssm_state, valid, step)
        return x + out, (conv_state, ssm_state, parts if trace else None)

    layers = params["layers"]
    if isinstance(layers, dict):
        x, (conv, ssm, parts) = lax.scan(layer, x, (layers, states.conv, states.ssm))
    elif t <= FEW_TOKENS:  # per-layer weights: each matmul reads its own buffer (see `unstack_layers`)
        outs = []
        for i, p in enumerate(layers):
            x, out = layer(x, (p, states.conv[i], states.ssm[i]))
            outs.append(out)
        conv, ssm, parts = _stack(outs)
    else:  # prefill reads each weight many times over: stacking once keeps the scan (and its compile time)
        x, (conv, ssm, parts) = lax.scan(layer, x, (_stack(layers), states.conv, states.ssm))
    if logits == "last":  # each row's last valid token only (prefill)
        x = nn.last_valid(x, valid)
    out = nn.lm_head(params, cfg, nn.rms_norm(x, params["final_norm"], cfg.rms_norm_eps))
    new_cache = None
    if cache is not None:
        new_cache = Mamba2Cache(conv.astype(cache.conv.dtype), ssm, cache.lengths + valid.sum(-1, dtype=jnp.int32))
    if trace:
        return out, new_cache, StateTrace(*parts)
    return out, new_cache


def is_per_layer(params: dict) -> bool:
    return not isinstance(params["layers"], dict)


def unstack_layers(params: dict) -> dict:
    """Params with `layers` as a tuple of per-layer dicts: the fast layout for decode on XLA CPU.

    Inside a `lax.scan` each step's weights are a dynamic slice of the stacked arrays, which XLA
    CPU copies before every matmul; a decode step then moves each weight ~3 times and ran 2-4x
    slower than with one buffer per layer (measured on mamba2-130m geometry). `forward` takes
    either layout: the decode step loops over the tuple, prefill stacks it once and scans.
    """
    layers = params["layers"]
    if is_per_layer(params):
        return params
    return params | {"layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(len(layers["norm"])))}


def stack_layers(params: dict) -> dict:
    """The stacked `[L, ...]` layout (inverse of `unstack_layers`)."""
    layers = params["layers"]
    return params | {"layers": _stack(layers)} if is_per_layer(params) else params


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def rollback(params: dict, cfg: Config, before: Mamba2Cache, after: Mamba2Cache, trace: StateTrace,
             keep: jax.Array) -> Mamba2Cache:
    """The protocol's rollback: the state after only the first `keep [B]` tokens of a traced forward."""
    del after
    return rewind(params, cfg, before, trace, keep)


def skip_layers(params: dict, cfg: Config, skip) -> tuple[dict, Config]:
    """The model without the layers in `skip` (per-layer params; the kept layers' arrays are shared)."""
    kept = [i for i in range(cfg.num_layers) if i not in set(skip)]
    layers = unstack_layers(params)["layers"]
    return params | {"layers": tuple(layers[i] for i in kept)}, dataclasses.replace(cfg, num_layers=len(kept))


def rewind(params: dict, cfg: Config, cache: Mamba2Cache, trace: StateTrace, n: jax.Array) -> Mamba2Cache:
    """The cache after only the first `n [B]` of the T tokens a `forward(..., trace=True)` consumed.

    `cache` is the cache that forward started from (keep it: do not donate it), `trace` what it
    returned. Rolling back a rejected speculative draft costs O(T) state updates per layer and no
    weight reads: the conv window is re-cut and the SSM state rebuilt from the stored inputs with
    the steps past n set to dt = 0.
    """
    t = trace.dt.shape[2]
    n = n.astype(jnp.int32)
    keep = jnp.arange(t)[None, :, None] < n[:, None, None]  # [B, T, 1]

    def layer(inputs):
        A_log, conv, ssm, conv_in, x, dt, B = inputs
        padded = jnp.concatenate([conv, conv_in.astype(conv.dtype)], axis=1)  # [B, K-1+T, Cv]
        A = -jnp.exp(A_log.astype(jnp.float32))
        _, ssm = ssd_chunked(x, jnp.where(keep, dt, 0.0), A, B, B, t, ssm)  # outputs unused: C is a placeholder
        return window_after(padded, n, cfg.conv_kernel - 1), ssm

    layers = params["layers"]
    A_log = layers["A_log"] if isinstance(layers, dict) else jnp.stack([p["A_log"] for p in layers])  # [L, H]
    conv, ssm = lax.map(layer, (A_log, cache.conv, cache.ssm, trace.conv_in, trace.x, trace.dt, trace.B))
    return Mamba2Cache(conv, ssm, cache.lengths + n)

