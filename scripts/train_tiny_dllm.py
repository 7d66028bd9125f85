"""Rebuild the tiny dLLMs shipped in checkpoints/tiny_dllm/: one bidirectional (LLaDA-style) and one
block-diffusion (block-causal, block 16) transformer trained on the synthetic task suite
(pdx/train/tasks.py), plus their loss curves (bench/tiny_dllm_loss.png).

    nice -n 10 python scripts/train_tiny_dllm.py [--steps 2500] [--out checkpoints/tiny_dllm]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pdx.io import orbax_checkpoint as checkpoint  # noqa: E402
from pdx.models import transformer  # noqa: E402
from pdx.train import diffusion, tasks  # noqa: E402

TINY = transformer.Config(vocab_size=tasks.VOCAB_SIZE, hidden_size=64, intermediate_size=192, num_layers=3,
                          num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=128,
                          eos_token_ids=(tasks.EOS,), pad_token_id=tasks.PAD, mask_token_id=tasks.MASK)
BLOCK = 16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="checkpoints/tiny_dllm")
    ap.add_argument("--steps", type=int, default=2500, help="bidirectional model; the block model gets 60%%")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--only", choices=["bidirectional", "block_causal"], default=None)
    ap.add_argument("--plot", default="bench/tiny_dllm_loss.png")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out (fresh schedule)")
    args = ap.parse_args(argv)
    curves = {}
    for attention, frac in (("bidirectional", 1.0), ("block_causal", 0.6)):
        if args.only and attention != args.only:
            continue
        t0 = time.time()
        path = os.path.join(args.out, attention)
        params, earlier = None, []
        if args.resume:
            params = checkpoint.load(path)[0]
            with open(os.path.join(args.out, f"{attention}_losses.json")) as f:
                earlier = json.load(f)
        tc = diffusion.TrainConfig(steps=int(args.steps * frac), batch=args.batch, attention=attention,
                                   block_size=BLOCK, seed=len(earlier))  # fresh data when resuming
        params, losses = diffusion.train(TINY, tc, tasks.sample, tasks.PROMPT_LEN, tasks.GEN_LEN, tasks.EOS, tasks.PAD,
                                         params=params)
        losses = np.concatenate([earlier, losses])
        meta = dict(attention=attention, block_size=BLOCK, prompt_len=tasks.PROMPT_LEN, gen_len=tasks.GEN_LEN,
                    tasks=list(tasks.TASKS), train=dataclasses.asdict(tc), total_steps=len(losses),
                    train_s=round(time.time() - t0, 1),
                    final_loss=float(losses[-100:].mean()))
        checkpoint.save(path, params, TINY, meta)
        with open(os.path.join(args.out, f"{attention}_losses.json"), "w") as f:
            json.dump([round(float(x), 4) for x in losses], f)
        curves[attention] = losses
        print(json.dumps(meta))
    if args.plot and curves:
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        diffusion.plot_losses(curves, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
