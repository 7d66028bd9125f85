"""Products of a few fp32 rows with bf16 or int8 weights on XLA CPU, at memory bandwidth:

    gemv_bf16(x, w)         x [..., K] fp32 @ w [N, K]^T (bf16)                -> [..., N] fp32
    gemv_int8(x, q, scale)  (x [..., K] fp32 @ q [N, K]^T (int8)) * scale [N]  -> [..., N] fp32

XLA CPU multiplies such a weight by a few rows of activations at 1-2 GB/s (its bf16/int8 dot, or an
upcast copy), so decode at batch 1-8 gained nothing from smaller weights. `gemv.cc` streams the
weight at memory bandwidth instead (fp32 math on the weight's values: the result is the fp32
product up to summation order). It is C++ built with the system compiler (`$CXX`, else `c++`) the
first time it is needed, for this CPU (`-march=native`; AVX-512, or AVX2 with FMA), into
`<PDX_CACHE_DIR>/kernels/` (a per-process temporary directory when caching is off), and registered
as XLA FFI targets.

`available()` says whether it can run here; `reason()` says why not. `PDX_CPU_KERNELS=0` turns it
off. `pdx.models.layers.dense` uses it on CPU for bf16 weights under fp32 activations with up to
`MAX_ROWS` rows, and `pdx.models.quant` for int8 weights, where they measured faster than XLA's
dot; elsewhere XLA's dot runs, and a CPU that cannot build them gets one warning."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp

from pdx import settings
from pdx.errors import InvalidInputError

TARGETS = ("pdx_gemv_bf16", "pdx_gemv_int8")
# SmolLM2 bf16 decode tok/s, XLA dot -> this kernel: 1 row 35.8 -> 55.2, 2: 57 -> 90, 4: 108 -> 141,
# 8: 177 -> 203, 16: 265 -> 243 (XLA's AMX GEMM wins from 16 rows).
MAX_ROWS = 8
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemv.cc")
_FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w"]


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


@functools.cache
def _plan() -> tuple[str | None, str]:
    """(file name of the library this machine would build, "") or (None, why it cannot run here)."""
    if not settings.cpu_kernels_enabled():
        return None, "turned off by PDX_CPU_KERNELS"
    if jax.default_backend() != "cpu":
        return None, f"the backend is {jax.default_backend()}, not cpu"
    flags = _cpu_flags()
    if "avx512f" not in flags and not {"avx2", "fma"} <= flags:
        return None, "this CPU has neither AVX-512 nor AVX2 with FMA"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler ($CXX or c++) on PATH"
    import jaxlib

    h = hashlib.blake2b(digest_size=12)
    with open(_SOURCE, "rb") as f:
        h.update(f.read())
    h.update(repr((cxx, _FLAGS, jaxlib.__version__, sorted(_cpu_flags()))).encode())
    return f"gemv-{h.hexdigest()}.so", ""


@functools.cache
def _build() -> tuple[str | None, str]:
    """(path of the built library, "") or (None, why there is none): compiled once per cache."""
    name, why = _plan()
    if name is None:
        return None, why
    root = settings.cache_dir()
    directory = os.path.join(root, "kernels") if root else tempfile.mkdtemp(prefix="pdx-kernels-")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        cmd = [_compiler(), *_FLAGS, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            if root is None:
                shutil.rmtree(directory, ignore_errors=True)
            return None, f"{cmd[0]} failed: {done.stderr.strip()[-500:]}"
        os.replace(tmp, path)  # atomic: a concurrent builder's identical library or ours, never half of one
    return path, ""


@functools.cache
def _register() -> bool:
    path, why = _build()
    if path is None:
        if _plan()[0] is not None:  # it should have built: say so once
            warnings.warn(f"pdx's CPU gemv is unavailable ({why}); bf16/int8 decode uses XLA's slower dot",
                          stacklevel=3)
        return False
    library = ctypes.cdll.LoadLibrary(path)
    if settings.cache_dir() is None:  # a per-process build: mapped now, so its directory can go
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    for target in TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    return True


def available() -> bool:
    """Whether the kernel is built and registered in this process (builds it on first call)."""
    return _register()


def reason() -> str:
    """Why the kernel is unavailable ("" when it is available; builds it to find out)."""
    return "" if available() else _build()[1]


def mode() -> str:
    """A key for compiled-program caches, known without building: the library traced programs would
    call (an executable that calls it must `available()` before it loads), or "off"."""
    return _plan()[0] or "off"


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether `x @ w^T` should run here (the caller checks the weight's dtype): CPU, fp32
    activations, a 2-D weight, at most `MAX_ROWS` rows, and the kernel available."""
    rows = math.prod(x.shape[:-1])
    return (jax.default_backend() == "cpu" and x.dtype == jnp.float32 and w.ndim == 2 and rows <= MAX_ROWS
            and available())


def _check(x, w, dtype, name, args):
    if x.dtype != jnp.float32 or w.dtype != dtype or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise InvalidInputError(f"{name} takes x [..., K] float32 and {args}, got x {x.shape} {x.dtype} and "
                                f"the weight {w.shape} {w.dtype}")
    if not available():
        raise InvalidInputError(f"pdx's CPU gemv is unavailable: {reason()}")


def gemv_bf16(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., K] fp32`, `w [N, K] bf16` -> `[..., N] fp32` (requires `available()`)."""
    _check(x, w, jnp.bfloat16, "gemv_bf16", "w [N, K] bfloat16")
    return _gemv_bf16(x, w)


def gemv_int8(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """`x [..., K] fp32`, `q [N, K] int8`, `scale [N] fp32` -> `[..., N] fp32` (requires `available()`)."""
    _check(x, q, jnp.int8, "gemv_int8", "q [N, K] int8 with scale [N] float32")
    if scale.shape != q.shape[:1] or scale.dtype != jnp.float32:
        raise InvalidInputError(f"gemv_int8's scale must be [{q.shape[0]}] float32, got {scale.shape} {scale.dtype}")
    return _gemv_int8(x, q, scale)


def reference(x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """What `gemv_bf16` (`scale` None) and `gemv_int8` compute, in jnp: the fp32 product."""
    y = jnp.einsum("...k,nk->...n", x, w.astype(jnp.float32))
    return y if scale is None else y * scale


def _call(target, x, *weight):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape[:-1] + weight[0].shape[:1], jnp.float32))(x, *weight)


# Differentiable (training, tests): the tangent maps are the jnp products. int8 weights are constants.
@jax.custom_jvp
def _gemv_bf16(x, w):
    return _call(TARGETS[0], x, w)


@_gemv_bf16.defjvp
def _gemv_bf16_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    return _gemv_bf16(x, w), reference(dx, w) + reference(x, dw.astype(jnp.bfloat16))


@jax.custom_jvp
def _gemv_int8(x, q, scale):
    return _call(TARGETS[1], x, q, scale)


@_gemv_int8.defjvp
def _gemv_int8_jvp(primals, tangents):
    (x, q, scale), (dx, _, dscale) = primals, tangents
    return _gemv_int8(x, q, scale), reference(dx, q, scale) + reference(x, q, dscale)
