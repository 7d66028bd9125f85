"""SambaY vs a same-size Llama-family transformer: decode latency per token and cache memory vs context length.

Both models have random weights, d_model 256, 8 layers, 8 heads of 32 (MHA, so the KV cache is large
next to the weights), MLP width 512, vocab 512, fp32, batch 1, and run the pdx decode step
(per-layer weights, `unstack_layers`) inside one jitted `fori_loop` of `steps` greedy tokens with the
cache donated. SambaY: sliding window 512, Mamba state 16, expand 2.

How the context is built: generating 32k tokens one by one (or prefilling a 32k prompt through the
transformer's quadratic attention) takes far too long on this CPU, so for each context length c the
caches are allocated with c + steps slots (as the AR engine sizes them), filled with random keys,
values and states, and their lengths set to c; then `steps` decode steps are timed (warm-up and
compilation excluded, compile time reported apart; lengths reset to c before every timing; best of
`rounds`, the two models alternating so both see the same background load). Decode cost depends on
the number of slots attended and states read, not on their values, so this times exactly what
decoding at length c does. Cache memory is the bytes of each model's cache at c + steps slots.

    nice -n 5 python scripts/bench_sambay.py          # writes bench/sambay.{json,md,png}
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
from jax import lax
from tqdm import tqdm

from pdx import benchutil
from pdx.models import sambay as sb
from pdx.models import transformer as tf

D, LAYERS, HEADS, HEAD_DIM, FFN, VOCAB, WINDOW = 256, 8, 8, 32, 512, 512, 512

SAMBAY = sb.Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_layers=LAYERS, num_heads=HEADS,
                   num_kv_heads=HEADS, sliding_window=WINDOW, mamba_d_state=16, mamba_dt_rank=16)
TRANSFORMER = tf.Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_layers=LAYERS, num_heads=HEADS,
                        num_kv_heads=HEADS, head_dim=HEAD_DIM, max_position_embeddings=1 << 20)


@functools.partial(jax.jit, static_argnames=("family", "cfg", "steps"), donate_argnames=("cache",))
def decode(params, cache, tok, *, family, cfg, steps):
    """`steps` greedy tokens from `cache` in one fori_loop; returns (cache, last token)."""
    def body(_, carry):
        cache, tok = carry
        logits, cache = family.forward(params, cfg, tok[:, None], cache.lengths[:, None], cache)
        return cache, jnp.argmax(logits[:, 0], -1).astype(jnp.int32)

    return lax.fori_loop(0, steps, body, (cache, tok))


def random_cache(cache, length: int, key):
    """The cache with every buffer filled with small random values and lengths set to `length`."""
    leaves, treedef = jax.tree.flatten(cache)
    keys = jax.random.split(key, len(leaves))
    filled = [(0.1 * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype) if a.dtype != jnp.int32
              else jnp.full_like(a, length) for k, a in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, filled)


class Runner:
    """One model: compiled decode per slot count, a cache per context length, timed decode steps."""

    def __init__(self, name, family, cfg, params, steps):
        self.name, self.family, self.cfg, self.steps = name, family, cfg, steps
        self.params = family.unstack_layers(params)
        self.compiled, self.compile_s = {}, {}

    def prepare(self, context: int, key):
        slots = context + self.steps
        cache = random_cache(self.family.init_cache(self.cfg, 1, slots), context, key)
        tok = jnp.zeros((1,), jnp.int32)
        if slots not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[slots] = decode.lower(self.params, cache, tok, family=self.family, cfg=self.cfg,
                                                steps=self.steps).compile()
            self.compile_s[str(context)] = time.perf_counter() - t0
        return cache, tok

    def cache_bytes(self, cache) -> int:
        return benchutil.tree_bytes(cache)

    def time_ms(self, state, context: int):
        """ms per token over `steps` steps from length `context`; returns (ms, state)."""
        cache, tok = state
        cache = dataclasses.replace(cache, lengths=jnp.full_like(cache.lengths, context))
        exe = self.compiled[context + self.steps]
        t0 = time.perf_counter()
        cache, tok = exe(self.params, cache, tok)
        tok.block_until_ready()
        return 1e3 * (time.perf_counter() - t0) / self.steps, (cache, tok)


def kv_read_bytes(context: int) -> dict:
    """Model of the bytes a decode step reads at `context`: weights + attended keys/values + states."""
    kv_layer = 2 * HEADS * HEAD_DIM * context * 4
    return {"transformer_kv": LAYERS * kv_layer,
            "sambay_kv": (1 + SAMBAY.cross_pairs) * kv_layer + SAMBAY.self_pairs * 2 * HEADS * HEAD_DIM * WINDOW * 4}


def bench(contexts, steps, rounds, seed=0):
    key = jax.random.PRNGKey(seed)
    k1, k2 = jax.random.split(key)
    runners = [Runner("sambay", sb, SAMBAY, sb.init_params(SAMBAY, k1), steps),
               Runner("transformer", tf, TRANSFORMER, tf.init_params(TRANSFORMER, k2), steps)]
    results = {r.name: {} for r in runners}
    for ctx in tqdm(contexts, desc="context"):
        states = []
        for r in runners:
            state = r.prepare(ctx, jax.random.fold_in(key, ctx))
            results[r.name][str(ctx)] = {"cache_bytes": r.cache_bytes(state[0])}
            _, state = r.time_ms(state, ctx)  # warm-up
            states.append(state)
        best = [float("inf")] * len(runners)
        for _ in range(rounds):
            for i, r in enumerate(runners):
                ms, states[i] = r.time_ms(states[i], ctx)
                best[i] = min(best[i], ms)
        for r, ms in zip(runners, best):
            results[r.name][str(ctx)]["decode_ms_per_token"] = ms
        del states
    weights = {r.name: benchutil.tree_bytes(r.params) for r in runners}
    compile_s = {r.name: r.compile_s for r in runners}
    return results, weights, compile_s


def write_outputs(report: dict, out_dir: str) -> None:
    ctxs = report["contexts"]
    s, t = report["sambay"], report["transformer"]
    rows = []
    for c in ctxs:
        a, b = s[str(c)], t[str(c)]
        model = kv_read_bytes(c)
        predicted = (report["weight_bytes"]["transformer"] + model["transformer_kv"]) / (
            report["weight_bytes"]["sambay"] + model["sambay_kv"])
        rows.append([c, round(a["decode_ms_per_token"], 3), round(b["decode_ms_per_token"], 3),
                     f"{b['decode_ms_per_token'] / a['decode_ms_per_token']:.2f}x", f"{predicted:.2f}x",
                     f"{a['cache_bytes'] / 1e6:.1f}", f"{b['cache_bytes'] / 1e6:.1f}",
                     f"{b['cache_bytes'] / a['cache_bytes']:.2f}x"])
    head = [
        f"# SambaY vs same-size transformer: decode latency and cache memory vs context ({report['device']})",
        "",
        f"Random weights, fp32, batch 1. SambaY {report['params']['sambay'] / 1e6:.2f}M params "
        f"(L={LAYERS}, d={D}, {HEADS} heads x {HEAD_DIM}, window {WINDOW}, Mamba state 16), transformer "
        f"{report['params']['transformer'] / 1e6:.2f}M params (Llama-family, same L/d/heads/MLP). "
        f"Per context length c, caches with c + {report['steps']} slots are filled with random values and their "
        f"lengths set to c (generating 32k tokens one by one is too slow here; decode cost depends on slots and "
        f"states read, not their values); then {report['steps']} greedy decode steps in one jitted loop are timed, "
        f"best of {report['rounds']} alternating rounds, compile excluded. 'bytes-model ratio' = (weights + "
        "attended KV bytes) of the transformer over SambaY's (SambaY reads its one shared KV in the full-attention "
        "layer and in each cross-attention layer). Shared, noisy machine: compare the ratios.",
        "",
    ]
    table = benchutil.markdown_table(
        ["context", "SambaY ms/token", "transformer ms/token", "speed-up", "bytes-model ratio", "SambaY cache MB",
         "transformer cache MB", "cache ratio"], rows)
    tail = ["", "Compile seconds (excluded): " + "; ".join(
        f"{name}: " + ", ".join(f"{c} {v:.1f}" for c, v in cs.items()) for name, cs in report["compile_s"].items())]
    benchutil.write_report(out_dir, "sambay", report, "\n".join(head) + "\n" + table + "\n".join(tail) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("sambay", "o-"), ("transformer", "s-")):
        ax1.plot(ctxs, [report[name][str(c)]["decode_ms_per_token"] for c in ctxs], style, label=name)
        ax2.plot(ctxs, [report[name][str(c)]["cache_bytes"] / 1e6 for c in ctxs], style, label=name)
    ax1.set(xscale="log", xlabel="context length (tokens)", ylabel="ms per decoded token", ylim=(0, None),
            title="decode latency")
    ax2.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="cache MB", title="cache memory")
    for ax in (ax1, ax2):
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sambay.png"), dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timing")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timings per context; the best counts")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)

    results, weights, compile_s = bench(args.contexts, args.steps, args.rounds)
    report = {
        "device": str(jax.devices()[0]), "machine": benchutil.machine(), "dtype": "float32", "batch": 1,
        "contexts": args.contexts, "steps": args.steps, "rounds": args.rounds,
        "params": {"sambay": sb.num_params(sb.init_params(SAMBAY, jax.random.PRNGKey(0))),
                   "transformer": int(sum(a.size for a in jax.tree.leaves(
                       tf.init_params(TRANSFORMER, jax.random.PRNGKey(0)))))},
        "weight_bytes": weights, "compile_s": compile_s, **results,
    }
    write_outputs(report, args.out)
    print(open(os.path.join(args.out, "sambay.md")).read())


if __name__ == "__main__":
    main()
