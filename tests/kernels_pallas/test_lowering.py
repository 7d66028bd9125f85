"""The compiled (non-interpret) kernels lower for TPU (Pallas -> Mosaic) and GPU (Pallas -> Triton) on this
CPU-only machine, through `jax.export` with the target platform. This checks the Pallas-level lowering
(block shapes, primitives, scalar prefetch, grid); the Mosaic / Triton compilers that run on the device
itself are not exercised here.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax._src.pallas.mosaic import tpu_info

from pdx.kernels_pallas import decode_attention as da
from pdx.kernels_pallas import flash_attention as fa
from pdx.masks import CAUSAL, MaskMode

B, T, N, K, H = 2, 256, 8, 2, 128
Q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
KV = jax.ShapeDtypeStruct((B, K, T, H), jnp.bfloat16)
POS = jax.ShapeDtypeStruct((B, T), jnp.int32)
VALID = jax.ShapeDtypeStruct((B, T), jnp.bool_)
MASK = jax.ShapeDtypeStruct((B, T, T), jnp.bool_)


def _flash_grad(variant):
    def loss(q, k, v, pos, valid, mask):
        o = fa.pallas(q, k, v, pos, pos, valid, MaskMode("block_causal", 64), 128, 4, mask, variant=variant)
        return o.astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2)), (Q, KV, KV, POS, VALID, MASK)


def _decode(variant):
    fn = lambda q, k, v, pos, lengths: da.pallas(q, k, v, pos, lengths, CAUSAL, 96, 4, variant=variant)  # noqa: E731
    return fn, (jax.ShapeDtypeStruct((B, 4, N, H), jnp.bfloat16), KV, KV, jax.ShapeDtypeStruct((B, 4), jnp.int32),
                jax.ShapeDtypeStruct((B,), jnp.int32))


@pytest.mark.parametrize("platform, variant", [("tpu", "tpu"), ("cuda", "gpu")])
@pytest.mark.parametrize("build", [_flash_grad, _decode], ids=["flash-fwd-bwd-mask", "decode"])
def test_compiled_kernels_lower(monkeypatch, platform, variant, build):
    monkeypatch.setattr(jax, "default_backend", lambda: variant)  # the kernels' backend check
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")  # Mosaic asks the chip for tiling
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    fn, args = build(variant)
    exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    text = exported.mlir_module()
    assert ("tpu_custom_call" if variant == "tpu" else "xla.gpu.triton") in text
