"""Accuracy vs NFE and wall-clock of the dLLM decoders: the synthetic suite, the long tasks and the code
workload, one table.

Synthetic (pdx/train/tasks.py, held-out instances, each task on its own tiny model in
checkpoints/tiny_dllm): LLaDA at 1 token per step (the baseline, in 16-token blocks and in one block
over the answer) and with fewer fixed steps, Fast-dLLM threshold / factor decoding with no cache,
prefix cache and dual cache; the exact caches on the block-diffusion models. Accuracy: exact match.

Long (`fill-256`, `agree-256/512`, on their own tiny models in checkpoints/tiny_dllm; they stand in
for the code workload until a code dLLM ships): LLaDA at 1 token per step (the block-diffusion model
with its exact prefix cache; both also with the dual cache) and Fast-dLLM's threshold 0.9 with no cache,
prefix cache and dual cache, in 32-token blocks. Accuracy: exact match (fill) or a valid answer (agree).

AR (`--workloads ar`): the same-vocabulary causal models (checkpoints/tiny_ar/<task>,
scripts/train_tiny_ar.py) on the synthetic and long tasks, greedy with pdx's AR engine: one forward per
generated token (the prompt's pass makes the first); their rows sit in those workloads' tables and plots as
model "causal".

Code (checkpoints/code_dllm, scripts/train_code_dllm.py): held-out standard-library functions (def
line through docstring) completed with 256 and 512 bytes, the reference (one byte per step) and
Fast-dLLM's threshold rule without and with the caches. Accuracy: byte agreement with the reference's
output; also whole-sequence agreement and the share of completions `ast.parse` accepts once closed at
a line boundary (`code_data.completion_parses`).

NFE per token counts each row's forward passes (what the row would cost alone) over its generated
tokens (up to and including EOS); tokens/s are decode wall-clock (compilation excluded) at --batch
rows per call and, for the first --n1 instances, one row alone. Writes JSON, a markdown table and per
workload a plot of accuracy against NFE and against tokens/s under bench/.

    nice -n 10 python scripts/eval_dllm.py [--workloads synthetic,long,ar,code] [--n 200] [--long-n 32]
                                           [--out bench/dllm_eval]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import pdx
from pdx.decoding import ar
from pdx.decoding.diffusion import fast_dllm, llada
from pdx.errors import InvalidInputError
from pdx.files import atomic_write
from pdx.train import code_data, tasks

BLOCK = 16
LONG_BLOCK = 32  # the long tasks' block (their block-diffusion models train with it)
WORKLOADS = ("synthetic", "long", "ar", "code")
CODE_PROMPT, CODE_BLOCK = 128, 32  # the code dLLMs' training layout (scripts/train_code_dllm.py)


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


def long_settings(model_kind: str) -> list[tuple[str, str, object, dict]]:
    """The long tasks' settings: one token per step (block diffusion: with its exact prefix cache) and with
    the dual cache (32 steps per block: where a cache pays), then threshold 0.9 with each cache."""
    base = dict(block_size=LONG_BLOCK, attention=model_kind)
    block = model_kind == "block_causal"
    tag = "block: " if block else ""
    return [(f"{tag}llada 1 tok/step" + (" prefix" if block else ""), f"{tag}llada", llada.generate,
             dict(cache="prefix" if block else "none", **base)),
            (f"{tag}llada 1 tok/step dual", f"{tag}llada", llada.generate, dict(cache="dual", **base)),
            *[(f"{tag}threshold 0.9 {c}", f"{tag}threshold 0.9", fast_dllm.generate,
               dict(threshold=0.9, cache=c, **base)) for c in ("none", "prefix", "dual")]]


def ar_generate(model, prompts, *, max_new_tokens: int, prompt_bucket: int):
    """pdx's AR engine, greedy, reporting as the dLLM decoders do: `row_nfe` (one forward per generated
    token: the prompt's pass yields the first) and `decode_s` (prefill included)."""
    del prompt_bucket  # the AR engine buckets prompts itself
    out = ar.generate(model, prompts, max_new_tokens=max_new_tokens)
    out.stats["row_nfe"] = out.lengths.astype(float)
    out.stats["decode_s"] += out.stats["prefill_s"]
    return out


def decode(fn, model, prompts, gen: int, options: dict, batch: int, bucket: int) -> dict:
    """Decode `prompts` in batches of `batch` (one compiled program): tokens [N, G], lengths [N],
    row_nfe [N] and the summed decode and compile seconds."""
    parts = [fn(model, prompts[i : i + batch], max_new_tokens=gen, prompt_bucket=bucket, **options)
             for i in range(0, len(prompts), batch)]
    return dict(tokens=np.concatenate([r.tokens for r in parts]), lengths=np.concatenate([r.lengths for r in parts]),
                row_nfe=np.concatenate([r.stats["row_nfe"] for r in parts]),
                decode_s=sum(r.stats["decode_s"] for r in parts), compile_s=sum(r.stats["compile_s"] for r in parts))


def speed(fn, model, prompts, gen: int, options: dict, batch: int, n1: int, bucket: int):
    """Every prompt decoded at `batch` and the first `n1` alone: (the batched decode, speed columns)."""
    out = decode(fn, model, prompts, gen, options, batch, bucket)
    alone = decode(fn, model, prompts[:n1], gen, options, 1, bucket) if n1 else None
    tokens, nfe = int(out["lengths"].sum()), float(out["row_nfe"].sum())
    cols = dict(nfe_per_token=nfe / tokens, tokens_per_forward=tokens / nfe, decode_s=round(out["decode_s"], 3),
                compile_s=round(out["compile_s"] + (alone["compile_s"] if alone else 0), 2),
                tokens_per_s=round(tokens / out["decode_s"], 1),
                tokens_per_s_b1=round(int(alone["lengths"].sum()) / alone["decode_s"], 1) if alone else None)
    return out, cols


def evaluate(models: dict, n: int, runs, batch: int, n1: int, workload: str = "synthetic") -> list[dict]:
    """Every setting on every task, each task on its model (`models[task]`) at its own canvas: exact match
    or a valid answer (`tasks.solved`)."""
    rows = []
    data = {name: tasks.held_out(name, n) for name in models}
    for label, family, fn, options in runs:
        for name, model in models.items():
            task = tasks.get(name)
            prompts = [p for p, _ in data[name]]
            out, cols = speed(fn, model, prompts, task.gen_len, options, batch, n1, task.prompt_len)
            done = [out["tokens"][i, :k].tolist() for i, k in enumerate(out["lengths"])]
            rows.append(dict(workload=workload, setting=label, family=family, task=name, easy=task.easy,
                             accuracy=100.0 * float(np.mean([tasks.solved(name, p, r) for p, r in zip(prompts, done)])),
                             **cols))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def code_settings(model_kind: str) -> list[tuple[str, str, object, dict]]:
    """The code workload's settings; the first is the reference the others are scored against: one token
    per step (the bidirectional model without a cache; the block-diffusion model with its exact prefix cache)."""
    base = dict(block_size=CODE_BLOCK, attention=model_kind)
    if model_kind == "block_causal":
        return [("block: llada 1 tok/step prefix", "block llada", llada.generate, dict(cache="prefix", **base)),
                *[(f"block: threshold {t} {c}", f"block threshold+{c}", fast_dllm.generate,
                   dict(threshold=t, cache=c, **base)) for c in ("none", "dual") for t in (0.9, 0.7, 0.5)]]
    return [("llada 1 tok/step", "llada", llada.generate, dict(**base)),
            *[(f"threshold {t} {c}", f"threshold+{c}", fast_dllm.generate, dict(threshold=t, cache=c, **base))
              for c in ("none", "prefix", "dual") for t in (0.9, 0.7, 0.5)]]


def code_prompts(n: int, gen: int, data: str | None) -> list[bytes]:
    """`n` held-out function prompts (def line through docstring, at most CODE_PROMPT bytes), spread
    evenly over all that qualify."""
    found = code_data.function_prompts(code_data.load_split(True, data), CODE_PROMPT, gen)
    if len(found) < n:
        raise InvalidInputError(f"only {len(found)} held-out function prompts fit {CODE_PROMPT} bytes, asked for {n}")
    return [found[i][1] for i in np.linspace(0, len(found) - 1, n).round().astype(int)]


def evaluate_code(model, kind: str, prompts: list[bytes], gen: int, batch: int, n1: int) -> list[dict]:
    """Every code setting at `gen` bytes: agreement with the reference setting's output (per sequence and
    per byte), the share of completions `ast.parse` accepts once closed at a line boundary, and speed."""
    rows, ref = [], None
    ids = [list(p) for p in prompts]
    for label, family, fn, options in code_settings(kind):
        out, cols = speed(fn, model, ids, gen, options, batch, n1, CODE_PROMPT)
        ref = out["tokens"] if ref is None else ref
        done = [out["tokens"][i, :k].tolist() for i, k in enumerate(out["lengths"])]
        rows.append(dict(workload="code", setting=label, family=family, task=f"code {gen}", easy=False,
                         accuracy=100.0 * float(np.mean(out["tokens"] == ref)),
                         sequence_agreement=100.0 * float(np.mean(np.all(out["tokens"] == ref, axis=1))),
                         parses=100.0 * float(np.mean([code_data.completion_parses(p, r)
                                                       for p, r in zip(prompts, done)])),
                         **cols))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(r, key, fmt):
        return "" if r.get(key) is None else format(r[key], fmt)

    lines = ["| workload | model | setting | task | n | accuracy % | sequences % | parses % | NFE/token "
             "| tokens/forward | tokens/s (batch) | tokens/s (batch 1) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.get('workload', 'synthetic')} | {r['model']} | {r['setting']} | {r['task']} | {r['n']} | "
                     f"{r['accuracy']:.1f} | {cell(r, 'sequence_agreement', '.1f')} | {cell(r, 'parses', '.1f')} | "
                     f"{r['nfe_per_token']:.3f} | {r['tokens_per_forward']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{cell(r, 'tokens_per_s_b1', '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Per task, accuracy against NFE per token (top) and against batched wall-clock tokens/s (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names) + 1, 7), squeeze=False)
    for col, name in enumerate(names):
        for family in dict.fromkeys(r["family"] for r in rows):
            picked = [r for r in rows if r["task"] == name and r["family"] == family]
            for ax, key in zip(axes[:, col], ("nfe_per_token", "tokens_per_s")):
                if picked:
                    ax.plot(*zip(*sorted((r[key], r["accuracy"]) for r in picked)), marker="o", label=family)
        hard = rows[[r["task"] for r in rows].index(name)]["easy"] is False
        axes[0, col].set(title=f"{name} ({'hard' if hard else 'easy'})", xscale="log", xlabel="NFE per token",
                         ylabel="accuracy %", ylim=(-3, 103))
        axes[1, col].set(xscale="log", xlabel="tokens/s (batched)", ylabel="accuracy %", ylim=(-3, 103))
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def merge(files: list[str]) -> list[dict]:
    """Rows of several result files (each row tagged with its file's instance count), grouped by model and task."""
    groups = {}
    for file in files:
        with open(file) as f:
            data = json.load(f)
        new = {}
        for r in data["rows"]:
            new.setdefault((r["model"], r["task"]), []).append({"n": data["n"], "workload": "synthetic", **r})
        groups |= new
    order = [(k, t) for k in ("bidirectional", "block_causal", "causal")
             for t in [*tasks.TASKS, "code 256", "code 512"]]
    return [r for key in sorted(groups, key=lambda kt: order.index(kt) if kt in order else len(order))
            for r in groups[key]]


def tiny_models(ckpt: str, kind: str, names: list[str]) -> dict:
    """The `kind` tiny dLLM of each task that has one under `ckpt` (the others are reported, not silently dropped)."""
    return task_models(os.path.join(ckpt, kind), names, f"{kind} tiny dLLM")


def task_models(root: str, names: list[str], what: str) -> dict:
    """The model of each task that has one at root/<task> (the others are reported, not silently dropped)."""
    paths = {name: os.path.join(root, name) for name in names}
    models = {name: pdx.load_model(path) for name, path in paths.items() if os.path.isdir(path)}
    if missing := sorted(set(paths) - set(models)):
        print(f"no {what} for {', '.join(missing)} under {root}: skipped", file=sys.stderr)
    return models


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    ap.add_argument("--ckpt", default="checkpoints/tiny_dllm", help="the synthetic suite's and long tasks' models")
    ap.add_argument("--n", type=int, default=200, help="held-out instances per synthetic task")
    ap.add_argument("--long-n", type=int, default=32, help="held-out instances per long task")
    ap.add_argument("--tasks", default=",".join(tasks.TASKS), help="tasks of the synthetic, long and ar workloads")
    ap.add_argument("--ar-ckpt", default="checkpoints/tiny_ar", help="the same-vocabulary AR models (<dir>/<task>)")
    ap.add_argument("--settings", default=None, help="comma-separated setting labels to run (default: all)")
    ap.add_argument("--models", default="bidirectional,block_causal")
    ap.add_argument("--code-ckpt", default="checkpoints/code_dllm", help="the code dLLMs (<dir>/<model>)")
    ap.add_argument("--code-n", type=int, default=16, help="held-out function prompts")
    ap.add_argument("--code-gen", default="256,512", help="completion lengths in bytes")
    ap.add_argument("--code-data", default=None, help="directory of .py files (default: the standard library)")
    ap.add_argument("--batch", type=int, default=8, help="rows per decode call")
    ap.add_argument("--n1", type=int, default=2, help="instances also decoded alone, for tokens/s at batch 1")
    ap.add_argument("--out", default="bench/dllm_eval")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="evaluate nothing: combine these result files (a later "
                    "file's rows replace an earlier one's for the same model and task) into OUT")
    args = ap.parse_args(argv)
    workloads = args.workloads.split(",")
    if unknown := set(workloads) - set(WORKLOADS):
        raise InvalidInputError(f"unknown workloads {sorted(unknown)}: choose from {', '.join(WORKLOADS)}")
    if args.batch < 1 or args.n1 < 0 or any(n % args.batch for n in (args.n, args.long_n, args.code_n)):
        raise InvalidInputError(f"--batch must be >= 1 and divide --n ({args.n}), --long-n ({args.long_n}) and "
                                f"--code-n ({args.code_n}); --n1 >= 0 (got batch {args.batch}, n1 {args.n1})")
    names = args.tasks.split(",")
    for name in names:
        tasks.get(name)  # an unknown task fails here, before any model loads
    short, long = [t for t in names if t in tasks.SHORT], [t for t in names if t in tasks.LONG]
    rows = [] if not args.merge else merge(args.merge)
    for kind in args.models.split(",") if not args.merge else ():
        for workload, picked, n, runs in (("synthetic", short, args.n, settings(kind, tasks.GEN_LEN)),
                                          ("long", long, args.long_n, long_settings(kind))):
            runs = [r for r in runs if args.settings is None or r[0] in args.settings.split(",")]
            if workload not in workloads or not picked or not runs:
                continue
            models = tiny_models(args.ckpt, kind, picked)
            rows += [{"model": kind, "n": n, **r} for r in evaluate(models, n, runs, args.batch, args.n1, workload)]
        path = os.path.join(args.code_ckpt, kind)
        if "code" in workloads and not os.path.isdir(path):
            print(f"no {kind} code dLLM at {path} (pdx train code_dllm --model {kind}): its code rows are skipped",
                  file=sys.stderr)
        elif "code" in workloads:
            model = pdx.load_model(path)
            for gen in map(int, args.code_gen.split(",")):
                prompts = code_prompts(args.code_n, gen, args.code_data)
                rows += [{"model": kind, "n": args.code_n, **r}
                         for r in evaluate_code(model, kind, prompts, gen, args.batch, args.n1)]
    if "ar" in workloads and not args.merge:
        runs = [("ar greedy", "ar", ar_generate, {})]
        for workload, group, n in (("synthetic", short, args.n), ("long", long, args.long_n)):
            models = task_models(args.ar_ckpt, group, "AR model (pdx train tiny_ar)")
            rows += [{"model": "causal", "n": n, **r} for r in evaluate(models, n, runs, args.batch, args.n1, workload)]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write(args.out + ".json", json.dumps(dict(n=sorted({r["n"] for r in rows}), rows=rows), indent=1))
    atomic_write(args.out + ".md", markdown(rows))
    for workload in dict.fromkeys(r["workload"] for r in rows):
        plot([r for r in rows if r["workload"] == workload],
             args.out + ("" if workload == "synthetic" else f"_{workload}") + ".png")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
