"""`gemv_bf16(x, w)`: `x [..., K] fp32 @ w[N, K]^T bf16 -> [..., N] fp32` for a few rows on XLA CPU.

XLA CPU multiplies a bf16 weight by one row of activations at 1-2 GB/s (its bf16 gemv, or an upcast
copy), so decode at batch 1-8 gained nothing from bf16 weights. `gemv_bf16.cc` streams the weight
at memory bandwidth instead (fp32 math on the bf16 values: the result is the fp32 product up to
summation order). It is C++ built with the system compiler (`$CXX`, else `c++`) the first time it is
needed, for this CPU (`-march=native`, AVX-512 required), into `<PDX_CACHE_DIR>/kernels/` (a
per-process temporary directory when caching is off), and registered as an XLA FFI target.

`available()` says whether it can run here; `reason()` says why not. `PDX_CPU_KERNELS=0` turns it
off. `pdx.models.layers.dense` uses it on CPU for bf16 weights under fp32 activations with up to
`MAX_ROWS` rows, where it measured faster than XLA's dot; elsewhere XLA's dot runs, and a CPU that
cannot build it gets one warning."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp

from pdx import settings
from pdx.errors import InvalidInputError

TARGET = "pdx_gemv_bf16"
# SmolLM2 bf16 decode tok/s, XLA dot -> this kernel: 1 row 35.8 -> 55.2, 2: 57 -> 90, 4: 108 -> 141,
# 8: 177 -> 203, 16: 265 -> 243 (XLA's AMX GEMM wins from 16 rows).
MAX_ROWS = 8
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemv_bf16.cc")
_FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w"]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


@functools.cache
def _plan() -> tuple[str | None, str]:
    """(file name of the library this machine would build, "") or (None, why it cannot run here)."""
    if os.environ.get("PDX_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "turned off by PDX_CPU_KERNELS"
    if jax.default_backend() != "cpu":
        return None, f"the backend is {jax.default_backend()}, not cpu"
    if "avx512f" not in _cpu_flags():
        return None, "this CPU lacks AVX-512"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler ($CXX or c++) on PATH"
    import jaxlib

    h = hashlib.blake2b(digest_size=12)
    with open(_SOURCE, "rb") as f:
        h.update(f.read())
    h.update(repr((cxx, _FLAGS, jaxlib.__version__, sorted(_cpu_flags()))).encode())
    return f"gemv_bf16-{h.hexdigest()}.so", ""


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
            return None, f"{cmd[0]} failed: {done.stderr.strip()[-500:]}"
        os.replace(tmp, path)  # atomic: a concurrent builder's identical library or ours, never half of one
    return path, ""


@functools.cache
def _register() -> bool:
    path, why = _build()
    if path is None:
        if _plan()[0] is not None:  # it should have built: say so once
            warnings.warn(f"pdx's CPU bf16 gemv is unavailable ({why}); bf16 decode uses XLA's slower dot",
                          stacklevel=3)
        return False
    library = ctypes.cdll.LoadLibrary(path)
    if settings.cache_dir() is None:  # a per-process build: mapped now, so its directory can go
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(library, TARGET)), platform="cpu")
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


def gemv_bf16(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x [..., K] fp32`, `w [N, K] bf16` -> `[..., N] fp32` (requires `available()`)."""
    if x.dtype != jnp.float32 or w.dtype != jnp.bfloat16 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise InvalidInputError(f"gemv_bf16 takes x [..., K] float32 and w [N, K] bfloat16, got "
                                f"x {x.shape} {x.dtype} and w {w.shape} {w.dtype}")
    if not available():
        raise InvalidInputError(f"pdx's CPU gemv is unavailable: {reason()}")
    return _gemv(x, w)


def reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """What `gemv_bf16` computes, in jnp: the fp32 product with the bf16 weight's values."""
    return jnp.einsum("...k,nk->...n", x, w.astype(jnp.float32))


@jax.custom_jvp
def _gemv(x, w):
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[0],), jnp.float32))(x, w)


@_gemv.defjvp
def _gemv_jvp(primals, tangents):  # differentiable (training, tests): the tangent map is the jnp product
    (x, w), (dx, dw) = primals, tangents
    return _gemv(x, w), reference(dx, w) + reference(x, dw.astype(jnp.bfloat16))
