"""Shared machinery of the attention kernels: the path switch, input checks, the blocked
online-softmax Pallas kernel (one body for prefill and split decode) and the softmax merge.

Two layouts of the same tile update (`online_update`):
- "tpu" (Mosaic): grid (batch, head, query block, split, key block). The key axis is the innermost,
  sequential ("arbitrary") axis; running max, sum and output live in VMEM scratch across it, as in
  jax's TPU flash attention. Skipped tiles repeat the last live key block index (scalar-prefetched),
  so the pipeline issues no DMA for them.
- "gpu" (Triton): grid (batch, head, query block, split); each program loops over the key blocks of
  its split with `fori_loop`, skipping dead tiles with `lax.cond`, as in jax's GPU attention.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pdx.errors import require
from pdx.kernels_pallas.block_mask import fetch_index
from pdx.masks import NEG_INF, MaskMode, pair_visible

HEAD_DIMS = (64, 128)  # head dims the kernels are built and tested for (MXU/lane friendly)
IMPLS = ("auto", "reference", "pallas")

_impl = [os.environ.get("PDX_ATTENTION_IMPL", "auto")]


def set_impl(impl: str) -> None:
    """Set the attention path for every later trace: 'auto' (by backend), 'reference' or 'pallas'."""
    require(impl in IMPLS, f"attention impl must be one of {IMPLS}, got {impl!r}")
    _impl[0] = impl


def get_impl() -> str:
    """The attention path the next trace takes ('auto', 'reference' or 'pallas'): part of every compile key."""
    return _impl[0]


@contextlib.contextmanager
def use_impl(impl: str):
    """Context manager form of `set_impl`. The switch is read at trace time: functions traced before
    (cached by `jax.jit`) keep the path they were traced with, so trace a fresh function inside it."""
    previous = _impl[0]
    set_impl(impl)
    try:
        yield
    finally:
        _impl[0] = previous


def resolve(impl: str | None, q: jax.Array) -> tuple[str, bool]:
    """(path, interpret) for an `impl` argument (None: the module setting), queries `q [..., H]` and
    the default backend.

    'auto' runs Pallas on TPU (Mosaic) when the kernels support the head dim and dtype, and the jnp
    reference otherwise: XLA fuses the reference well on CPU, and the Triton layout has not yet been
    compiled on a GPU (force 'pallas' there to use it). A forced 'pallas' on CPU runs in interpret
    mode, which is how the kernels are tested; unsupported shapes then raise `InvalidInputError`.
    """
    impl = _impl[0] if impl is None else impl
    require(impl in IMPLS, f"attention impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        fits = q.shape[-1] in HEAD_DIMS and q.dtype in (jnp.float32, jnp.bfloat16)
        impl = "pallas" if backend == "tpu" and fits else "reference"
    return impl, impl == "pallas" and backend not in ("tpu", "gpu")


def layout(variant: str | None) -> str:
    """Kernel layout: 'tpu' (Mosaic grid) or 'gpu' (Triton loop); default: the backend's ('tpu' on CPU)."""
    variant = variant or ("gpu" if jax.default_backend() == "gpu" else "tpu")
    require(variant in ("tpu", "gpu"), f"kernel variant must be 'tpu' or 'gpu', got {variant!r}")
    return variant


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def tile(n: int, block: int, variant: str) -> int:
    """Tile size for a length `n` given the requested `block`: no bigger than the padded length;
    a multiple of 8 on TPU, a power of two >= 16 for Triton."""
    if variant == "gpu":
        return min(block, max(16, 1 << (n - 1).bit_length()))
    return min(block, round_up(n, 8))


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, int, int, int, int, int]:
    """Validate `q [B, T, N, H]`, `k/v [B, K, S, H]` for the kernels; returns (B, T, N, H, K, S)."""
    require(q.ndim == 4 and k.ndim == 4, f"expected q [B, T, N, H] and k, v [B, K, S, H]; got {q.shape}, {k.shape}")
    require(k.shape == v.shape, f"k and v must have the same shape, got {k.shape} and {v.shape}")
    b, t, n, h = q.shape
    kb, kh, s, kd = k.shape
    require(kb == b and kd == h, f"k/v {k.shape} do not match q {q.shape} in batch or head_dim")
    require(n % kh == 0, f"query heads ({n}) must be a multiple of KV heads ({kh})")
    require(h in HEAD_DIMS, f"head_dim must be one of {HEAD_DIMS} for the Pallas kernels, got {h} (impl='reference')")
    for x in (q, k, v):
        require(x.dtype in (jnp.float32, jnp.bfloat16), f"the kernels take float32 or bfloat16, got {x.dtype}")
    return b, t, n, h, kh, s


def check_blocks(block_q: int, block_k: int, interpret: bool, variant: str) -> None:
    """Block sizes: multiples of 8 (sublanes). Compiled, the TPU key block is a multiple of 128 (lanes)
    and Triton tiles are powers of two >= 16. Compiled kernels need their backend (no CPU lowering)."""
    require(block_q > 0 and block_q % 8 == 0, f"block_q must be a positive multiple of 8, got {block_q}")
    require(block_k > 0 and block_k % 8 == 0, f"block_k must be a positive multiple of 8, got {block_k}")
    if interpret:
        return
    backend = jax.default_backend()
    require(backend == variant, f"the compiled '{variant}' attention kernel needs a {variant.upper()} backend, this "
                                f"is {backend!r}: pass interpret=True or use dispatch")
    if variant == "tpu":
        require(block_k % 128 == 0, f"on TPU block_k must be a multiple of 128 (the lane width), got {block_k}")
    else:
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            require(size >= 16 and size & (size - 1) == 0, f"on GPU {name} must be a power of two >= 16, got {size}")


def check_shape(name: str, x: jax.Array | None, shape: tuple[int, ...]) -> None:
    if x is not None:
        require(x.shape == shape, f"{name} must have shape {shape}, got {x.shape}")


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pad `x` along `axis` up to `size` (static shapes: lengths not divisible by the block)."""
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def online_update(q, k, v, visible, m_prev, l_prev, acc_prev):
    """One tile of online softmax: scores `q [bq, H] . k [bk, H]`, masked by `visible [bq, bk]`,
    folded into the running max `m`, sum `l` `[bq, 1]` and unnormalized output `acc [bq, H]` (fp32)."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [bq, bk]
    s = jnp.where(visible, s, NEG_INF)
    m = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    alpha = jnp.exp(m_prev - m)
    total = alpha * l_prev + p.sum(axis=-1, keepdims=True)
    acc = alpha * acc_prev + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m, total, acc


def finalize(m, total, acc):
    """Normalized output and log-sum-exp from the running max, sum and output; rows that saw no key
    give 0 and lse NEG_INF."""
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    return acc / total, jnp.where(seen, m + jnp.log(total), NEG_INF)


def _kernel(live_ref, fetch_ref, scalars_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, kvalid_ref, *rest,
            mode: MaskMode, scale: float, steps: int, has_mask: bool):
    mask_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = (rest[0], rest[1:]) if has_mask else (None, rest)
    b, i, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(live_ref[b, i, split * steps + j] != 0)
    def _update():
        visible = pair_visible(qpos_ref[...], kpos_ref[...], mode, scalars_ref[0], scalars_ref[1])  # [bq, bk]
        visible &= kvalid_ref[...] != 0
        if has_mask:
            visible &= mask_ref[...] != 0
        q = q_ref[...] * jnp.asarray(scale, q_ref.dtype)  # scaled in its dtype, as the reference does
        m, total, acc = online_update(q, k_ref[...], v_ref[...], visible, m_sc[...], l_sc[...], acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = m, total, acc

    @pl.when(j == steps - 1)
    def _finish():
        o, lse = finalize(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _gpu_kernel(live_ref, scalars_ref, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, kvalid_ref, *rest,
                mode: MaskMode, scale: float, steps: int, block_k: int, has_mask: bool):
    """One (batch, head, query block, split) program: loop over the split's key blocks in registers."""
    mask_ref, (o_ref, lse_ref) = (rest[0], rest[1:]) if has_mask else (None, rest)
    q = q_ref[...] * jnp.asarray(scale, q_ref.dtype)  # [bq, H]
    q_pos, window, sinks = qpos_ref[...], scalars_ref[0], scalars_ref[1]  # [bq, 1]

    def tile(j, carry):
        def update(carry):
            keys = pl.ds(j * block_k, block_k)
            visible = pair_visible(q_pos, kpos_ref[:, keys], mode, window, sinks) & (kvalid_ref[:, keys] != 0)
            if has_mask:
                visible &= mask_ref[:, keys] != 0
            return online_update(q, k_ref[keys, :], v_ref[keys, :], visible, *carry)

        return jax.lax.cond(live_ref[j] != 0, update, lambda c: c, carry)

    bq, h = q.shape
    init = (jnp.full((bq, 1), NEG_INF, jnp.float32), jnp.zeros((bq, 1), jnp.float32), jnp.zeros((bq, h), jnp.float32))
    o, lse = finalize(*jax.lax.fori_loop(0, steps, tile, init))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    k_valid: jax.Array,
    mask: jax.Array | None,
    live: jax.Array,
    window: jax.Array | int,
    sinks: jax.Array | int,
    *,
    mode: MaskMode,
    block_q: int,
    block_k: int,
    num_splits: int,
    out_dtype,
    interpret: bool,
    variant: str,
) -> tuple[jax.Array, jax.Array]:
    """The Pallas call. q [B, Nq, T, H] (query head n reads KV head n // (Nq / K)), k, v [B, K, S, H];
    q_pos [B, T], k_pos, k_valid [B, S]; mask [B, T, S] or None; live [B, T/bq, S/bk] from `block_map`.
    T and S are multiples of the blocks, S/bk of `num_splits`. Returns o [B, Nq, splits, T, H] and
    lse [B, Nq, splits, T, 1] (fp32), one softmax partial per split of the keys. `variant`: see `layout`.
    """
    b, nq_heads, t, h = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    groups = nq_heads // kv_heads
    steps = s // block_k // num_splits
    args = [q, k, v, q_pos.astype(jnp.int32)[:, :, None], k_pos.astype(jnp.int32)[:, None, :],
            k_valid.astype(jnp.int32)[:, None, :]] + ([] if mask is None else [mask.astype(jnp.int32)])
    scalars = jnp.stack([jnp.asarray(window, jnp.int32), jnp.asarray(sinks, jnp.int32)])
    out_shape = [jax.ShapeDtypeStruct((b, nq_heads, num_splits, t, h), out_dtype),
                 jax.ShapeDtypeStruct((b, nq_heads, num_splits, t, 1), jnp.float32)]
    out_map = lambda bi, n, i, sp, *_: (bi, n, sp, i, 0)  # noqa: E731  (both grids; TPU adds j and refs)
    out_specs = [pl.BlockSpec((None, None, None, block_q, h), out_map),
                 pl.BlockSpec((None, None, None, block_q, 1), out_map)]
    scale = 1.0 / math.sqrt(h)
    if variant == "gpu":
        split = s // num_splits  # each program holds its split of the keys and loops over its tiles
        in_specs = [
            pl.BlockSpec((None, None, steps), lambda bi, n, i, sp: (bi, i, sp)),
            pl.BlockSpec((2,), lambda bi, n, i, sp: (0,)),
            pl.BlockSpec((None, None, block_q, h), lambda bi, n, i, sp: (bi, n, i, 0)),
            pl.BlockSpec((None, None, split, h), lambda bi, n, i, sp: (bi, n // groups, sp, 0)),
            pl.BlockSpec((None, None, split, h), lambda bi, n, i, sp: (bi, n // groups, sp, 0)),
            pl.BlockSpec((None, block_q, 1), lambda bi, n, i, sp: (bi, i, 0)),
            pl.BlockSpec((None, 1, split), lambda bi, n, i, sp: (bi, 0, sp)),
            pl.BlockSpec((None, 1, split), lambda bi, n, i, sp: (bi, 0, sp)),
        ] + ([] if mask is None else [pl.BlockSpec((None, block_q, split), lambda bi, n, i, sp: (bi, i, sp))])
        kernel = functools.partial(_gpu_kernel, mode=mode, scale=scale, steps=steps, block_k=block_k,
                                   has_mask=mask is not None)
        return pl.pallas_call(kernel, grid=(b, nq_heads, t // block_q, num_splits), in_specs=in_specs,
                              out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                              compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
                              name="pdx_blocked_attention_gpu")(live.astype(jnp.int32), scalars, *args)
    fetch = fetch_index(live)  # [B, T/bq, S/bk] key block to DMA at each step

    def kv_map(bi, n, i, sp, j, live_ref, fetch_ref, scalars_ref):
        return bi, n // groups, fetch_ref[bi, i, sp * steps + j], 0

    def kpos_map(bi, n, i, sp, j, live_ref, fetch_ref, scalars_ref):
        return bi, 0, fetch_ref[bi, i, sp * steps + j]

    in_specs = [
        pl.BlockSpec((None, None, block_q, h), lambda bi, n, i, sp, j, *_: (bi, n, i, 0)),
        pl.BlockSpec((None, None, block_k, h), kv_map),
        pl.BlockSpec((None, None, block_k, h), kv_map),
        pl.BlockSpec((None, block_q, 1), lambda bi, n, i, sp, j, *_: (bi, i, 0)),
        pl.BlockSpec((None, 1, block_k), kpos_map),
        pl.BlockSpec((None, 1, block_k), kpos_map),
    ]
    if mask is not None:
        in_specs.append(pl.BlockSpec(
            (None, block_q, block_k),
            lambda bi, n, i, sp, j, live_ref, fetch_ref, _: (bi, i, fetch_ref[bi, i, sp * steps + j])))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, nq_heads, t // block_q, num_splits, steps),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32), pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, h), jnp.float32)],
    )
    kernel = functools.partial(_kernel, mode=mode, scale=scale, steps=steps, has_mask=mask is not None)
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="pdx_blocked_attention",
    )(live.astype(jnp.int32), fetch, scalars, *args)


def merge(o: jax.Array, lse: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Merge softmax partials over `axis`: `o [..., H]` (normalized per partial) and `lse` (no H axis,
    `o.ndim - 1` dims). Partials that saw no key carry lse NEG_INF and weigh nothing."""
    total = jax.nn.logsumexp(lse, axis=axis, keepdims=True)
    weights = jnp.exp(lse - total)[..., None]
    return (weights * o.astype(jnp.float32)).sum(axis), jnp.squeeze(total, axis)
