"""Self-distillation data for SmolLM2's draft heads: its own greedy continuations of code prompts.

The prompts are Python standard-library functions (the `def` line through the end of its docstring,
`pdx.train.code_data.function_prompts`), never HumanEval (the evaluation set): files of the training
split (by path hash) feed the training data, the held-out tenth a small held-out set. Each prompt is
tokenized raw, as HumanEval prompts are, and SmolLM2 (fp32, the model the heads serve) continues it
greedily with pdx's batched AR engine. Prompts are sorted by length so a batch pads little.

Output under `--out` (default runs/draft_data): `train-NNNN.npz` / `heldout-NNNN.npz` shards, each
`tokens` (prompt then continuation, flattened), `offsets [n+1]` and `prompt_lens [n]`, written
atomically; a run finding a shard skips it, so a killed run resumes. `recipe.json` records the recipe
and the size.

    nice -n 10 python scripts/make_draft_data.py [--train 1024] [--heldout 64] [--new-tokens 192]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from pdx.decoding import ar
from pdx.files import atomic_write
from pdx.model import load_model
from pdx.train import code_data, draft_heads

SHARD = 64  # prompts per shard


def prompts_of(split: code_data.Split, tokenizer, n: int, max_prompt_bytes: int, seed: int) -> list[list[int]]:
    """`n` tokenized function prompts of `split`, drawn at random (fixed seed), sorted by length."""
    found = code_data.function_prompts(split, max_prompt_bytes, 0)
    if len(found) < n:
        raise SystemExit(f"only {len(found)} function prompts in the split, {n} asked for")
    picked = np.random.default_rng(seed).choice(len(found), n, replace=False)
    prompts = [tokenizer.encode(found[i][1].decode("utf-8", errors="replace")) for i in picked]
    return sorted(prompts, key=len)


def write_shard(path: str, rows: list[list[int]], prompt_lens: list[int]) -> None:
    buf = io.BytesIO()
    np.savez(buf, tokens=np.concatenate([np.asarray(r, np.int32) for r in rows]),
             offsets=np.cumsum([0] + [len(r) for r in rows]).astype(np.int64),
             prompt_lens=np.asarray(prompt_lens, np.int32))
    atomic_write(path, buf.getvalue())


def generate_split(model, prompts, kind: str, out: str, batch: int, new_tokens: int) -> int:
    """Write `kind` shards of `prompts` and their continuations; returns the tokens generated this run."""
    made = 0
    shards = [prompts[i : i + SHARD] for i in range(0, len(prompts), SHARD)]
    for s, shard in enumerate(tqdm(shards, desc=f"{kind} shards")):
        path = os.path.join(out, f"{kind}-{s:04d}.npz")
        if os.path.exists(path):
            continue
        rows = []
        for i in tqdm(range(0, len(shard), batch), desc=f"shard {s}", leave=False):
            part = shard[i : i + batch]
            res = ar.generate(model, part, max_new_tokens=new_tokens)
            rows += [p + res.row(j) for j, p in enumerate(part)]
            made += int(res.lengths.sum())
        write_shard(path, rows, [len(p) for p in shard])
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=1024, help="training prompts")
    ap.add_argument("--heldout", type=int, default=64, help="held-out prompts (held-out files)")
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--max-prompt-bytes", type=int, default=768)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/draft_data")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model = load_model()
    t0 = time.time()
    made = 0
    for kind, n, held_out in (("train", args.train, False), ("heldout", args.heldout, True)):
        prompts = prompts_of(code_data.load_split(held_out), model.tokenizer, n, args.max_prompt_bytes, args.seed)
        made += generate_split(model, prompts, kind, args.out, args.batch, args.new_tokens)
    sizes = {kind: draft_heads.read_shards(args.out, kind) for kind in ("train", "heldout")}
    recipe = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32), greedy, default stop tokens",
        "prompts": "Python standard library functions: def line through the docstring, raw (no chat template); "
                   "train from the training split's files, heldout from the held-out tenth (path hash)",
        "args": vars(args),
        **{f"{k}_sequences": len(v) for k, v in sizes.items()},
        **{f"{k}_generated_tokens": int(sum(len(t) - p for t, p in v)) for k, v in sizes.items()},
        **{f"{k}_tokens": int(sum(len(t) for t, _ in v)) for k, v in sizes.items()},
        "generated_this_run": made, "seconds_this_run": round(time.time() - t0, 1),
    }
    atomic_write(os.path.join(args.out, "recipe.json"), json.dumps(recipe, indent=1))
    print(json.dumps(recipe, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
