"""Accuracy vs NFE and wall-clock of the dLLM decoders on the tiny trained dLLMs (held-out task instances).

For each task of the synthetic suite (pdx/train/tasks.py), on its own tiny model, and each decoding
setting: LLaDA with 1 token per step (the baseline, in 16-token blocks and in one block over the whole answer) and
with fewer fixed steps, Fast-dLLM threshold / factor decoding with no cache, prefix cache and dual cache, on the
bidirectional model, and the exact caches on the
block-diffusion model. NFE per token counts each row's forward passes (what the row would cost
alone) over its generated tokens (up to and including EOS). Writes JSON, a markdown table and an
accuracy-vs-NFE plot under bench/.

    nice -n 10 python scripts/eval_dllm.py [--n 200] [--ckpt checkpoints/tiny_dllm] [--out bench/dllm_eval]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import pdx
from pdx.decoding.diffusion import fast_dllm, llada
from pdx.train import tasks

BLOCK = 16


def settings(model_kind: str, gen: int) -> list[tuple[str, str, object, dict]]:
    """(label, family for the plot, generate function, options)."""
    if model_kind == "block_causal":
        base = dict(block_size=BLOCK, attention="block_causal")
        return [("block: llada 1 tok/step", "block llada", llada.generate, dict(steps=gen, **base)),
                *[(f"block: threshold {t} dual", "block threshold+dual", fast_dllm.generate,
                   dict(threshold=t, cache="dual", **base)) for t in (0.9, 0.7, 0.5)]]
    out = [("llada 1 tok/step", "llada", llada.generate, dict(steps=gen, block_size=BLOCK))]
    out += [(f"llada {gen // s} tok/step", "llada", llada.generate, dict(steps=s, block_size=BLOCK))
            for s in (16, 8, 4)]
    for cache in ("none", "prefix", "dual"):
        out += [(f"threshold {t} {cache}", f"threshold+{cache}", fast_dllm.generate,
                 dict(threshold=t, cache=cache, block_size=BLOCK)) for t in (0.99, 0.9, 0.7, 0.5)]
    out += [(f"factor {f} dual", "factor+dual", fast_dllm.generate, dict(factor=f, cache="dual", block_size=BLOCK))
            for f in (1.0, 2.0, 4.0)]
    out += [(f"llada 1 tok/step, block {gen}", f"llada block {gen}", llada.generate, dict(steps=gen, block_size=gen))]
    out += [(f"threshold {t} dual, block {gen}", f"threshold+dual block {gen}", fast_dllm.generate,
             dict(threshold=t, cache="dual", block_size=gen)) for t in (0.9, 0.7, 0.5)]
    return out


def evaluate(models: dict, n: int, runs, gen: int) -> list[dict]:
    """Every setting on every task, each task on its own model (`models[task]`)."""
    rows = []
    data = {name: tasks.held_out(name, n) for name in models}
    for label, family, fn, options in runs:
        for name, model in models.items():
            prompts = [p for p, _ in data[name]]
            t0 = time.perf_counter()
            result = fn(model, prompts, max_new_tokens=gen, prompt_bucket=tasks.PROMPT_LEN, **options)
            wall = time.perf_counter() - t0
            correct = [tasks.solved(name, p, result.row(i)) for i, p in enumerate(prompts)]
            tokens = int(result.lengths.sum())
            rows.append(dict(setting=label, family=family, task=name, easy=tasks.TASKS[name].easy,
                             accuracy=100.0 * float(np.mean(correct)),
                             nfe_per_token=float(np.sum(result.stats["row_nfe"]) / tokens),
                             tokens_per_forward=float(tokens / np.sum(result.stats["row_nfe"])),
                             batch_nfe=result.stats["nfe"], decode_s=round(result.stats["decode_s"], 3),
                             compile_s=round(result.stats["compile_s"], 2), wall_s=round(wall, 3),
                             tokens_per_s=round(tokens / result.stats["decode_s"], 1)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | task | n | accuracy % | NFE/token | tokens/forward | decode s (batch) | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['task']} | {r['n']} | {r['accuracy']:.1f} | {r['nfe_per_token']:.3f} | "
                     f"{r['tokens_per_forward']:.1f} | {r['decode_s']:.2f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(4 * ((len(names) + 1) // 2), 7), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for family in dict.fromkeys(r["family"] for r in rows):
            pts = sorted((r["nfe_per_token"], r["accuracy"]) for r in rows
                         if r["task"] == name and r["family"] == family)
            ax.plot(*zip(*pts), marker="o", label=family)
        ax.axvline(0.1, color="gray", linestyle=":", linewidth=1)
        easy = tasks.TASKS[name].easy
        ax.set(title=f"{name} ({'easy' if easy else 'hard'})", xscale="log", xlabel="NFE per token",
               ylabel="accuracy %", ylim=(-3, 103))
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge(files: list[str]) -> list[dict]:
    """Rows of several result files (each row tagged with its file's instance count), grouped by model and task."""
    groups = {}
    for file in files:
        with open(file) as f:
            data = json.load(f)
        new = {}
        for r in data["rows"]:
            new.setdefault((r["model"], r["task"]), []).append({"n": data["n"], **r})
        groups |= new
    order = [(k, t) for k in ("bidirectional", "block_causal") for t in tasks.TASKS]
    return [r for key in sorted(groups, key=lambda kt: order.index(kt) if kt in order else len(order))
            for r in groups[key]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="checkpoints/tiny_dllm")
    ap.add_argument("--n", type=int, default=200, help="held-out instances per task")
    ap.add_argument("--tasks", default=",".join(tasks.TASKS))
    ap.add_argument("--models", default="bidirectional,block_causal")
    ap.add_argument("--out", default="bench/dllm_eval")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="evaluate nothing: combine these result files (a later "
                    "file's rows replace an earlier one's for the same model and task) into OUT")
    args = ap.parse_args(argv)
    names = args.tasks.split(",")
    rows = [] if not args.merge else merge(args.merge)
    for kind in args.models.split(",") if not args.merge else ():
        paths = {name: os.path.join(args.ckpt, kind, name) for name in names}
        models = {name: pdx.load_model(path) for name, path in paths.items() if os.path.isdir(path)}
        if models:
            for r in evaluate(models, args.n, settings(kind, tasks.GEN_LEN), tasks.GEN_LEN):
                rows.append({"model": kind, "n": args.n, **r})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(n=sorted({r["n"] for r in rows}), rows=rows), f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows))
    plot(rows, args.out + ".png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
