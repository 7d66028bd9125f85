"""Train the same-vocabulary AR model of the synthetic tasks (checkpoints/tiny_ar): one causal transformer,
the tiny dLLMs' size and vocabulary, trained to write every task's answer (then EOS) after its prompt,
long tasks included. It is the AR baseline of `pdx eval dllm` and the target that verifies a dLLM's
drafts (DiffuSpec, S2D2). Steps cycle over the canvas shapes (the 32 + 32 suite, then each long
task's), one compiled step each; the state lives under --state and a run resumes from it, --minutes
bounds one invocation. Wall time, steps and final loss go to bench/tiny_dllm_train.json, the loss curve to
bench/tiny_ar_loss.png.

    nice -n 10 python scripts/train_tiny_ar.py [--steps 3000] [--minutes 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from pdx.errors import InvalidInputError
from pdx.io import orbax_checkpoint as checkpoint
from pdx.train import autoregressive, diffusion, loop, tasks

CFG = tasks.model_config(positions=1024, diffusion=False)  # the long tiny dLLMs' shape, causal
SHORT_BATCH, LONG_BATCH = 32, 8
LONG_TASKS = ("fill-256", "agree-256", "agree-512")  # the shipped model's (fill-512 came after it)


def canvases() -> tuple[autoregressive.Canvas, ...]:
    """The short suite on every other step, each long task in turn on the rest."""
    short = autoregressive.Canvas(tasks.PROMPT_LEN, tasks.GEN_LEN, SHORT_BATCH,
                                  lambda rng, n: tasks.sample(rng, n, tasks.SHORT))
    out = []
    for name in LONG_TASKS:
        task = tasks.get(name)
        out += [short, autoregressive.Canvas(task.prompt_len, task.gen_len, LONG_BATCH,
                                             lambda rng, n, _name=name: tasks.sample(rng, n, (_name,)))]
    return tuple(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="checkpoints/tiny_ar")
    ap.add_argument("--state", default="runs/tiny_ar")
    ap.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this long")
    ap.add_argument("--plot", default="bench/tiny_ar_loss.png")
    ap.add_argument("--record", default="bench/tiny_dllm_train.json")
    args = ap.parse_args(argv)
    if args.minutes is not None and args.minutes <= 0:
        raise InvalidInputError(f"--minutes must be positive, got {args.minutes}")
    tc = autoregressive.TrainConfig(steps=args.steps, lr=args.lr, warmup=100)
    params, losses = autoregressive.train_answers(CFG, tc, canvases(), tasks.EOS, tasks.PAD, checkpoint_dir=args.state,
                                                  time_limit_s=None if args.minutes is None else 60 * args.minutes)
    done = loop.read_progress(args.state)
    if len(losses) < tc.steps:
        print(f"stopped at step {done['step']} of {tc.steps} ({done['elapsed_s']:.0f} s so far): rerun to resume")
        return 0
    meta = dict(task="all", train=dataclasses.asdict(tc), train_s=done["elapsed_s"],
                final_loss=float(losses[-50:].mean()))
    checkpoint.save(args.out, params, CFG, meta)
    loop.record_run(args.record, "causal:all", meta["train_s"], tc.steps, meta["final_loss"])
    os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
    diffusion.plot_losses({"causal, all tasks": losses}, args.plot, title="tiny AR model on the task suite",
                          ylabel="answer cross-entropy (nats/token)")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
