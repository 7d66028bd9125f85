"""Rebuild the tiny dLLMs shipped in checkpoints/tiny_dllm/: per task of the synthetic suite
(pdx/train/tasks.py), one bidirectional (LLaDA-style) transformer, and for a subset one
block-diffusion (block-causal, block 16) transformer, plus their loss curves (bench/tiny_dllm_loss.png).
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
100% one token per step in 2000 steps. Choice mixes its words even one token per step after 3000
steps at 1e-3 (3 x 64) and 2000 or 5000 (4 x 128): its loss stops at the per-slot-marginal value
(0.217), 0-2% exact, so its shipped model is the short 3e-3 run. About 0.11 s per step at
batch 32 on this CPU when idle (25,400 steps in all): the whole rebuild takes about 50 minutes.

    nice -n 10 python scripts/train_tiny_dllm.py [--scale 1.0] [--out checkpoints/tiny_dllm]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from pdx.io import orbax_checkpoint as checkpoint
from pdx.models import transformer
from pdx.train import diffusion, tasks

TINY = transformer.Config(vocab_size=tasks.VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_layers=3,
                          num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=128,
                          eos_token_ids=(tasks.EOS,), pad_token_id=tasks.PAD, mask_token_id=tasks.MASK)
# Addition and sort (0% and 89% one token per step in 16-token blocks with 3 x 64 specialists) train 4 layers
# x 128 wide.
WIDE = dataclasses.replace(TINY, hidden_size=128, intermediate_size=384, num_layers=4, head_dim=32)
SIZE = {("bidirectional", name): WIDE for name in ("add", "sort")}  # others: TINY
BLOCK = 16
STEPS = {  # training steps per (attention, task)
    "bidirectional": dict(copy=400, shift=400, choice=800, add=2000, sudoku=2500, sort=4000, reverse=16000,
                          repeat=500),
    "block_causal": dict(copy=400, choice=600),
}
LR = {("bidirectional", name): 1e-3 for name in ("sudoku", "sort", "reverse", "add")}  # others: 3e-3
# Stratified t (one mask rate per batch stratum) for the tasks retrained with it; the others keep the i.i.d.
# draws they were trained with, so the shipped checkpoints are what this script rebuilds.
STRATIFIED = {("bidirectional", name) for name in ("choice", "add", "sudoku", "sort", "reverse")}
COUNT_MASKING = {("bidirectional", name) for name in ("choice", "add", "sudoku", "reverse", "sort")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="checkpoints/tiny_dllm")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--only", default=None, help="comma-separated attention:task pairs, e.g. bidirectional:copy")
    ap.add_argument("--plot", default="bench/tiny_dllm_loss.png")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    for attention, per_task in STEPS.items():
        for name, steps in per_task.items():
            if only and f"{attention}:{name}" not in only:
                continue
            tc = diffusion.TrainConfig(steps=max(1, int(steps * args.scale)), batch=args.batch,
                                       lr=LR.get((attention, name), 3e-3), warmup=50,
                                       attention=attention, block_size=BLOCK,
                                       stratified_t=(attention, name) in STRATIFIED,
                                       count_masking=(attention, name) in COUNT_MASKING)
            t0 = time.time()
            cfg = SIZE.get((attention, name), TINY)
            params, losses = diffusion.train(cfg, tc, lambda rng, n, _g, _name=name: tasks.sample(rng, n, (_name,)),
                                             tasks.PROMPT_LEN, tasks.GEN_LEN, tasks.EOS, tasks.PAD)
            meta = dict(attention=attention, block_size=BLOCK, task=name, prompt_len=tasks.PROMPT_LEN,
                        gen_len=tasks.GEN_LEN, train=dataclasses.asdict(tc), train_s=round(time.time() - t0, 1),
                        final_loss=float(losses[-50:].mean()))
            path = os.path.join(args.out, attention, name)
            checkpoint.save(path, params, cfg, meta)
            with open(os.path.join(args.out, attention, f"{name}_losses.json"), "w") as f:
                json.dump([round(float(x), 4) for x in losses], f)
            print(json.dumps(meta), flush=True)
    if args.plot:
        curves = {}
        for attention, per_task in STEPS.items():
            for name in per_task:
                file = os.path.join(args.out, attention, f"{name}_losses.json")
                if os.path.isfile(file):
                    with open(file) as f:
                        curves[f"{attention} {name}"] = json.load(f)
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        diffusion.plot_losses(curves, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
