"""Attention kernels vs the jnp reference: prefill and decode timings, block-skip ratios, correctness.

On TPU (or GPU with --gpu-pallas) the compiled Pallas kernels are timed against the XLA reference in
the same run (warm-up excluded, compile time reported apart). On CPU the kernels only run in interpret
mode, which is a correctness check, not a speed: there the script times the reference alone, checks
the kernels against it on small shapes for every mask mode, and reports block-skip ratios (which
depend only on the mask, the lengths and the tiles, not on the machine).

    nice -n 5 python scripts/bench_attention.py         # writes bench/attention.{json,md}
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pdx import benchutil
from pdx.kernels_pallas import decode_attention as da
from pdx.kernels_pallas import flash_attention as fa
from pdx.kernels_pallas.block_mask import skip_stats
from pdx.masks import BIDIRECTIONAL, CAUSAL, MaskMode

N, K, H = 8, 2, 128  # query heads, KV heads (GQA 4), head dim
SINKS = 4
MODES = {  # name: (mode, window, sinks)
    "causal": (CAUSAL, 0, 0),
    "bidirectional": (BIDIRECTIONAL, 0, 0),
    "block_causal(32)": (MaskMode("block_causal", 32), 0, 0),
    "block_causal(256)": (MaskMode("block_causal", 256), 0, 0),
    "causal + window 512": (CAUSAL, 512, 0),
    "causal + window 512 + 4 sinks": (CAUSAL, 512, SINKS),
    "causal + window 1024": (CAUSAL, 1024, 0),
    "block_causal(32) + window 1024": (MaskMode("block_causal", 32), 1024, 0),
}


def compiled(fn, *args):
    """(compiled fn, compile seconds) of `jax.jit(fn)` for these arguments."""
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    return exe, time.perf_counter() - t0


def inputs(b, t, s, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (b, t, N, H), dtype), jax.random.normal(keys[1], (b, K, s, H), dtype),
            jax.random.normal(keys[2], (b, K, s, H), dtype))


def skip_table(lengths: list[int], block: int) -> list[dict]:
    """Prefill tile-skip ratios per mask mode and length (one full row), plus a ragged decode batch."""
    rows = []
    for t in lengths:
        for name, (mode, window, sinks) in MODES.items():
            stats = skip_stats(t, t, mode, window, sinks, block, block)
            rows.append({"kind": "prefill", "tokens": t, "mode": name, "block": block, **stats})
        ragged = [t, t // 2, t // 4, t // 8]
        stats = skip_stats(t, t, BIDIRECTIONAL, 0, 0, block, block, lengths=ragged)
        rows.append({"kind": "prefill ragged rows", "tokens": t, "mode": f"bidirectional, lengths {ragged}",
                     "block": block, **stats})
        for window in (0, 1024):
            stats = skip_stats(1, t, CAUSAL, window, 0, 8, block, lengths=ragged)
            rows.append({"kind": "decode ragged rows", "tokens": t, "block": block,
                         "mode": f"causal, window {window}, lengths {ragged}", **stats})
    return rows


def correctness(variants: list[str]) -> list[dict]:
    """Interpret-mode max |kernel - reference| on small shapes for every mask mode, prefill and decode."""
    rows = []
    t, b, block = 200, 2, 32
    q, k, v = inputs(b, t, t, jnp.float32, seed=1)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = pos < jnp.array([[t], [t - 57]])
    lengths = jnp.array([t, t - 57])
    for name, (mode, window, sinks) in MODES.items():
        window, sinks = min(window, 48), min(sinks, 2)  # scaled to the small shape so the window bites
        ref = fa.reference(q, k, v, pos, pos, valid, mode, window, sinks)
        dref = da.reference(q[:, -3:], k, v, lengths[:, None] - 3 + jnp.arange(3), lengths, mode, window, sinks)
        for variant in variants:
            kernel = functools.partial(fa.pallas, mode=mode, block_q=block, block_k=block, interpret=True,
                                       variant=variant)
            ours = jax.jit(kernel)(q, k, v, pos, pos, valid, window=window, sinks=sinks)
            dec = da.pallas(q[:, -3:], k, v, lengths[:, None] - 3 + jnp.arange(3), lengths, mode, window, sinks,
                            block_k=block, num_splits=3, interpret=True, variant=variant)
            rows.append({"mode": f"{name} (window {window}, sinks {sinks})", "variant": variant,
                         "prefill_max_abs_err": float(jnp.abs(ours - ref)[valid].max()),
                         "decode_max_abs_err": float(jnp.abs(dec - dref).max())})
    return rows


def time_paths(row: dict, paths: dict, args: tuple, repeats: int) -> dict:
    """Add `<path>_ms` and `<path>_compile_s` for each path (a function of `args`) to `row`."""
    for name, fn in paths.items():
        exe, compile_s = compiled(fn, *args)
        row[f"{name}_ms"] = 1e3 * benchutil.best_time(lambda exe=exe: exe(*args).block_until_ready(), repeats)
        row[f"{name}_compile_s"] = compile_s
    if "pallas_ms" in row:
        row["speedup"] = row["reference_ms"] / row["pallas_ms"]
    return row


def timings(prefill_lengths, decode_lengths, dtype, kernel: bool, repeats: int) -> list[dict]:
    """Reference (and, on an accelerator, kernel) wall times for causal prefill and ragged decode."""
    rows = []
    for t in prefill_lengths:
        pos = jnp.arange(t)[None]
        paths = {"reference": fa.reference} | ({"pallas": fa.pallas} if kernel else {})
        rows.append(time_paths({"kind": "prefill causal", "tokens": t, "batch": 1}, paths,
                               (*inputs(1, t, t, dtype), pos, pos, jnp.ones((1, t), bool)), repeats))
    for s in decode_lengths:
        b = 8
        lengths = jnp.asarray(np.linspace(s // 8, s, b).astype(np.int32))  # ragged rows, s/8 .. s
        paths = {"reference": da.reference} | ({"pallas": da.pallas} if kernel else {})
        rows.append(time_paths({"kind": "decode causal, ragged", "tokens": s, "batch": b}, paths,
                               (*inputs(b, 1, s, dtype), lengths[:, None] - 1, lengths), repeats))
    return rows


def markdown(result: dict) -> str:
    def table(rows):
        if not rows:
            return ""
        cols = list(rows[0])
        fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        return "\n".join(lines)

    return "\n\n".join([
        f"# Attention kernels ({result['backend']}: {result['device']})", result["note"],
        "## Tile-skip ratios (fraction of (query tile, key tile) pairs the kernels never compute)",
        table(result["skip"]), "## Timings (best of repeats, ms; compile apart)", table(result["timings"]),
        "## Interpret-mode correctness (fp32, max |kernel - reference|)", table(result["correctness"]),
    ]) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/attention")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu-pallas", action="store_true", help="time the Triton layout on GPU (not verified)")
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    accel = backend == "tpu" or (backend == "gpu" and args.gpu_pallas)
    if accel:
        prefill, decode, dtype = [1024, 2048, 4096, 8192], [4096, 16384, 65536], jnp.bfloat16
        note = f"Compiled Pallas ({backend}) vs the jnp reference under XLA, bf16, N={N} K={K} H={H}."
    else:
        prefill, decode, dtype = [512, 1024, 2048], [4096, 16384], jnp.float32
        note = (f"{backend}: Pallas runs in interpret mode only, so no kernel timings; the reference is timed under "
                f"XLA (fp32, N={N} K={K} H={H}). Skip ratios are machine independent.")
    result = {"backend": backend, "device": str(jax.devices()[0].device_kind), "note": note,
              "skip": skip_table([1024, 4096, 16384], 128),
              "timings": timings(prefill, decode, dtype, accel, args.repeats),
              "correctness": correctness(["tpu", "gpu"])}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
