"""Flash attention: the Pallas kernel (interpret mode) against the models' reference attention.

Tolerances: fp32 atol 2e-5, bf16 atol 3e-2 (see helpers.ATOL); gradients fp32 atol 1e-4.
Rows that see no key at all are excluded (kernel: 0, reference: mean of v; both padding).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdx import masks
from pdx.errors import InvalidInputError
from pdx.kernels_pallas import _core, use_impl
from pdx.kernels_pallas import flash_attention as fa
from pdx.kernels_pallas.block_mask import block_map, skip_stats
from pdx.masks import BIDIRECTIONAL, CAUSAL, MaskMode
from tests.kernels_pallas.helpers import ATOL, assert_close, qkv

F32, BF16 = jnp.float32, jnp.bfloat16
BC16, BC8 = MaskMode("block_causal", 16), MaskMode("block_causal", 8)

SLOW = pytest.mark.slow  # interpret mode compiles each shape for ~3-10 s: the rest run with -m slow

# name: (B, T, S, N, K, H, dtype, mode, window, sinks, key lengths per row, first query position, block_q, block_k)
CASES = {
    "causal-mha-ragged": (2, 100, 100, 2, 2, 64, F32, CAUSAL, 0, 0, [100, 61], 0, 32, 32),
    "causal-gqa2-h128-chunk": (1, 40, 100, 4, 2, 128, F32, CAUSAL, 0, 0, [100], 60, 16, 32),
    "bidirectional-gqa4-ragged": (2, 72, 72, 8, 2, 64, F32, BIDIRECTIONAL, 0, 0, [72, 50], 0, 32, 64),
    "block-causal-gqa2-ragged": (2, 90, 90, 4, 2, 64, F32, BC16, 0, 0, [90, 70], 0, 32, 32),
    "window-sinks-gqa2": (1, 128, 128, 4, 2, 64, F32, CAUSAL, 24, 4, [128], 0, 32, 32),
    "bidirectional-window-mqa": (1, 64, 64, 2, 1, 128, F32, BIDIRECTIONAL, 16, 0, [64], 0, 32, 32),
    "bf16-causal-gqa4-h128": (1, 96, 96, 8, 2, 128, BF16, CAUSAL, 0, 0, [96], 0, 32, 32),
    "bf16-block-causal-h64-ragged": (2, 64, 64, 2, 2, 64, BF16, BC8, 0, 0, [64, 40], 0, 32, 32),
}


def _inputs(b, t, s, n, kv, h, dtype, lengths, q_start, seed=0):
    q, k, v = qkv(b, t, s, n, kv, h, dtype, seed)
    q_pos = jnp.broadcast_to(q_start + jnp.arange(t, dtype=jnp.int32), (b, t))
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return q, k, v, q_pos, k_pos, k_pos < jnp.asarray(lengths)[:, None]


def _seen(q_pos, k_pos, k_valid, mode, window, sinks, mask=None):
    """[B, T]: rows that see at least one key."""
    visible = masks.visibility(q_pos, k_pos, k_valid, mode, window, sinks)
    return (visible if mask is None else visible & mask).any(-1)


SLOW_CASES = {"causal-gqa2-h128-chunk", "bidirectional-window-mqa", "bf16-block-causal-h64-ragged",
              "block-causal-gqa4-window-sinks", "tree"}


def _params(cases, *extra):
    """pytest params (name, *extra) per case, the ones in SLOW_CASES marked slow."""
    return [pytest.param(name, *extra, marks=[SLOW] if name in SLOW_CASES else []) for name in cases]


GPU_CASES = ["window-sinks-gqa2", "bf16-block-causal-h64-ragged"]


@pytest.mark.parametrize("case, variant", _params(CASES, "tpu") + _params(GPU_CASES, "gpu"))
def test_forward_matches_reference(case, variant):
    """Both kernel layouts: 'tpu' (Mosaic grid with scratch) and 'gpu' (Triton loop over key tiles)."""
    b, t, s, n, kv, h, dtype, mode, window, sinks, lengths, q_start, bq, bk = CASES[case]
    q, k, v, q_pos, k_pos, k_valid = _inputs(b, t, s, n, kv, h, dtype, lengths, q_start)
    arrays = (q, k, v, q_pos, k_pos, k_valid)
    kernel = jax.jit(lambda *a, window, sinks: fa.pallas(*a, mode, window, sinks, block_q=bq, block_k=bk,
                                                         return_lse=True, interpret=True, variant=variant))
    ours, lse = kernel(*arrays, window=window, sinks=sinks)  # window and sinks traced, as in the models
    ref, ref_lse = fa.reference(*arrays, mode, window, sinks, return_lse=True)
    assert ours.shape == q.shape and ours.dtype == dtype and lse.shape == (b, t, n)
    rows = _seen(q_pos, k_pos, k_valid, mode, window, sinks)
    assert_close(ours, ref, dtype, rows)
    np.testing.assert_allclose(np.asarray(lse)[np.asarray(rows)], np.asarray(ref_lse)[np.asarray(rows)],
                               atol=50 * ATOL[dtype], rtol=0)


def _tree(prefix: int, parents: list[int]):
    """Speculative verify: tree node i (parent parents[i], -1 = root child) after a prefix of keys.

    Returns q_pos [1, T], k_pos [1, P + T], mask [1, T, P + T]: every node sees the prefix and its
    ancestors (itself included), and sits at position prefix + depth.
    """
    t = len(parents)
    anc = np.eye(t, dtype=bool)
    depth = np.zeros(t, int)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
            depth[i] = depth[p] + 1
    q_pos = prefix + depth
    mask = np.concatenate([np.ones((t, prefix), bool), anc], axis=1)
    k_pos = np.concatenate([np.arange(prefix), q_pos])
    return jnp.asarray(q_pos[None]), jnp.asarray(k_pos[None]), jnp.asarray(mask[None])


TREE = [-1, 0, 0, 1, 1, 2, 3, 5, -1, 8, 9]  # two roots, branches of depth up to 4


@pytest.mark.parametrize("dtype, variant", [(F32, "tpu"), pytest.param(BF16, "tpu", marks=SLOW),
                                            pytest.param(F32, "gpu", marks=SLOW)])
def test_tree_mask_matches_reference(dtype, variant):
    prefix = 45
    q_pos, k_pos, mask = _tree(prefix, TREE)
    t, s = q_pos.shape[1], k_pos.shape[1]
    q, k, v = qkv(1, t, s, 4, 2, 64, dtype, seed=3)
    k_valid = jnp.ones((1, s), bool)
    args = (q, k, v, q_pos, k_pos, k_valid, CAUSAL, 0, 0, mask)
    ours = jax.jit(lambda *a: fa.pallas(*a, CAUSAL, 0, 0, mask, block_q=16, block_k=16, interpret=True,
                                        variant=variant))(*args[:6])
    assert_close(ours, fa.reference(*args), dtype)
    # Siblings must not see each other: dropping the tree mask changes the outputs.
    assert not np.allclose(np.asarray(ours, np.float32),
                           np.asarray(fa.reference(*args[:-1]), np.float32), atol=1e-2)


GRAD_CASES = {
    "causal-gqa2-ragged": (2, 70, 70, 4, 2, 64, CAUSAL, 0, 0, [60, 45], None),  # last key block dead: skipped
    "block-causal-gqa4-window-sinks": (1, 80, 80, 8, 2, 128, BC16, 40, 8, [80], None),
    "tree": (1, len(TREE), 45 + len(TREE), 4, 2, 64, CAUSAL, 0, 0, [45 + len(TREE)], TREE),
}


@pytest.mark.parametrize("case", _params(GRAD_CASES))
def test_gradients_match_reference(case):
    b, t, s, n, kv, h, mode, window, sinks, lengths, tree = GRAD_CASES[case]
    q, k, v, q_pos, k_pos, k_valid = _inputs(b, t, s, n, kv, h, F32, lengths, s - t, seed=1)
    mask = None
    if tree is not None:
        q_pos, k_pos, mask = _tree(s - t, tree)
    rows = _seen(q_pos, k_pos, k_valid, mode, window, sinks, mask)[..., None]  # [B, T, 1]
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), F32)

    def loss(impl, q, k, v):
        o, lse = impl(q, k, v, q_pos, k_pos, k_valid, mode, window, sinks, mask, return_lse=True)
        return jnp.sum(jnp.where(rows[..., None], o * w, 0)) + jnp.sum(jnp.where(rows, jnp.sin(lse), 0))

    kernel = functools.partial(fa.pallas, block_q=16, block_k=32, interpret=True)
    ours = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(functools.partial(loss, fa.reference), argnums=(0, 1, 2))(q, k, v)
    for name, a, r in zip("qkv", ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("mode, window", [(CAUSAL, 0), (CAUSAL, 21), (BIDIRECTIONAL, 0), (BIDIRECTIONAL, 13),
                                          (BC16, 0), (BC16, 30)])
def test_block_map_is_exact_for_contiguous_positions(mode, window):
    """For contiguous positions the bound-based map equals the dense mask reduced per tile."""
    b, t, s, bq, bk = 2, 96, 160, 16, 32
    q_pos = jnp.broadcast_to(64 + jnp.arange(t), (b, t))
    k_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    k_valid = k_pos < jnp.array([[160], [101]])
    live = block_map(q_pos, jnp.ones((b, t), bool), k_pos, k_valid, mode, window, 0, bq, bk)
    dense = masks.visibility(q_pos, k_pos, k_valid, mode, window).reshape(b, t // bq, bq, s // bk, bk).any((2, 4))
    np.testing.assert_array_equal(np.asarray(live), np.asarray(dense))
    with_sinks = block_map(q_pos, jnp.ones((b, t), bool), k_pos, k_valid, mode, window, 5, bq, bk)
    dense = masks.visibility(q_pos, k_pos, k_valid, mode, window, 5).reshape(b, t // bq, bq, s // bk, bk).any((2, 4))
    assert bool(jnp.all(with_sinks | ~dense))  # a superset: never drops a live tile


def test_skip_stats():
    causal = skip_stats(1024, 1024, CAUSAL, block_q=128, block_k=128)
    assert causal["tiles"] == 64 and causal["computed"] == 36  # the 8 * 9 / 2 tiles on and below the diagonal
    assert skip_stats(1024, 1024, BIDIRECTIONAL)["skipped_fraction"] == 0.0
    block = skip_stats(1024, 1024, MaskMode("block_causal", 256))
    assert block["computed"] == 4 * (2 * 2) * 5 // 2  # 4 diffusion blocks of 2x2 tiles, causal across blocks
    window = skip_stats(1024, 1024, CAUSAL, window=128)
    assert window["computed"] == 8 + 7  # the diagonal and the tile before it
    ragged = skip_stats(1024, 1024, BIDIRECTIONAL, lengths=[1024, 512])
    assert ragged["skipped_fraction"] == 0.25
    decode = skip_stats(1, 4096, CAUSAL, window=1024, block_q=8, lengths=[4096, 2048, 1024, 512])
    assert decode["tiles"] == 4 * 32 and decode["computed"] == 8 + 8 + 8 + 4  # each row: its last 1024 keys


def test_invalid_inputs_raise_clear_errors():
    q, k, v, q_pos, k_pos, k_valid = _inputs(1, 16, 16, 2, 2, 64, F32, [16], 0)
    run = functools.partial(fa.pallas, interpret=True)
    with pytest.raises(InvalidInputError, match="head_dim must be one of"):
        q32, k32, v32 = qkv(1, 16, 16, 2, 2, 32)
        run(q32, k32, v32, q_pos, k_pos, k_valid)
    with pytest.raises(InvalidInputError, match="multiple of KV heads"):
        run(q[:, :, :1], k, v, q_pos, k_pos, k_valid)
    with pytest.raises(InvalidInputError, match="same shape"):
        run(q, k, v[:, :, :8], q_pos, k_pos, k_valid)
    with pytest.raises(InvalidInputError, match="block_q must be a positive multiple of 8"):
        run(q, k, v, q_pos, k_pos, k_valid, block_q=12)
    with pytest.raises(InvalidInputError, match=r"mask must have shape \(1, 16, 16\)"):
        run(q, k, v, q_pos, k_pos, k_valid, mask=jnp.ones((1, 16, 8), bool))
    with pytest.raises(InvalidInputError, match="float32 or bfloat16"):
        run(q.astype(jnp.float16), k, v, q_pos, k_pos, k_valid)
    with pytest.raises(InvalidInputError, match="needs a TPU backend"):
        fa.pallas(q, k, v, q_pos, k_pos, k_valid)
    with pytest.raises(InvalidInputError, match="variant must be 'tpu' or 'gpu'"):
        run(q, k, v, q_pos, k_pos, k_valid, variant="cuda")
    with pytest.raises(InvalidInputError, match="impl must be one of"):
        fa.dispatch(q, k, v, q_pos, k_pos, k_valid, impl="triton")


def test_dispatch_paths():
    """'auto' on CPU is the reference itself; 'pallas' is the kernel in interpret mode."""
    q, k, v, q_pos, k_pos, k_valid = _inputs(1, 24, 24, 2, 1, 64, F32, [24], 0)
    args = (q, k, v, q_pos, k_pos, k_valid)
    np.testing.assert_array_equal(np.asarray(fa.dispatch(*args)), np.asarray(fa.reference(*args)))
    assert_close(fa.dispatch(*args, impl="pallas", block_q=8, block_k=8), fa.reference(*args), F32)


def test_path_resolution(monkeypatch):
    """'auto': Pallas on TPU where the kernels fit, else the reference; use_impl forces a path and restores."""
    q64, q16 = jnp.zeros((1, 4, 2, 64)), jnp.zeros((1, 4, 2, 16))
    assert _core.resolve(None, q64) == ("reference", False)  # CPU
    assert _core.resolve("pallas", q64) == ("pallas", True)  # forced on CPU: interpret mode
    with use_impl("pallas"):
        assert _core.resolve(None, q64) == ("pallas", True)
    assert _core.resolve(None, q64) == ("reference", False)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert _core.resolve(None, q64) == ("pallas", False)
    assert _core.resolve(None, q16) == ("reference", False)  # head dim the kernels do not take
    assert _core.resolve(None, q64.astype(jnp.float16)) == ("reference", False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _core.resolve(None, q64) == ("reference", False)
    assert _core.resolve("pallas", q64) == ("pallas", False)
