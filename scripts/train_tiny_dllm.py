"""Rebuild the tiny dLLMs shipped in checkpoints/tiny_dllm/: per task of the synthetic suite
(pdx/train/tasks.py), one bidirectional (LLaDA-style) transformer, and for a subset one
block-diffusion (block-causal, block 16; block 32 for the long tasks) transformer, plus their loss
curves (bench/tiny_dllm_loss.png).
One small specialist per task learns in minutes on 2 CPU cores; one multi-task model of this size
did not (it plateaued at a 0.97 loss after 2500 steps).

The dependency tasks train with lower-variance masking (see `diffusion.TrainConfig`): with 32-token
answers, t ~ U(0, 1) gives rows with one masked token weighted up to 1000 that dominate the clipped
gradient, and 500-1000 such steps left choice/add/sudoku/reverse at the loss of a model that has
learned only where EOS goes (0% exact match). The learning rate mattered more: at 3e-3 those tasks
stayed at that loss whatever the masking and step count (reverse 2000 steps, sudoku 600), at 1e-3
sudoku and reverse leave it within a few hundred steps. Addition stays at chance digits on uniform
sums (every digit of the sum needs both operands at once: no gradient toward either alone) at 5e-4 to
3e-3 over 800-2000 steps, 3 x 64 or 4 x 128; half its training sums draw zero-rich operands
(`tasks.Task.curriculum`), where a digit of the sum copies one operand's, and 4 x 128 then reaches
100% one token per step in 2000 steps. Choice over random words mixed its words even one token per
step after 3000 steps at 1e-3 (3 x 64) and 2000 or 5000 (4 x 128): the loss stopped at the
per-slot-marginal value (0.217), 0-2% exact (11.5% with each word from its own letter group). Posed
over runs of consecutive letters (`tasks._choice`), 3 x 64 at 1e-3 reaches 69% one token per step in
1500 steps (its misses: a listed run one slot off) and 100% in 4000. About 0.11 s per step at batch 32
on this CPU when idle.

The long tasks (`fill-256/512`, `agree-256/512`: 256- and 512-column canvases) train the same small
models with positions up to 1024, in 32-token blocks, at a smaller batch (see RUNS for each run's
settings; their wall times, steps and final losses are written to bench/tiny_dllm_train.json).
Fill-256 learns to 0 wrong tokens in 2400 steps bidirectionally (19 min); block diffusion scoring one
32-token block per example, an eighth of the answer, left its model at 4% wrong tokens (14% of dittos)
after the same 2400 steps, so its block-causal run scores every block per pass (`all_blocks`, BD3-LM).
Fill-512 (2.4 s per step) runs in phases (`Run.more`: the weights go on under a new schedule), and its
block-diffusion model starts from the bidirectional one (`Run.init`), which decodes fill-512 block by
block with one wrong token per answer before any block-causal training.
Every run keeps its training state under --state and resumes from it (a state saved under another
recipe is refused); --minutes bounds one invocation, so a long schedule runs in pieces (rerun the same
command to go on).

    nice -n 10 python scripts/train_tiny_dllm.py [--only bidirectional:fill-256,...] [--minutes 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from pdx.errors import InvalidInputError
from pdx.files import atomic_write
from pdx.io import orbax_checkpoint as checkpoint
from pdx.models import transformer
from pdx.train import diffusion, loop, tasks

TINY = tasks.model_config()
# Addition and sort (0% and 89% one token per step in 16-token blocks with 3 x 64 specialists) train 4 layers
# x 128 wide.
WIDE = tasks.model_config(hidden=128, layers=4)
LONG = tasks.model_config(positions=1024)  # the long tasks' canvases: up to 512 + 512
FILL512 = tasks.model_config(positions=1056)  # fill-512: 544 prompt columns (513 tokens) + 512


class Phase(NamedTuple):
    """A stretch of a run under one schedule: its steps, peak learning rate and EOS weight."""

    steps: int
    lr: float
    eos_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Run:
    """One shipped model's recipe: its size, its training settings (`diffusion.TrainConfig`)."""

    steps: int
    cfg: transformer.Config = TINY
    lr: float = 3e-3
    batch: int = 32
    block: int = 16
    # Stratified t (one mask rate per batch stratum) and count masking for the runs retrained with them; the
    # others keep the i.i.d. draws they were trained with, so the shipped checkpoints are what this script rebuilds.
    stratified: bool = False
    count_masking: bool = False
    all_blocks: bool = False  # block diffusion: every block scored in one pass (BD3-LM)
    init: tuple[str, str] | None = None  # (attention, task) of a shipped model to start from, not random weights
    more: tuple[Phase, ...] = ()  # further phases: the weights go on, the optimizer restarts

    @property
    def phases(self) -> tuple[Phase, ...]:
        return (Phase(self.steps, self.lr), *self.more)

    @property
    def total_steps(self) -> int:
        return sum(phase.steps for phase in self.phases)


_HARD = dict(stratified=True, count_masking=True)
RUNS = {
    ("bidirectional", "copy"): Run(400),
    ("bidirectional", "shift"): Run(400),
    ("bidirectional", "choice"): Run(4000, lr=1e-3, **_HARD),
    ("bidirectional", "add"): Run(2000, WIDE, lr=1e-3, **_HARD),
    ("bidirectional", "sudoku"): Run(2500, lr=1e-3, **_HARD),
    ("bidirectional", "sort"): Run(4000, WIDE, lr=1e-3, **_HARD),
    ("bidirectional", "reverse"): Run(16000, lr=1e-3, **_HARD),
    ("bidirectional", "repeat"): Run(500),
    ("block_causal", "copy"): Run(400),
    ("block_causal", "choice"): Run(3000, lr=1e-3, **_HARD),
    **{(attention, name): Run(steps, LONG, lr=1e-3, batch=8, block=32, **_HARD)
       for attention in ("bidirectional", "block_causal")
       for name, steps in (("fill-256", 2400), ("agree-256", 300), ("agree-512", 300))
       if (attention, name) != ("block_causal", "fill-256")},
    # one block scored per example left 4% wrong tokens after 2400 steps; every block per pass:
    ("block_causal", "fill-256"): Run(2400, LONG, lr=1e-3, batch=8, block=32, all_blocks=True, **_HARD),
    # Started from its fill-256 model, the bidirectional run sat at the loss of uniform letters (2.71) for 200 steps.
    # Posed without the prompt's final SEP, 2800 steps (1500 at 1e-3, 600 at 3e-4, 700 at 3e-4 with the EOS column's
    # cross-entropy weighted 30x; 118 min) got every held-out letter right but the final EOS in only 56% of answers:
    # that column's source 512 back was the answer's own first letter (see tasks.py).
    # Posed with the final SEP, 1500 steps (64 min) again left every answer's EOS a letter (its one column is
    # 1/512 of the loss), and 1-5 wrong letters in some answers; 300 steps with that column's cross-entropy
    # weighted 30x put the EOS last in half of 8 held-out answers (0% exact one token per step: letters).
    # After 600 more steps and 300 EOS-weighted ones (2700, 107 min, loss 0.006): 50% of 16 exact one token per
    # step (3 EOS missed, 11 wrong letters, mostly dittos).
    ("bidirectional", "fill-512"): Run(1500, FILL512, lr=1e-3, batch=8, block=32,
                                       more=(Phase(300, 3e-4, 30.0), Phase(600, 3e-4), Phase(300, 3e-4, 30.0),
                                             Phase(600, 3e-4), Phase(300, 3e-4, 30.0)),
                                       **_HARD),
    ("block_causal", "fill-512"): Run(300, FILL512, lr=3e-4, batch=8, block=32, all_blocks=True,
                                      init=("bidirectional", "fill-512"), **_HARD),
}


# Runs not finished yet (their state under --state, no shipped checkpoint).
UNFINISHED = {("bidirectional", "fill-512"), ("block_causal", "fill-512")}


def train_one(attention: str, name: str, run: Run, out: str, state: str, time_limit_s: float | None) -> dict | None:
    """Train (or resume) one run, phase by phase; when it finishes, save its checkpoint and losses and return
    its record (None: the time limit stopped it first; its state waits under `state`)."""
    task = tasks.get(name)
    params = None
    if run.init is not None:
        params, cfg, _ = checkpoint.load(os.path.join(out, *run.init))
        if cfg != run.cfg:
            raise InvalidInputError(f"{attention}:{name} starts from {':'.join(run.init)}, whose model config differs")
    t0, losses, train_s, configs = time.monotonic(), [], 0.0, []
    for i, phase in enumerate(run.phases):
        tc = diffusion.TrainConfig(steps=phase.steps, batch=run.batch, lr=phase.lr, warmup=50, attention=attention,
                                   block_size=run.block, stratified_t=run.stratified, count_masking=run.count_masking,
                                   all_blocks=run.all_blocks, eos_weight=phase.eos_weight)
        resume = os.path.join(state, attention, name + (f".phase{i}" if i else ""))
        left = None if time_limit_s is None else time_limit_s - (time.monotonic() - t0)
        if left is not None and left <= 0:
            print(f"{attention}:{name} out of time before phase {i}: rerun to resume", flush=True)
            return None
        params, phase_losses = diffusion.train(run.cfg, tc, lambda rng, n, _g: tasks.sample(rng, n, (name,)),
                                               task.prompt_len, task.gen_len, tasks.EOS, tasks.PAD, params=params,
                                               checkpoint_dir=resume, time_limit_s=left)
        done = loop.read_progress(resume)
        if len(phase_losses) < phase.steps:
            print(f"{attention}:{name} phase {i} stopped at step {done['step']} of {phase.steps} "
                  f"({done['elapsed_s']:.0f} s so far): rerun to resume", flush=True)
            return None
        losses += [float(x) for x in phase_losses]
        train_s += done["elapsed_s"]
        configs.append(dataclasses.asdict(tc))
    meta = dict(attention=attention, block_size=run.block, task=name, prompt_len=task.prompt_len, gen_len=task.gen_len,
                train=configs[0], **({"phases": configs[1:]} if run.more else {}), init=run.init, train_s=train_s,
                final_loss=float(np.mean(losses[-50:])))
    checkpoint.save(os.path.join(out, attention, name), params, run.cfg, meta)
    atomic_write(os.path.join(out, attention, f"{name}_losses.json"), json.dumps([round(x, 4) for x in losses]))
    print(json.dumps(meta), flush=True)
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="checkpoints/tiny_dllm")
    ap.add_argument("--state", default="runs/tiny_dllm", help="training states, one per run (resumed when present)")
    ap.add_argument("--only", default=None, help="comma-separated attention:task runs, e.g. bidirectional:copy")
    ap.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this long")
    ap.add_argument("--plot", default="bench/tiny_dllm_loss.png")
    ap.add_argument("--record", default="bench/tiny_dllm_train.json", help="each finished run's wall time and loss")
    args = ap.parse_args(argv)
    picked = list(RUNS)
    if args.only:
        picked = [tuple(x.split(":", 1)) for x in args.only.split(",")]
        if unknown := [":".join(p) for p in picked if p not in RUNS]:
            raise InvalidInputError(f"no run {', '.join(unknown)}: choose from "
                                    f"{', '.join(':'.join(k) for k in RUNS)}")
    if args.minutes is not None and args.minutes <= 0:
        raise InvalidInputError(f"--minutes must be positive, got {args.minutes}")
    deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
    for attention, name in picked:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            print(f"out of time before {attention}:{name}: rerun to go on", flush=True)
            break
        meta = train_one(attention, name, RUNS[attention, name], args.out, args.state, left)
        if meta is None:
            break
        loop.record_run(args.record, f"{attention}:{name}", meta["train_s"], RUNS[attention, name].total_steps,
                        meta["final_loss"])
    if args.plot:
        curves = {}
        for attention, name in RUNS:
            file = os.path.join(args.out, attention, f"{name}_losses.json")
            if os.path.isfile(file):
                with open(file) as f:
                    curves[f"{attention} {name}"] = json.load(f)
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        diffusion.plot_losses(curves, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
