"""Ahead-of-time compilation cache for every decoding program (AR, speculative, diffusion).

Strategies call `run(fn, statics, *args)`: the jitted `fn` is lowered and compiled once per
(static arguments, argument shapes/dtypes, attention implementation) and the executable is reused.
Compiling explicitly lets every call report its compile time apart from its run time, and
`compile_count` lets tests prove that changing prompt content, seeds or thresholds does not recompile.
Where `pdx.decoding.executable_cache` is enabled (the CLI enables it), executables also persist on disk,
so a later process skips tracing, lowering and compiling (`compile_count` counts real compiles only).
"""

from __future__ import annotations

import os
import time
from collections import Counter

import jax

from pdx.decoding import executable_cache
from pdx.kernels_cpu import library
from pdx.kernels_pallas import get_impl

_EXECUTABLES: dict = {}
_COUNTS: Counter = Counter()


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves)


def run(fn, statics: dict, *args):
    """`fn(*args, **statics)` through the cache; returns (outputs, seconds spent compiling).

    The attention implementation (`pdx.kernels_pallas.set_impl`) and whether pdx's CPU kernels are on
    (`pdx.kernels_cpu.library`, registered before a stored executable that may call it loads) are
    read at trace time, so they are part of the key, and a switch retraces (`fn`'s own trace cache is
    keyed without them)."""
    kernels = library.mode()
    impl = f"{get_impl()}|{kernels}"
    signature = _signature(args)
    key = (fn, tuple(sorted(statics.items(), key=lambda kv: kv[0])), signature, impl)
    compile_s = 0.0
    exe = _EXECUTABLES.get(key)
    if exe is None:
        t0 = time.perf_counter()
        stored = executable_cache.entry_path(fn, statics, signature, impl)
        if stored and kernels != "off" and os.path.exists(stored):
            library.available()  # registers the FFI targets a stored executable may call
        exe = executable_cache.load(stored) if stored else None
        if exe is None:
            if any(k[0] is fn and k[1:3] == key[1:3] for k in _EXECUTABLES):  # same program, other impl
                fn.clear_cache()
            exe = fn.lower(*args, **statics).compile()
            _COUNTS[fn] += 1
            if stored:
                executable_cache.store(stored, exe)
        compile_s = time.perf_counter() - t0
        _EXECUTABLES[key] = exe
    return exe(*args), compile_s


def clear() -> None:
    """Drop every cached executable (and JAX's own caches): each holds JIT code mappings, and a process
    that compiles thousands of programs (a test suite) runs out of memory maps (`vm.max_map_count`)."""
    _EXECUTABLES.clear()
    jax.clear_caches()


def compile_count(fn) -> int:
    """How many programs have been compiled for `fn` so far in this process."""
    return _COUNTS[fn]
