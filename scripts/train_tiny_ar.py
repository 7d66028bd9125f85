"""Rebuild the same-vocabulary AR models of the synthetic tasks (checkpoints/tiny_ar/<task>): per task, one
causal transformer of the tiny dLLMs' size and vocabulary, trained to write the answer (then EOS) after
its prompt, long tasks included. They are the AR baseline of `pdx eval dllm` and the targets that verify
a dLLM's drafts (DiffuSpec, S2D2). One specialist per task, as for the dLLMs: one 3 x 64 model of every
task (2000 steps, a sixth of them on each long task) left fill-256, add and reverse at 0%.

Every run keeps its training state under --state/<task> and resumes from it; --minutes bounds one
invocation, so a long schedule runs in pieces. Wall time, steps and final loss go to
bench/tiny_dllm_train.json (as causal:<task>), the loss curves to bench/tiny_ar_loss.png.

    nice -n 10 python scripts/train_tiny_ar.py [--only fill-256,add] [--minutes 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from pdx.errors import InvalidInputError
from pdx.files import atomic_write
from pdx.io import orbax_checkpoint as checkpoint
from pdx.models import transformer
from pdx.train import autoregressive, diffusion, loop, tasks

SHORT = tasks.model_config(diffusion=False)
WIDE = tasks.model_config(hidden=128, layers=4, diffusion=False)
LONG = tasks.model_config(positions=1024, diffusion=False)
FILL512 = tasks.model_config(positions=1056, diffusion=False)  # 544 prompt columns + 512


@dataclasses.dataclass(frozen=True)
class Run:
    """One shipped AR model's recipe."""

    steps: int
    cfg: transformer.Config = SHORT
    lr: float = 1e-3
    batch: int = 32


# reverse: 2000 steps (140 s) left it at 31% on held-out instances (the answer column j reads 2j + 1 back):
# its loss sits at 0.33 until about step 3000 (bench/tiny_ar_loss.png); 8000 steps (609 s) solve it.
RUNS = {
    "copy": Run(400), "shift": Run(400), "repeat": Run(400), "choice": Run(1500), "sudoku": Run(1500),
    "reverse": Run(8000), "sort": Run(2000, WIDE), "add": Run(2000, WIDE),
    "fill-256": Run(1000, LONG, batch=8), "agree-256": Run(200, LONG, batch=8), "agree-512": Run(200, LONG, batch=8),
    "fill-512": Run(1000, FILL512, batch=8),
}

# Runs not finished yet (their state under --state, no shipped checkpoint). fill-512: 2.3 s per step of 8 here
# (1056 columns); 438 of its 1000 steps done (1042 s, loss 0.008).
UNFINISHED = {"fill-512"}


def train_one(name: str, run: Run, out: str, state: str, time_limit_s: float | None) -> dict | None:
    """Train (or resume) one task's model; when it finishes, save it and its losses and return its record
    (None: the time limit stopped it first; its state waits under `state`)."""
    task = tasks.get(name)
    canvas = autoregressive.Canvas(task.prompt_len, task.gen_len, run.batch,
                                   lambda rng, n: tasks.sample(rng, n, (name,)))
    tc = autoregressive.TrainConfig(steps=run.steps, lr=run.lr, warmup=min(100, run.steps // 4))
    resume = os.path.join(state, name)
    params, losses = autoregressive.train_answers(run.cfg, tc, (canvas,), tasks.EOS, tasks.PAD,
                                                  checkpoint_dir=resume, time_limit_s=time_limit_s)
    done = loop.read_progress(resume)
    if len(losses) < run.steps:
        print(f"causal:{name} stopped at step {done['step']} of {run.steps} ({done['elapsed_s']:.0f} s so far): "
              "rerun to resume", flush=True)
        return None
    meta = dict(task=name, prompt_len=task.prompt_len, gen_len=task.gen_len, train=dataclasses.asdict(tc),
                batch=run.batch, train_s=done["elapsed_s"], final_loss=float(np.mean(losses[-50:])))
    checkpoint.save(os.path.join(out, name), params, run.cfg, meta)
    atomic_write(os.path.join(out, f"{name}_losses.json"), json.dumps([round(float(x), 4) for x in losses]))
    print(json.dumps(meta), flush=True)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="checkpoints/tiny_ar")
    ap.add_argument("--state", default="runs/tiny_ar", help="training states, one per task (resumed when present)")
    ap.add_argument("--only", default=None, help="comma-separated tasks, e.g. fill-256,add")
    ap.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this long")
    ap.add_argument("--plot", default="bench/tiny_ar_loss.png")
    ap.add_argument("--record", default="bench/tiny_dllm_train.json", help="each finished run's wall time and loss")
    args = ap.parse_args(argv)
    picked = list(RUNS) if not args.only else args.only.split(",")
    if unknown := [name for name in picked if name not in RUNS]:
        raise InvalidInputError(f"no run {', '.join(unknown)}: choose from {', '.join(RUNS)}")
    if args.minutes is not None and args.minutes <= 0:
        raise InvalidInputError(f"--minutes must be positive, got {args.minutes}")
    deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
    for name in picked:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            print(f"out of time before causal:{name}: rerun to go on", flush=True)
            break
        meta = train_one(name, RUNS[name], args.out, args.state, left)
        if meta is None:
            break
        loop.record_run(args.record, f"causal:{name}", meta["train_s"], RUNS[name].steps, meta["final_loss"])
    if args.plot:
        curves = {}
        for name in RUNS:
            file = os.path.join(args.out, f"{name}_losses.json")
            if os.path.isfile(file):
                with open(file) as f:
                    curves[f"causal {name}"] = json.load(f)
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        diffusion.plot_losses(curves, args.plot, title="tiny AR models on the task suite",
                              ylabel="answer cross-entropy (nats/token)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
