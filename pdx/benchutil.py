"""Helpers shared by the `scripts/bench_*.py` benchmarks: bandwidth, param bytes, reports."""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp


def memory_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: best of `repeats` jitted sums over a `gib` GiB fp32 array."""
    x = jnp.ones((int(gib * (1 << 30)) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    del x
    return gib * (1 << 30) / best / 1e9


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
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
