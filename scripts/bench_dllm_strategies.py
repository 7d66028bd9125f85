"""The training-free dLLM rules side by side (issue 25): LLaDA one token per step, Fast-dLLM threshold and
factor, LocalLeap, CD4LM's CAD, CreditDecoding, AdaBlock (blocks ending at a confident EOS: the tiny task
models have no newline) and Prophet, each at its paper's defaults and one more
aggressive setting, on the hard synthetic tasks and the long tasks (which stand in for the code workload
until a code dLLM ships), every setting timed in the same run. No cache (the rules' own effect on NFE;
the caches' is in bench/dllm_eval). Accuracy: exact match or a valid answer (`tasks.solved`).

Writes bench/dllm_strategies.{json,md} and the Pareto plots bench/dllm_strategies{,_long}.png (accuracy
against NFE per token and against tokens/s), and prints, per task, the best rule's NFE against Fast-dLLM
threshold 0.9's at no more than 1 point lower accuracy.

    nice -n 10 python scripts/bench_dllm_strategies.py [--n 64] [--long-n 16] [--tasks choice,add,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pdx.decoding.diffusion import adablock, cd4lm, credit, fast_dllm, llada, localleap, prophet
from pdx.errors import InvalidInputError
from pdx.files import atomic_write
from pdx.train import tasks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling eval script, however this one is run
import eval_dllm  # noqa: E402

HARD = ("choice", "add", "sudoku", "repeat", "reverse")
BASELINE = "threshold 0.9"


def strategies(block: int) -> list[tuple[str, str, object, dict]]:
    """(label, family, generate, options), all without a cache, in `block`-token blocks."""
    b = dict(block_size=block, cache="none")
    return [("llada 1 tok/step", "llada", llada.generate, dict(block_size=block)),
            *[(f"threshold {t}", "fast-dllm threshold", fast_dllm.generate, dict(threshold=t, **b))
              for t in (0.9, 0.7)],
            ("factor 2.0", "fast-dllm factor", fast_dllm.generate, dict(factor=2.0, **b)),
            ("localleap 0.9/0.75/r4", "localleap", localleap.generate, dict(**b)),
            ("localleap 0.9/0.5/r8", "localleap", localleap.generate, dict(relaxed_threshold=0.5, radius=8, **b)),
            ("cad 0.95", "cd4lm-cad", cd4lm.generate, dict(**b)),
            ("cad 0.8", "cd4lm-cad", cd4lm.generate, dict(threshold=0.8, **b)),
            ("credit 0.9", "credit", credit.generate, dict(**b)),
            ("credit 0.8", "credit", credit.generate, dict(threshold=0.8, **b)),
            ("adablock 0.3", "adablock", adablock.generate, dict(**b)),
            ("adablock 0.3, threshold 0.7", "adablock", adablock.generate, dict(threshold=0.7, **b)),
            ("prophet 7.5/5/2.5", "prophet", prophet.generate, dict(block_size=block)),
            ("prophet 4/2.5/1", "prophet", prophet.generate, dict(early=4.0, mid=2.5, late=1.0, block_size=block))]


def verdicts(rows: list[dict]) -> list[str]:
    """Per task: the new rule with the fewest NFE per token within 1 point of threshold 0.9's accuracy."""
    lines = []
    for name in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == name]
        base = next(r for r in mine if r["setting"] == BASELINE)
        fair = [r for r in mine if r["family"] not in ("llada", "fast-dllm threshold", "fast-dllm factor")
                and r["accuracy"] >= base["accuracy"] - 1.0]
        if not fair:
            lines.append(f"- {name}: no new rule within 1 point of {BASELINE} ({base['accuracy']:.1f}%)")
            continue
        best = min(fair, key=lambda r: r["nfe_per_token"])
        lines.append(f"- {name}: {best['setting']} {best['nfe_per_token']:.3f} NFE/token at {best['accuracy']:.1f}% "
                     f"vs {BASELINE} {base['nfe_per_token']:.3f} at {base['accuracy']:.1f}% "
                     f"({best['nfe_per_token'] / base['nfe_per_token']:.2f}x the NFE)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="checkpoints/tiny_dllm")
    ap.add_argument("--n", type=int, default=64, help="held-out instances per hard synthetic task")
    ap.add_argument("--long-n", type=int, default=16, help="held-out instances per long task")
    ap.add_argument("--tasks", default=",".join(HARD + tasks.LONG))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n1", type=int, default=1, help="instances also decoded alone (tokens/s at batch 1)")
    ap.add_argument("--out", default="bench/dllm_strategies")
    args = ap.parse_args(argv)
    names = args.tasks.split(",")
    for name in names:
        tasks.get(name)
    if args.batch < 1 or args.n % args.batch or args.long_n % args.batch:
        raise InvalidInputError(f"--batch must be >= 1 and divide --n and --long-n (got {args.batch})")
    rows = []
    for workload, picked, n, block in (("synthetic", [t for t in names if t in tasks.SHORT], args.n, eval_dllm.BLOCK),
                                       ("long", [t for t in names if t in tasks.LONG], args.long_n,
                                        eval_dllm.LONG_BLOCK)):
        models = eval_dllm.tiny_models(args.ckpt, "bidirectional", picked)
        if models:
            rows += [{"model": "bidirectional", "n": n, **r}
                     for r in eval_dllm.evaluate(models, n, strategies(block), args.batch, args.n1, workload)]
    load = os.getloadavg()
    summary = verdicts(rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    atomic_write(args.out + ".json", json.dumps(dict(rows=rows, verdicts=summary, load_average=load), indent=1))
    atomic_write(args.out + ".md", "# Training-free dLLM rules, no cache, bidirectional tiny dLLMs\n\n"
                 + eval_dllm.markdown(rows) + "\n" + "\n".join(summary) + f"\n\nLoad average after the run: {load}\n")
    for workload in dict.fromkeys(r["workload"] for r in rows):
        eval_dllm.plot([r for r in rows if r["workload"] == workload],
                       args.out + ("" if workload == "synthetic" else f"_{workload}") + ".png")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
