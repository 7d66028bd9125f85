"""The one shared library behind `pdx.kernels_cpu`: every `*.cc` here, compiled for this CPU on first use.

It is built with the system compiler (`$CXX`, else `c++`; `-march=native`: AVX-512, or AVX2 with
FMA) into `<PDX_CACHE_DIR>/kernels/` under a name that hashes the sources, the flags, jaxlib's
version and the CPU's features (a per-process temporary directory when caching is off), written
atomically, loaded with ctypes and its `TARGETS` registered as XLA FFI targets for the CPU.

`available()` says whether it can run here (building it on first call); `reason()` says why not;
`mode()` names it without building, for compiled-program caches. `PDX_CPU_KERNELS=0` turns it off;
a CPU that should build it but cannot gets one warning, and the callers use XLA's own ops."""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import jax

from pdx import settings

TARGETS = ("pdx_gemv_bf16", "pdx_gemv_int8", "pdx_cached_attention")
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = sorted(glob.glob(os.path.join(_HERE, "*.cc")))
_HEADERS = sorted(glob.glob(os.path.join(_HERE, "*.h")))
_FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w"]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (`/proc/cpuinfo`; empty where there is none)."""
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
    flags = cpu_flags()
    if "avx512f" not in flags and not {"avx2", "fma"} <= flags:
        return None, "this CPU has neither AVX-512 nor AVX2 with FMA"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler ($CXX or c++) on PATH"
    import jaxlib

    h = hashlib.blake2b(digest_size=12)
    for path in _SOURCES + _HEADERS:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + f.read())
    h.update(repr((cxx, _FLAGS, jaxlib.__version__, sorted(flags))).encode())
    return f"pdx-cpu-{h.hexdigest()}.so", ""


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
        cmd = [_compiler(), *_FLAGS, f"-I{jax.ffi.include_dir()}", *_SOURCES, "-o", tmp]
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
            warnings.warn(f"pdx's CPU kernels are unavailable ({why}); decode uses XLA's slower ops", stacklevel=3)
        return False
    library = ctypes.cdll.LoadLibrary(path)
    if settings.cache_dir() is None:  # a per-process build: mapped now, so its directory can go
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    for target in TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")
    return True


def available() -> bool:
    """Whether the library is built and registered in this process (builds it on first call)."""
    return _register()


def reason() -> str:
    """Why the library is unavailable ("" when it is available; builds it to find out)."""
    return "" if available() else _build()[1]


def mode() -> str:
    """A key for compiled-program caches, known without building: the library traced programs would
    call (an executable that calls it must `available()` before it loads), or "off"."""
    return _plan()[0] or "off"
