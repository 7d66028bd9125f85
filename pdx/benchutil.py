"""Helpers shared by the `scripts/bench_*.py` benchmarks: bandwidth, param bytes, reports."""

from __future__ import annotations

import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from pdx.files import atomic_write


def best_time(fn, repeats: int) -> float:
    """Best wall time in seconds of `repeats` calls of `fn` (which must block on its result)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.cache
def _probe(gib: float):
    x = jnp.ones((int(gib * (1 << 30)) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x, total


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Streaming read bandwidth in GB/s right now: best of `repeats` jitted sums over a `gib` GiB fp32 array.

    The array is kept, so benchmarks can re-measure next to each timing (on a shared machine the
    bandwidth moves by 2x within minutes).
    """
    x, total = _probe(gib)
    return x.nbytes / best_time(lambda: total(x).block_until_ready(), repeats) / 1e9


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree (quantized weights count their int8 values and scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def machine() -> dict:
    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "cpus": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__}


def write_report(out_dir: str, name: str, data: dict, markdown: str) -> None:
    """`{out_dir}/{name}.json` and `.md`, each written to a temp file and renamed (never half-written)."""
    os.makedirs(out_dir, exist_ok=True)
    for ext, text in (("json", json.dumps(data, indent=2)), ("md", markdown)):
        path = os.path.join(out_dir, f"{name}.{ext}")
        atomic_write(path, text)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
