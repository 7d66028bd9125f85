"""Llama-family decoder transformer (Llama, SmolLM2, Qwen2, Mistral; LLaDA-style dLLMs) as pure functions.

Implements the model protocol (`pdx.models.protocol`, `docs/model-protocol.md`):
    cfg = Config(...)                                     # frozen, static under jit
    params = init_params(cfg, key)                        # or pdx.io loaders
    cache = init_cache(cfg, batch, max_len, dtype)
    logits, cache = forward(params, cfg, tokens, positions, cache, mask_mode=..., valid=...)
Causal, bidirectional and block-causal attention; a KV cache rolled back by its lengths; with
`mask_token_id` set the config is a masked-diffusion LLM.

Params (layers stacked on a leading axis L and run with `lax.scan`, weights `[out, in]`):
    embed [V, D]; final_norm [D]; lm_head [V, D] (absent when tied)
    layers: attn_norm [L, D], wq [L, N*H, D], wk/wv [L, K*H, D], wo [L, D, N*H],
            bq [L, N*H], bk/bv [L, K*H] (attention_bias), bo [L, D] (attention_out_bias),
            mlp_norm [L, D], w_gate/w_up [L, F, D], w_down [L, D, F]
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pdx import masks
from pdx.errors import ConfigError, require
from pdx.kernels_pallas.attend import attend
from pdx.masks import CAUSAL, MaskMode
from pdx.models import layers as nn
from pdx.models import protocol
from pdx.models.layers import RopeScaling, lm_head, lm_head_rows  # noqa: F401 (protocol: hidden_states)


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False  # biases on q/k/v projections (Qwen2, Llama with attention_bias)
    attention_out_bias: bool = False  # bias on the output projection (Llama with attention_bias)
    # Sliding window per layer (0 = full attention); a tuple so the config stays hashable.
    layer_windows: tuple[int, ...] | None = None
    max_position_embeddings: int = 8192
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    mask_token_id: int | None = None  # set for masked-diffusion LLMs
    logit_shift: int = 0  # dLLMs: logits at position i predict the token at i + logit_shift (Dream, AR-initialised: 1)

    def __post_init__(self):
        require(self.num_heads % self.num_kv_heads == 0,
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})", ConfigError)
        require(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}", ConfigError)
        require(self.logit_shift in (0, 1), f"logit_shift must be 0 or 1, got {self.logit_shift}", ConfigError)
        if self.layer_windows is not None:
            require(len(self.layer_windows) == self.num_layers,
                    f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers", ConfigError)

    @property
    def windows(self) -> tuple[int, ...]:
        return self.layer_windows or (0,) * self.num_layers


SMOLLM2_135M = Config(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=8192,
    bos_token_id=1, eos_token_ids=(2,), pad_token_id=2,
)


def init_params(cfg: Config, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random normal params (std `scale`), norms at one: for tests and training from scratch."""
    L, D, F, N, K, H, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    shapes = {"wq": (L, N * H, D), "wk": (L, K * H, D), "wv": (L, K * H, D), "wo": (L, D, N * H),
              "w_gate": (L, F, D), "w_up": (L, F, D), "w_down": (L, D, F)}
    if cfg.attention_bias:
        shapes |= {"bq": (L, N * H), "bk": (L, K * H), "bv": (L, K * H)}
    if cfg.attention_out_bias:
        shapes["bo"] = (L, D)
    keys = jax.random.split(key, len(shapes) + 2)
    layers = {name: (scale * jax.random.normal(k, shape)).astype(dtype)
              for k, (name, shape) in zip(keys, shapes.items())}
    layers["attn_norm"] = jnp.ones((L, D), dtype)
    layers["mlp_norm"] = jnp.ones((L, D), dtype)
    params = {"embed": (scale * jax.random.normal(keys[-2], (V, D))).astype(dtype), "layers": layers,
              "final_norm": jnp.ones((D,), dtype)}
    if not cfg.tie_embeddings:
        params["lm_head"] = (scale * jax.random.normal(keys[-1], (V, D))).astype(dtype)
    return params


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "lengths"], meta_fields=[])
@dataclasses.dataclass
class KVCache:
    """Fixed-size KV cache. Slot s of a row holds the token at position s of that row.

    k, v: stacked `[L, B, K, S, H]` (for layers run by `lax.scan`) or a tuple of L per-layer
    `[B, K, S, H]` buffers (for unstacked params: each layer's attention then reads its own buffer
    in place; slicing a layer out of the stacked array is a copy on XLA CPU, which at batch 16 moved
    more bytes per step than the weights). lengths: [B] int32, the number of valid slots per row
    (also the next write offset). Rolling back is lowering `lengths`.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (list, tuple))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.per_layer else self.k.shape[3]


def capabilities(cfg: Config) -> protocol.Capabilities:
    return protocol.Capabilities(
        name="a Llama-family transformer",
        objective=protocol.CAUSAL_LM if cfg.mask_token_id is None else protocol.MASKED_DIFFUSION,
        mask_modes=frozenset(protocol.MASK_KINDS), extras=frozenset(protocol.EXTRAS), rollback=protocol.ROLLBACK_KV,
        layer_skip=True, hidden_states=True, int8_weights=True, logit_shift=cfg.logit_shift)


def init_cache(cfg: Config, batch: int, max_len: int, dtype=jnp.float32, *, per_layer: bool | None = None) -> KVCache:
    """An empty cache; `per_layer` (default: on CPU, matching `pdx.load_model`'s unstacked params)
    picks per-layer buffers over one stacked array."""
    per_layer = jax.default_backend() == "cpu" if per_layer is None else per_layer
    shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    if per_layer:
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                       jnp.zeros((batch,), jnp.int32))
    shape = (cfg.num_layers, *shape)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def _write_rows(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write `new [..., B, K, T, H]` into `buf [..., B, K, S, H]` at slot `starts[b]` of each row
    (leading layer axis optional, the same on both)."""
    # A scatter (not a vmap of dynamic_update_slice, which moves the batch axis and makes XLA CPU
    # copy the whole cache): rows b, slots starts[b] + t.
    *lead, n_rows, _, t, _ = new.shape
    if not lead and n_rows == 1:
        # XLA turns a one-row scatter into a dynamic-update-slice, which it then copies the whole
        # buffer around (3 cache copies per layer per step measured); an out-of-range second row,
        # dropped, keeps it a scatter that updates in place.
        new, starts = jnp.concatenate([new, new]), jnp.concatenate([starts, starts])
        n_rows = 2
    rows = jnp.arange(n_rows)[:, None]  # [B, 1]
    slots = starts[:, None] + jnp.arange(t)  # [B, T]
    if not lead:
        return buf.at[rows, :, slots].set(new.astype(buf.dtype).transpose(0, 2, 1, 3), mode="drop")  # [B, T, K, H]
    values = new.astype(buf.dtype).transpose(1, 3, 0, 2, 4)  # [B, T, L, K, H]
    return buf.at[:, rows, :, slots].set(values, mode="drop")


def _write_packed(buf: jax.Array, new: jax.Array, rows: jax.Array, slots: jax.Array) -> jax.Array:
    """Write packed keys `new [1, K, T, H]` into `buf [B, K, S, H]`: key t at slot `slots[t]` of row
    `rows[t]` (out of range: dropped)."""
    return buf.at[rows, :, slots].set(new[0].astype(buf.dtype).transpose(1, 0, 2), mode="drop")  # [T, K, H]


def _packed_rows(cache_rows: jax.Array, valid: jax.Array, n_rows: int) -> jax.Array:
    """`cache_rows [1, T]` as write targets `[T]`: padding and out-of-range rows go to `n_rows` (dropped;
    a negative index would wrap)."""
    rows = cache_rows[0]
    return jnp.where(valid[0] & (rows >= 0) & (rows < n_rows), rows, n_rows)


def _cache_layout(cache: KVCache, per_layer: bool) -> tuple:
    """(k, v) of `cache` in the layout the params' layout runs on (a copy only on a mismatch)."""
    if cache.per_layer == per_layer:
        return cache.k, cache.v
    if per_layer:
        return tuple(cache.k), tuple(cache.v)  # iterating a stacked array slices its layers
    return jnp.stack(cache.k), jnp.stack(cache.v)


def hidden_states(
    params: dict,
    cfg: Config,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | None = None,
    *,
    mask_mode: str | MaskMode = CAUSAL,
    valid: jax.Array | None = None,
    cache_visible: jax.Array | None = None,
    refill: bool = False,
    tree_mask: jax.Array | None = None,
    cache_rows: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states `[B, T, D]` and the updated cache.

    tokens, positions: [B, T] int32. `valid [B, T]` marks real tokens (False for padding; default
    all): padding is never attended to. With a cache, the T new keys are written at slots
    `cache.lengths[b] ...`, every query also sees the cached slots `< lengths[b]` (cached slot s
    holds position s), and `lengths` advances by the number of valid tokens, so `valid` must be a
    per-row prefix (right padding) there; the padding's slots are overwritten by later writes.
    `cache_visible [B, S]` (optional) replaces `slot < lengths[b]` as the set of cached slots the
    queries see, e.g. a dLLM dual cache that also attends to cached suffix slots past the write offset.
    `refill` (static, with a cache): the tokens attend only among themselves, as with no cache, and are
    written to it: a dLLM cache refresh, which skips the attention over cached slots it cannot see.
    `tree_mask [B, T, T]` (optional) is ANDed with the visibility among the new tokens: speculative tree
    verification, where each node (position = prefix length + depth) sees only its ancestors.
    `cache_rows [1, T]` (optional, causal, with a cache): packed tokens of several cache rows in one
    sequence, token t of row `cache_rows[0, t]` (-1: padding) at position = slot `positions[0, t]`;
    its key is written there and it sees that row's slots up to its own, so one forward prefills
    uneven prompts without padding each to the longest. Each row's tokens must continue it
    (`lengths[r]` becomes its last written position + 1).
    """
    mode = masks.as_mask_mode(mask_mode)
    b, t = tokens.shape
    packed = cache_rows is not None
    require(not refill or (cache is not None and cache_visible is None and tree_mask is None and not packed),
            "refill writes a fresh pass into a cache: it needs a cache and takes no cache_visible, tree_mask or "
            "cache_rows")
    if packed:
        require(cache is not None and mode.kind == "causal" and b == 1 and cache_visible is None
                and tree_mask is None and cache_rows.shape == tokens.shape,
                f"cache_rows [1, T] packs causal tokens into a cache (no cache_visible or tree_mask); got "
                f"tokens {tokens.shape}, cache_rows {cache_rows.shape}, mask {mode.kind}, cache {cache is not None}")
    x = nn.embed(params["embed"], tokens)  # [B, T, D]
    cos, sin = nn.rope_tables(positions, nn.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    if valid is None:
        valid = jnp.ones((b, t), bool)
    rows = _packed_rows(cache_rows, valid, cache.lengths.shape[0]) if packed else None  # [T]
    windows = jnp.asarray(cfg.windows, jnp.int32)  # [L]

    def project(x, p):
        """q [B, T, N, H] and the new k, v [B, K, T, H] of one layer."""
        h = nn.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
        # 2-D [out, in] weights: with [N, H, D] weights XLA CPU transposes them every step
        if "wqkv" in p:  # fused (see `fuse_layer`)
            qkv = nn.dense("btd,fd->btf", h, p["wqkv"])  # [B, T, (N+2K)*H]
            if cfg.attention_bias:
                qkv = qkv + p["bqkv"].astype(qkv.dtype)
            q, k, v = jnp.split(qkv, [cfg.num_heads * cfg.head_dim, (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim],
                                axis=-1)
        else:
            q = nn.dense("btd,fd->btf", h, p["wq"])  # [B, T, N*H]
            k = nn.dense("btd,fd->btf", h, p["wk"])  # [B, T, K*H]
            v = nn.dense("btd,fd->btf", h, p["wv"])
            if cfg.attention_bias:
                q, k, v = q + p["bq"].astype(q.dtype), k + p["bk"].astype(k.dtype), v + p["bv"].astype(v.dtype)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)  # [B, T, N, H]
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [B, T, K, H]
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = nn.apply_rope(q, cos, sin), nn.apply_rope(k, cos, sin)
        return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def finish(x, p, window, q, k, v, cached, written):
        """Attention over the cached slots (k, v [B, K, S, H]) and the new keys, then the MLP.

        written: the new keys are already in the cached buffers (at slots lengths[b]...)."""
        with jax.named_scope("attention"):
            in_cache = written and cached is not None and cache_visible is None and tree_mask is None
            o = attend(q, k, v, positions, valid, mode, window, None if cached is None else (*cached, cache.lengths),
                       cache_visible=cache_visible, new_in_cache=in_cache, new_mask=tree_mask, rows=rows)
            o = nn.dense("btf,df->btd", o.reshape(b, t, -1), p["wo"])
            x = x + (o + p["bo"].astype(o.dtype) if cfg.attention_out_bias else o)
        with jax.named_scope("mlp"):
            h = nn.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
            if "w_gate_up" in p:
                return x + nn.swiglu(h, p["w_gate_up"], None, p["w_down"])
            return x + nn.swiglu(h, p["w_gate"], p["w_up"], p["w_down"])

    def write(buf, new):  # one layer's new keys or values into its cache buffer
        return _write_packed(buf, new, rows, positions[0]) if packed else _write_rows(buf, new, cache.lengths)

    layers = params["layers"]
    per_layer = isinstance(layers, (list, tuple))
    ck, cv = (None, None) if cache is None else _cache_layout(cache, per_layer)
    if per_layer:  # unstacked (see `unstack_layers`): unrolled over separate arrays
        ck, cv = (None, None) if cache is None else (list(ck), list(cv))
        for i, p in enumerate(layers):
            q, k, v = project(x, p)
            cached = None
            if cache is not None:
                # Write this layer's new keys before its attention reads the buffer: a read after the
                # write lets XLA update the buffer in place (reading first and writing after copied it).
                ck[i], cv[i] = write(ck[i], k), write(cv[i], v)
                cached = (ck[i], cv[i])
            x = finish(x, p, windows[i], q, k, v, None if refill else cached, written=True)
        ck, cv = (None, None) if cache is None else (tuple(ck), tuple(cv))
    else:

        def layer(x, xs):
            p, window, cached = xs
            q, k, v = project(x, p)
            if packed:  # attention reads the keys from the cache: write this layer's first, return it whole
                cached = (write(cached[0], k), write(cached[1], v))
                return finish(x, p, window, q, k, v, cached, written=True), cached
            return finish(x, p, window, q, k, v, None if refill else cached, written=False), (k, v)

        x, (new_k, new_v) = lax.scan(layer, x, (layers, windows, None if cache is None else (ck, cv)))
        if packed:  # new_k: the whole [L, B, K, S, H] cache
            ck, cv = new_k, new_v
        elif cache is not None:  # new_k: [L, B, K, T, H]
            ck, cv = _write_rows(ck, new_k, cache.lengths), _write_rows(cv, new_v, cache.lengths)
    x = nn.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if cache is not None:
        if cache.per_layer != per_layer:
            ck, cv = _cache_layout(KVCache(ck, cv, cache.lengths), cache.per_layer)
        if packed:
            lengths = cache.lengths.at[rows].max(positions[0] + 1, mode="drop")
        else:
            lengths = cache.lengths + valid.sum(-1, dtype=jnp.int32)
        cache = KVCache(ck, cv, lengths)
    return x, cache


# Per-layer matrices that read the same input, concatenated along the output axis by `fuse_layer`.
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}


def _concat_rows(ws: list):
    """Concatenate `[out_i, ...]` weights (or `QuantizedWeight`s, whose per-channel scales follow) along `out`."""
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *ws)


def fuse_layer(p: dict) -> dict:
    """One layer's params with q/k/v (and their biases) and gate/up each as one matrix: on XLA CPU a
    decode step is bound by per-op overhead as much as by bytes, and one larger gemv streams faster
    than three small ones (measured 13% less matmul time per SmolLM2 step)."""
    out = {k: v for k, v in p.items() if not any(k in parts for parts in FUSED.values())}
    for name, parts in FUSED.items():
        if all(part in p for part in parts):
            out[name] = _concat_rows([p[part] for part in parts])
    return out


def _split_rows(w, cuts: list[int]) -> list:
    """Inverse of `_concat_rows`: pieces of `w` cut along `out` at `cuts`."""
    leaves, treedef = jax.tree.flatten(w)
    pieces = [jnp.split(leaf, cuts, axis=0) for leaf in leaves]
    return [treedef.unflatten([p[i] for p in pieces]) for i in range(len(cuts) + 1)]


def split_layer(p: dict) -> dict:
    """Inverse of `fuse_layer` (the q width is `wo`'s input width; k and v share the rest)."""
    out = {k: v for k, v in p.items() if k not in FUSED}
    q_width = p["wo"].shape[1]
    for name, parts in FUSED.items():
        if name in p:
            rows = p[name].shape[0]
            cuts = [rows // 2] if name == "w_gate_up" else [q_width, q_width + (rows - q_width) // 2]
            out |= dict(zip(parts, _split_rows(p[name], cuts)))
    return out


def is_per_layer(params: dict) -> bool:
    return isinstance(params["layers"], (list, tuple))


def unstack_layers(params: dict) -> dict:
    """Params with `layers` as a list of per-layer dicts of separate arrays, q/k/v and gate/up fused
    (`fuse_layer`).

    XLA CPU copies each layer's weights out of a stacked array when `lax.scan` slices them (a
    dynamic-slice fusion per weight per step), tripling the memory traffic of a decode step;
    separate arrays, run by an unrolled loop, are read in place (3x faster decode measured on
    SmolLM2). Stacked params (scan, compile time independent of depth) remain the canonical form.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return params | {"layers": [fuse_layer(jax.tree.map(lambda a, i=i: a[i], layers)) for i in range(n)]}


def stack_layers(params: dict) -> dict:
    """Inverse of `unstack_layers`."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    return params | {"layers": jax.tree.map(lambda *a: jnp.stack(a), *[split_layer(p) for p in layers])}


def forward(
    params: dict,
    cfg: Config,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache | None = None,
    *,
    mask_mode: str | MaskMode = CAUSAL,
    valid: jax.Array | None = None,
    cache_visible: jax.Array | None = None,
    refill: bool = False,
    tree_mask: jax.Array | None = None,
    cache_rows: jax.Array | None = None,
    logits: str = "all",
    trace: bool = False,
):
    """Logits (fp32) and the updated cache (and a `None` trace with `trace=True`: a KV cache rolls
    back by its lengths alone); see `hidden_states`.

    logits (static): "all" -> `[B, T, V]`; "last" -> `[B, 1, V]` at each row's last valid token
    only (prefill needs no more, and the LM head is a fifth of a SmolLM2 prefill's FLOPs); with
    `cache_rows`, `[R, 1, V]` at the last token of each of the cache's R rows (position 0's for a row
    with none)."""
    require(logits in ("all", "last"), f"logits must be 'all' or 'last', got {logits!r}")
    x, new_cache = hidden_states(params, cfg, tokens, positions, cache, mask_mode=mask_mode, valid=valid,
                                 cache_visible=cache_visible, refill=refill, tree_mask=tree_mask,
                                 cache_rows=cache_rows)
    if logits == "last" and cache_rows is not None:
        n_rows = cache.lengths.shape[0]
        rows = _packed_rows(cache_rows, jnp.ones_like(cache_rows, bool) if valid is None else valid, n_rows)
        last = jnp.zeros((n_rows,), jnp.int32).at[rows].max(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                                             mode="drop")
        x = x[0, last][:, None]  # [R, 1, D]
    elif logits == "last":
        x = nn.last_valid(x, valid)
    cache = new_cache
    out = lm_head(params, cfg, x)
    return (out, cache, None) if trace else (out, cache)


def rollback(params: dict, cfg: Config, before: KVCache, after: KVCache, trace, keep: jax.Array) -> KVCache:
    """`after` keeping only the first `keep [B]` tokens of the forward that started at `before`: slots
    past `lengths` are never read, so lowering it is the whole rollback."""
    del params, cfg, trace
    return dataclasses.replace(after, lengths=before.lengths + keep.astype(jnp.int32))


def skip_layers(params: dict, cfg: Config, skip) -> tuple[dict, Config]:
    """The model without the layers in `skip` (per-layer params; the kept layers' arrays are shared)."""
    kept = [i for i in range(cfg.num_layers) if i not in set(skip)]
    params = unstack_layers(params)
    windows = tuple(cfg.windows[i] for i in kept) if cfg.layer_windows else None
    return (params | {"layers": [params["layers"][i] for i in kept]},
            dataclasses.replace(cfg, num_layers=len(kept), layer_windows=windows))
