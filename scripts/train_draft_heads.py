"""Train Medusa or Clover-2 draft heads for SmolLM2-135M-Instruct on its own continuations (`make_draft_data.py`).

Medusa (`--drafter medusa`, the default) steps: featurize the data once with the frozen target
(cached in `--state`/features.npz), pick the vocabulary subset covering `--coverage` of the training
targets, train the heads (resumable: the training state lives in `--state`/medusa), measure each
head's top-k accuracy on the held-out sequences, build Medusa's greedy sparse tree of `--tree-size`
nodes from it, and write the heads (bf16, with the subset and the tree) to the shipped checkpoint.
The loss curve goes to bench/draft_heads_loss.png, the accuracies and the recipe to
bench/draft_heads.json.

Clover (`--drafter clover`, `pdx.train.clover_heads`): the same steps over whole sequences (the
target's hidden state at every position, cached in `--state`/clover_features.npz), the KD loss, the
training state in `--state`/clover, the tree from the heads' teacher-forced held-out accuracies;
bench/clover_heads{.json,_loss.png}.

    nice -n 10 python scripts/train_draft_heads.py [--drafter medusa|clover] [--steps 1500] [--tree-size 15]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pdx.decoding.speculative import clover, head_checkpoint, medusa
from pdx.files import atomic_write
from pdx.model import load_model
from pdx.train import clover_heads as ch
from pdx.train import diffusion, loop
from pdx.train import draft_heads as dh


def cached(path: str, build, fits=lambda z: True) -> dict:
    """The arrays `build()` returns (plus `seconds`, its run time), saved atomically to `path` on the first
    run and read back after while `fits` them (the target's pass over the data is the slow part)."""
    if os.path.isfile(path):
        with np.load(path) as z:
            if fits(z):
                return dict(z)
    t0 = time.time()
    out = build()
    out["seconds"] = np.float64(time.time() - t0)
    buf = io.BytesIO()
    np.savez(buf, **out)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, buf.getvalue())
    return out


def shards(data: str, kind: str) -> list:
    if not (seqs := dh.read_shards(data, kind)):
        raise SystemExit(f"no {kind} shards in {data}: run scripts/make_draft_data.py first")
    return seqs


def features(model, data: str, state: str, num_heads: int) -> dict:
    """{train,heldout}_{feats,targets} and `seconds`: Medusa's per-position features, cached."""
    def build():
        out = {}
        for kind in ("train", "heldout"):
            f, t = dh.featurize(model, shards(data, kind), num_heads)
            out[f"{kind}_feats"], out[f"{kind}_targets"] = f.astype(np.float16), t
        return out

    return cached(os.path.join(state, "features.npz"), build, lambda z: z["train_targets"].shape[1] == num_heads)


def sequence_features(model, data: str, state: str) -> dict:
    """{train,heldout}_{hidden,tokens,offsets,prompt_lens} (`clover_heads.featurize`) and `seconds`, cached."""
    return cached(os.path.join(state, "clover_features.npz"),
                  lambda: {f"{kind}_{k}": v for kind in ("train", "heldout")
                           for k, v in ch.featurize(model, shards(data, kind)).items()})


def ship(model, args, kind: str, heads, vocab, evaluate, meta: dict, losses, train_s: float, features_s: float,
         name: str, title: str, ylabel: str) -> int:
    """Write the heads (bf16, with the vocabulary subset and the sparse tree built from `evaluate`'s held-out
    top-k accuracies of the bf16 heads) to the checkpoint, and the report and loss curve to bench/<name>."""
    shipped = jax.tree.map(lambda a: np.asarray(a, jnp.bfloat16), heads)
    acc, heldout_loss = evaluate(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), shipped))
    paths, expected = dh.sparse_tree(acc, args.tree_size)
    with open(os.path.join(args.data, "recipe.json")) as f:
        recipe = json.load(f)
    meta = {"tree": paths, **meta, "expected_accepted_per_pass": round(expected, 3),
            "heldout_topk_accuracy": np.round(acc, 4).tolist(), "heldout_loss": round(heldout_loss, 4),
            "vocab_subset": len(vocab), "data": {k: v for k, v in recipe.items() if k != "args"}}
    head_checkpoint.save(args.out, kind, {"heads": shipped, "vocab": vocab}, model, meta)
    os.makedirs(args.bench, exist_ok=True)
    report = {**meta, "features_s": round(features_s, 1), "train_s": round(train_s, 1),
              "final_loss": float(np.mean(losses[-50:])), "losses": [round(float(x), 4) for x in losses],
              "head_params": int(sum(x.size for x in jax.tree.leaves(shipped)))}
    atomic_write(os.path.join(args.bench, f"{name}.json"), json.dumps(report))
    diffusion.plot_losses({kind: np.asarray(losses)}, os.path.join(args.bench, f"{name}_loss.png"), title=title,
                          ylabel=ylabel)
    print(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=1), flush=True)
    return 0


def main_clover(model, args) -> int:
    feats = sequence_features(model, args.data, args.state)
    data = {kind: {k: feats[f"{kind}_{k}"] for k in ("hidden", "tokens", "offsets", "prompt_lens")}
            for kind in ("train", "heldout")}
    tc = ch.TrainConfig(num_heads=args.heads or 5, steps=args.steps, batch=args.batch or 8, window=args.window,
                        lr=args.lr, coverage=args.coverage)
    geo = clover.Geometry.of(model.cfg)
    vocab = dh.vocab_subset(ch.targets(data["train"], tc.num_heads), tc.coverage)
    out_rows = np.asarray(model.family.lm_head_rows(model.params, model.cfg, jnp.asarray(vocab)))
    embed = ch.embed_table(model)
    print(f"{len(data['train']['prompt_lens'])} training sequences ({len(data['train']['tokens'])} positions), "
          f"{len(data['heldout']['prompt_lens'])} held-out; vocabulary subset {len(vocab)} of "
          f"{model.cfg.vocab_size} tokens covers {tc.coverage:.0%} of targets", flush=True)
    heads, losses = ch.train(ch.init_for(model, geo, tc.seed), geo, out_rows, embed, data["train"], tc,
                             checkpoint_dir=os.path.join(args.state, "clover"), save_every=args.save_every)
    train_s = loop.read_progress(os.path.join(args.state, "clover"))["elapsed_s"]
    return ship(model, args, clover.KIND, heads, vocab,
                lambda h: ch.evaluate(h, geo, out_rows, vocab, embed, data["heldout"], tc, progress=True),
                {"geometry": dataclasses.asdict(geo), "train": dataclasses.asdict(tc)}, losses, train_s,
                float(feats.get("seconds", np.nan)), "clover_heads", "Clover-2 heads on SmolLM2-135M-Instruct",
                f"KD loss (SmoothL1 x {tc.regression_weight:g} + soft CE, heads x {tc.decay}^i)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafter", choices=("medusa", "clover"), default="medusa")
    ap.add_argument("--data", default="runs/draft_data")
    ap.add_argument("--state", default="runs/draft_heads")
    ap.add_argument("--heads", type=int, default=None, help="heads (tree depths trained): medusa 4, clover 5")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=None, help="per step: medusa 1024 rows, clover 8 windows")
    ap.add_argument("--window", type=int, default=512, help="clover: positions per training window")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--coverage", type=float, default=0.99)
    ap.add_argument("--tree-size", type=int, default=15, help="nodes of the sparse tree (a pass scores one more)")
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--out", default=None, help="checkpoint (default: the shipped one of the drafter)")
    ap.add_argument("--bench", default="bench")
    args = ap.parse_args(argv)
    model = load_model()
    if args.drafter == "clover":
        args.out = args.out or clover.DEFAULT_HEADS
        return main_clover(model, args)
    args.heads, args.batch, args.out = args.heads or 4, args.batch or 1024, args.out or medusa.DEFAULT_HEADS
    data = features(model, args.data, args.state, args.heads)
    tc = dh.TrainConfig(num_heads=args.heads, steps=args.steps, batch=args.batch, lr=args.lr, coverage=args.coverage)
    vocab = dh.vocab_subset(data["train_targets"], tc.coverage)
    out_rows = np.asarray(model.family.lm_head_rows(model.params, model.cfg, jnp.asarray(vocab)))
    print(f"{len(data['train_feats'])} training rows, {len(data['heldout_feats'])} held-out; vocabulary subset "
          f"{len(vocab)} of {model.cfg.vocab_size} tokens covers {tc.coverage:.0%} of targets", flush=True)
    heads, losses = dh.train(out_rows, data["train_feats"], dh.to_subset(data["train_targets"], vocab), tc,
                             checkpoint_dir=os.path.join(args.state, "medusa"), save_every=args.save_every)
    train_s = loop.read_progress(os.path.join(args.state, "medusa"))["elapsed_s"]  # over every resumed piece

    def evaluate(heads):
        acc = dh.topk_accuracy(heads, out_rows, vocab, data["heldout_feats"], data["heldout_targets"])
        loss = float(dh.loss_fn(heads, jnp.asarray(out_rows), jnp.asarray(data["heldout_feats"], jnp.float32),
                                jnp.asarray(dh.to_subset(data["heldout_targets"], vocab))))
        return acc, loss

    return ship(model, args, medusa.KIND, heads, vocab, evaluate, {"train": dataclasses.asdict(tc)}, losses, train_s,
                float(data.get("seconds", np.nan)), "draft_heads", "Medusa heads on SmolLM2-135M-Instruct",
                "weighted cross-entropy (nats, heads 1-4)")


if __name__ == "__main__":
    sys.exit(main())
