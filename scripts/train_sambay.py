"""Train a tiny SambaY and a same-size pdx Llama-family transformer on the same data (byte-level LM on Python
source), with optax; writes loss curves to bench/ and checkpoints to checkpoints/.

Data: the standard library's `.py` files (`pdx.train.code_data`: a tenth held out by path hash, validation
reads only those), UTF-8 bytes (vocab 256), each file followed by a 0 byte (EOS). HumanEval is the evaluation
set and is never trained on. Every step both models see the same batch of random windows.
Checkpoints (small, shipped in the repo):
    checkpoints/sambay_tiny/       Phi-4-mini-flash naming (config.json + model.safetensors): pdx.load_model(DIR)
    checkpoints/transformer_tiny/  orbax (pdx.io.orbax_checkpoint), also pdx.load_model(DIR)
Both are written to a temporary sibling and renamed into place (never half-written).

    nice -n 10 python scripts/train_sambay.py        # ~5 min on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from pdx.files import atomic_dir
from pdx.models import sambay as sb
from pdx.models import transformer as tf
from pdx.train import code_data

VOCAB = 256
SAMBAY = sb.Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4, num_kv_heads=4,
                   sliding_window=32, mamba_d_state=8, mamba_dt_rank=4, scan_chunk=32, eos_token_ids=(0,))
TRANSFORMER = tf.Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_layers=8, num_heads=4,
                        num_kv_heads=4, head_dim=16, max_position_embeddings=4096, eos_token_ids=(0,))


def corpus(root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) byte arrays of the standard library's training and held-out files, each file
    followed by a 0 byte (EOS)."""
    def join(held_out: bool) -> np.ndarray:
        data = b"".join(text + b"\0" for text in code_data.load_split(held_out, root).texts)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    return join(False), join(True)


def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(data) - seq - 1, batch)
        yield np.stack([data[s : s + seq + 1] for s in starts])


def lm_loss(params, tokens, *, family, cfg):
    """Mean next-token cross-entropy of `tokens [B, T+1]`."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape)
    logits, _ = family.forward(params, cfg, x, pos)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_step(family, cfg, opt):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(functools.partial(lm_loss, family=family, cfg=cfg))(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(functools.partial(lm_loss, family=family, cfg=cfg))
    return step, evaluate


def val_loss(evaluate, params, val: np.ndarray, seq: int, windows: int = 64) -> float:
    """Mean loss over `windows` held-out windows spread evenly over the held-out bytes (8 per forward)."""
    n = min(windows, (len(val) - 1) // seq) // 8 * 8
    w = np.stack([val[s : s + seq + 1] for s in np.linspace(0, len(val) - seq - 1, n).astype(int)])
    return float(np.mean([evaluate(params, jnp.asarray(w[i : i + 8])) for i in range(0, n, 8)]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", default="bench")
    parser.add_argument("--ckpt", default="checkpoints")
    parser.add_argument("--data", default=None, help="directory of .py files (default: the standard library)")
    args = parser.parse_args(argv)

    from pdx.io import orbax_checkpoint, sambay_checkpoint, tokenizer

    train, val = corpus(args.data)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(30, args.steps // 2), args.steps, args.lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    models = {"sambay": (sb, SAMBAY, sb.init_params(SAMBAY, jax.random.PRNGKey(0))),
              "transformer": (tf, TRANSFORMER, tf.init_params(TRANSFORMER, jax.random.PRNGKey(0)))}
    state = {}
    for name, (family, cfg, params) in models.items():
        step, evaluate = make_step(family, cfg, opt)
        state[name] = {"params": params, "opt": opt.init(params), "step": step, "evaluate": evaluate,
                       "train": [], "val": [], "n_params": int(sum(a.size for a in jax.tree.leaves(params))),
                       "seconds": 0.0}
    data = batches(train, args.batch, args.seq, np.random.default_rng(0))
    for i in tqdm(range(args.steps), desc="train"):
        tokens = jnp.asarray(next(data))
        for s in state.values():
            t0 = time.perf_counter()
            s["params"], s["opt"], loss = s["step"](s["params"], s["opt"], tokens)
            s["train"].append(float(loss))
            s["seconds"] += time.perf_counter() - t0
            if (i + 1) % args.eval_every == 0 or i == 0:
                s["val"].append((i + 1, val_loss(s["evaluate"], s["params"], val, args.seq)))
    report = {"data": "Python standard library .py files, UTF-8 bytes, held-out tenth by path hash",
              "train_bytes": int(len(train)), "val_bytes": int(len(val)), "steps": args.steps, "batch": args.batch,
              "seq": args.seq, "lr": args.lr}
    for name, s in state.items():
        report[name] = {"params": s["n_params"], "train_loss": s["train"], "val_loss": s["val"],
                        "final_val_loss": s["val"][-1][1], "train_seconds_incl_compile": s["seconds"]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sambay_train.json"), "w") as f:
        json.dump(report, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in state.items():
        smooth = np.convolve(s["train"], np.ones(10) / 10, mode="valid")
        ax.plot(np.arange(len(smooth)) + 10, smooth, label=f"{name} train ({s['n_params'] / 1e3:.0f}k params)")
        ax.plot(*zip(*s["val"]), "o--", label=f"{name} validation")
    ax.axhline(np.log(VOCAB), color="gray", ls=":", label="uniform (ln 256)")
    ax.set(xlabel="step", ylabel="next-byte cross-entropy (nats)", title="tiny SambaY vs transformer, HumanEval bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "sambay_train.png"), dpi=120)

    meta = {"data": report["data"], "steps": args.steps, "final_val_loss": None}
    sp = state["sambay"]
    atomic_dir(os.path.join(args.ckpt, "sambay_tiny"), lambda d: sambay_checkpoint.save(d, SAMBAY, sp["params"]))
    tp = state["transformer"]
    orbax_checkpoint.save(os.path.join(args.ckpt, "transformer_tiny"), tp["params"], TRANSFORMER,
                          meta | {"final_val_loss": tp["val"][-1][1]})
    for name, cfg in (("sambay_tiny", SAMBAY), ("transformer_tiny", TRANSFORMER)):  # byte-level: id = byte
        tokenizer.save_byte_level(os.path.join(args.ckpt, name), cfg.eos_token_ids)
    for name, s in state.items():
        print(f"{name}: {s['n_params']} params, train loss {np.mean(s['train'][:10]):.3f} -> "
              f"{np.mean(s['train'][-10:]):.3f}, validation {s['val'][0][1]:.3f} -> {s['val'][-1][1]:.3f}, "
              f"{s['seconds']:.0f} s")


if __name__ == "__main__":
    main()
