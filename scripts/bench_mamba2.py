"""Mamba-2 decode latency vs context length: pdx (O(1) step) against transformers' torch Mamba2, same run.

Random-weight ~130M model (state-spaces/mamba2-130m geometry: d_model 768, 24 layers, state 128,
head dim 64, expand 2, vocab 50288, tied), fp32, batch 1. For each context length the context is
built by chunked prefill, then greedy decode steps are timed (warm-up and compilation excluded,
compile time reported apart). The memory bandwidth is measured in the same run (a jitted sum over
1 GiB) and turned into a roofline: bytes of weights read per token / bandwidth.

    nice -n 5 python scripts/bench_mamba2.py            # writes bench/mamba2.{json,md,png}
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
from jax import lax
from tqdm import tqdm

from pdx import benchutil
from pdx.models import mamba2 as m2

PREFILL_PIECE = 2048  # longer contexts are prefilled in pieces of this many tokens (bounds the chunk-scan memory)


def measure_bandwidth(repeats: int = 3) -> float:
    """Bytes/s of the streaming-read probe, measured next to every decode timing."""
    return benchutil.memory_bandwidth_gbs(repeats=repeats) * 1e9


def weight_bytes(params: dict, cfg: m2.Config) -> int:
    """Bytes of weights one decode token reads: every layer weight, the final norm and the head (one embedding row)."""
    layer = sum(a.nbytes for a in jax.tree.leaves(params["layers"]))
    head = (params["embed"] if cfg.tie_embeddings else params["lm_head"]).nbytes
    return layer + head + params["final_norm"].nbytes + params["embed"].nbytes // cfg.vocab_size


@functools.partial(jax.jit, static_argnames=("cfg", "steps"), donate_argnames=("cache",))
def decode(params, cfg, cache, tok, steps):
    """`steps` greedy tokens from `cache` in one fori_loop of O(1) forwards; returns (cache, last token)."""
    def body(_, carry):
        cache, tok = carry
        logits, cache = m2.forward(params, cfg, tok[:, None], cache.lengths[:, None], cache)
        return cache, jnp.argmax(logits[:, 0], -1).astype(jnp.int32)

    return lax.fori_loop(0, steps, body, (cache, tok))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(params, cfg, cache, tokens):
    """Chunked-scan forward over `tokens [B, T]` from `cache`; returns (cache, greedy next token)."""
    pos = cache.lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    logits, cache = m2.forward(params, cfg, tokens, pos, cache)
    return cache, jnp.argmax(logits[:, -1], -1).astype(jnp.int32)


class PdxRunner:
    """pdx: chunked prefill (pieces of PREFILL_PIECE) and a timed loop of O(1) decode steps, compiled ahead of time.

    Decode runs on per-layer weights (`unstack_layers`), the fast layout for the O(1) step.
    """

    def __init__(self, params, cfg, contexts, steps):
        self.params, self.cfg, self.steps = m2.unstack_layers(params), cfg, steps
        self.compile_s = {}
        cache, tok = m2.init_cache(cfg, 1), jnp.zeros((1,), jnp.int32)
        t0 = time.perf_counter()
        self.decode = decode.lower(self.params, cfg, cache, tok, steps).compile()
        self.compile_s["decode_step_loop"] = time.perf_counter() - t0
        self.prefill = {}
        for piece in sorted({min(c, PREFILL_PIECE) for c in contexts}):
            t0 = time.perf_counter()
            self.prefill[piece] = prefill.lower(self.params, cfg, cache, jnp.zeros((1, piece), jnp.int32)).compile()
            self.compile_s[f"prefill_{piece}"] = time.perf_counter() - t0

    def build_context(self, ids: np.ndarray):
        """Returns (state, prefill seconds); state = (cache, next token)."""
        piece = min(ids.shape[1], PREFILL_PIECE)
        tokens = jnp.asarray(ids, jnp.int32)
        t0 = time.perf_counter()
        cache = m2.init_cache(self.cfg, 1)
        for start in range(0, ids.shape[1], piece):
            cache, tok = self.prefill[piece](self.params, cache, tokens[:, start : start + piece])
        tok.block_until_ready()
        return (cache, tok), time.perf_counter() - t0

    def decode_ms(self, state):
        """Milliseconds per token over `steps` greedy steps; returns (ms, advanced state)."""
        t0 = time.perf_counter()
        cache, tok = self.decode(self.params, *state)
        tok.block_until_ready()
        return 1e3 * (time.perf_counter() - t0) / self.steps, (cache, tok)


class TransformersRunner:
    """transformers' Mamba2ForCausalLM (torch slow path): prefill, then the cached greedy loop `generate` runs.

    The decode loop calls forward(token, cache) + argmax as `generate(do_sample=False)` does (checked
    token for token against `generate` at start-up), so a long context is prefilled once, not per timing.
    """

    def __init__(self, cfg, steps, threads):
        import torch
        from transformers import Mamba2Config, Mamba2ForCausalLM

        self.torch, self.steps = torch, steps
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        hf_cfg = Mamba2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                              num_hidden_layers=cfg.num_layers, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                              state_size=cfg.state_size, n_groups=cfg.n_groups,
                              expand=cfg.intermediate_size // cfg.hidden_size, chunk_size=cfg.chunk_size,
                              tie_word_embeddings=cfg.tie_embeddings, eos_token_id=None)
        self.model = Mamba2ForCausalLM(hf_cfg).eval()
        ids = torch.arange(16)[None]
        with torch.no_grad():
            ref = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                      use_cache=True)[0, 16:].tolist()
        state, _ = self.build_context(ids.numpy())
        mine = [state[1].item()]
        for _ in range(5):
            state = self._step(state)
            mine.append(state[1].item())
        assert mine == ref, f"manual cached loop {mine} != generate {ref}"

    def build_context(self, ids: np.ndarray):
        t0 = time.perf_counter()
        with self.torch.no_grad():
            out = self.model(self.torch.as_tensor(ids), use_cache=True)
        return (out.cache, out.logits[:, -1].argmax(-1, keepdim=True)), time.perf_counter() - t0

    def _step(self, state):
        cache, tok = state
        with self.torch.no_grad():
            out = self.model(tok, cache=cache, use_cache=True)
        return out.cache, out.logits[:, -1].argmax(-1, keepdim=True)

    def decode_ms(self, state):
        t0 = time.perf_counter()
        for _ in range(self.steps):
            state = self._step(state)
        return 1e3 * (time.perf_counter() - t0) / self.steps, state


def bench(params, cfg, contexts, steps, rounds, rng, threads, skip_transformers) -> tuple[dict, dict, dict]:
    """Per context: both prefills, then `rounds` alternating pdx / transformers decode timings (best of each).

    Alternating keeps both libraries under the same background load on a shared machine.
    """
    pdx_runner = PdxRunner(params, cfg, contexts, steps)
    hf_runner = None if skip_transformers else TransformersRunner(cfg, steps, threads)
    pdx_res, hf_res = {}, {}
    for ctx in tqdm(contexts, desc="context"):
        ids = rng.integers(0, cfg.vocab_size, (1, ctx))
        pdx_state, pdx_prefill = pdx_runner.build_context(ids)
        _, pdx_state = pdx_runner.decode_ms(pdx_state)  # warm-up
        runners = [(pdx_runner, pdx_state, pdx_prefill, pdx_res)]
        if hf_runner:
            hf_state, hf_prefill = hf_runner.build_context(ids)
            _, hf_state = hf_runner.decode_ms(hf_state)  # warm-up
            runners.append((hf_runner, hf_state, hf_prefill, hf_res))
        best = [float("inf")] * len(runners)
        bandwidth = []
        for _ in range(rounds):
            for i, (runner, state, prefill_s, res) in enumerate(runners):
                ms, state = runner.decode_ms(state)
                runners[i] = (runner, state, prefill_s, res)
                best[i] = min(best[i], ms)
            bandwidth.append(measure_bandwidth() / 1e9)
        for (_, _, prefill_s, res), ms in zip(runners, best):
            res[ctx] = {"decode_ms_per_token": ms, "prefill_tokens_per_s": ctx / prefill_s}
        pdx_res[ctx]["bandwidth_gb_s"] = max(bandwidth)
    return pdx_res, hf_res, pdx_runner.compile_s


def write_outputs(report: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "mamba2.json"), "w") as f:
        json.dump(report, f, indent=2)
    gb = report["weight_bytes"] / 1e9
    roof_ms = 1e3 * gb / report["bandwidth_gb_s"]
    lines = [
        f"# Mamba-2 decode latency vs context ({report['model']}, fp32, batch 1)",
        "",
        f"Device: {report['device']}. {report['weight_bytes'] / 1e6:.0f} MB of weights read per token; the "
        "roofline is that over the bandwidth of a jitted sum over 1 GiB (best of the timings at that context) "
        f"(median {report['bandwidth_gb_s']:.1f} GB/s -> {roof_ms:.1f} ms/token, {1e3 / roof_ms:.1f} tok/s). The "
        f"recurrent state adds {report['state_bytes'] / 1e6:.0f} MB read + written per token. transformers ran with "
        f"{report['torch_threads']} torch thread(s).",
        "",
        "| context | pdx ms/token | pdx tok/s | GB/s then | roofline fraction | transformers ms/token | speed-up | "
        "pdx prefill tok/s | transformers prefill tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ctx in report["contexts"]:
        p, h = report["pdx"][str(ctx)], report["transformers"].get(str(ctx))
        hf_ms = f"{h['decode_ms_per_token']:.2f}" if h else "-"
        ratio = f"{h['decode_ms_per_token'] / p['decode_ms_per_token']:.2f}x" if h else "-"
        hf_pre = f"{h['prefill_tokens_per_s']:.0f}" if h else "-"
        ctx_roof_ms = 1e3 * gb / p["bandwidth_gb_s"]
        lines.append(f"| {ctx} | {p['decode_ms_per_token']:.2f} | {1e3 / p['decode_ms_per_token']:.1f} | "
                     f"{p['bandwidth_gb_s']:.1f} | {ctx_roof_ms / p['decode_ms_per_token']:.0%} | {hf_ms} | {ratio} | "
                     f"{p['prefill_tokens_per_s']:.0f} | {hf_pre} |")
    first, last = (report["pdx"][str(c)]["decode_ms_per_token"] for c in (report["contexts"][0],
                                                                          report["contexts"][-1]))
    lines += ["", f"pdx latency at {report['contexts'][-1]} / at {report['contexts'][0]}: {last / first:.3f}x. "
              "Compile seconds (excluded above): " + ", ".join(f"{k} {v:.1f}" for k, v in report["compile_s"].items())]
    with open(os.path.join(out_dir, "mamba2.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ctxs = report["contexts"]
    ax.plot(ctxs, [report["pdx"][str(c)]["decode_ms_per_token"] for c in ctxs], "o-", label="pdx (O(1) step)")
    hf = [c for c in ctxs if str(c) in report["transformers"]]
    ax.plot(hf, [report["transformers"][str(c)]["decode_ms_per_token"] for c in hf], "s-", label="transformers")
    ax.axhline(roof_ms, color="gray", ls="--", label="bandwidth roofline (median)")
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="ms per decoded token", ylim=(0, None),
           title="Mamba-2 130M fp32 decode, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "mamba2.png"), dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timings per context; the best counts")
    parser.add_argument("--torch-threads", type=int, default=1, help="1 avoids spin contention on a shared 2-core box")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)

    cfg = m2.MAMBA2_130M
    params = jax.jit(m2.init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    nbytes = weight_bytes(params, cfg)
    pdx_results, hf_results, compile_s = bench(params, cfg, args.contexts, args.steps, args.rounds, rng,
                                               args.torch_threads, args.skip_transformers)
    report = {
        "model": "mamba2-130m geometry, random weights", "device": str(jax.devices()[0]), "dtype": "float32",
        "batch": 1, "contexts": args.contexts, "steps_per_timing": args.steps,
        "bandwidth_gb_s": float(np.median([r["bandwidth_gb_s"] for r in pdx_results.values()])),
        "weight_bytes": nbytes, "state_bytes": int(cfg.num_layers * (cfg.num_heads * cfg.head_dim * cfg.state_size +
                                                                     (cfg.conv_kernel - 1) * cfg.conv_dim) * 4),
        "torch_threads": args.torch_threads,
        "compile_s": compile_s, "pdx": {str(k): v for k, v in pdx_results.items()},
        "transformers": {str(k): v for k, v in hf_results.items()},
    }
    write_outputs(report, args.out)
    print(open(os.path.join(args.out, "mamba2.md")).read())


if __name__ == "__main__":
    main()
