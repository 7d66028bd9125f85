"""`pdx` command line: generate | serve | strategies | bench | eval | train."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from pdx.errors import InvalidInputError, PdxError

DTYPES = ("float32", "bfloat16", "int8")


def _parse_option(text: str) -> tuple[str, object]:
    """`key=value` with the value read as JSON when it parses (numbers, bools, lists), else a string."""
    if "=" not in text:
        raise InvalidInputError(f"--option expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def read_prompts(args) -> list[str]:
    """`--prompt` texts, then `--prompt-file`: a `.jsonl` file holds one prompt per non-blank line, as a
    JSON string or an object with a string "prompt"; any other file is one prompt."""
    prompts = list(args.prompt or [])
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise InvalidInputError(f"prompt file not found: {args.prompt_file}")
        with open(args.prompt_file) as f:
            if args.prompt_file.endswith(".jsonl"):
                prompts += [_jsonl_prompt(args.prompt_file, n, line) for n, line in enumerate(f, 1) if line.strip()]
            else:
                prompts.append(f.read())
    if not prompts:
        raise InvalidInputError("give a prompt with --prompt TEXT or --prompt-file FILE")
    return prompts


def strategy_options(args) -> dict:
    """The strategy's options from `--option key=value` and the sampling flags given, checked against its
    schema before any model loads (a path given to a model-valued option passes as a string)."""
    from pdx.decoding import registry

    options = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    for name in ("temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    options |= dict(_parse_option(o) for o in args.option or [])
    registry.validate(args.strategy, {k: v for k, v in options.items() if not _model_path(args.strategy, k, v)})
    return options


def _model_path(strategy: str, name: str, value) -> bool:
    """Is `value` a path given to a model-valued option (which the CLI loads itself)?"""
    from pdx.decoding import registry

    option = registry.STRATEGIES[strategy].options.get(name)
    return option is not None and option.kind == "model" and isinstance(value, str)


def _jsonl_prompt(path: str, lineno: int, line: str) -> str:
    where = f"{path}:{lineno}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{where}: not valid JSON ({e.msg}); each line is a JSON string or "
                                '{"prompt": "..."}') from None
    prompt = item.get("prompt") if isinstance(item, dict) else item
    if not isinstance(prompt, str):
        raise InvalidInputError(f'{where}: expected a JSON string or an object with a string "prompt", '
                                f"got {line.strip()[:60]}")
    return prompt


def cmd_generate(args) -> None:
    from pdx import settings
    from pdx.decoding import registry
    from pdx.model import load_model

    strategy = registry.get(args.strategy)
    sampling = strategy_options(args)
    texts = read_prompts(args)
    if args.no_cache:  # process-wide, so every cache user sees it: weights, programs, the CPU kernels' build
        os.environ["PDX_NO_CACHE"] = "1"
    settings.enable_compilation_cache()  # a second run of the same shape bucket compiles nothing
    model = load_model(args.model, dtype=args.dtype)
    for name, value in sampling.items():
        if _model_path(args.strategy, name, value):
            sampling[name] = load_model(value, dtype=args.dtype)
    tok = model.tokenizer
    if tok is None:
        raise InvalidInputError(f"{model.source} has no tokenizer; pdx generate needs one to read text prompts")
    if args.chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    for text in texts:
        ids = tok.encode(text, allow_special=args.chat)
        if args.format == "text" and args.strategy == "ar":
            from pdx.decoding import ar

            for piece in ar.stream(model, ids, **sampling):
                print(piece, end="", flush=True)
            print()
            continue
        result = strategy(model, [ids], **sampling)
        new_ids = result.row(0)
        out_text = tok.decode([t for t in new_ids if t not in model.cfg.eos_token_ids])
        if args.format == "text":
            print(out_text, flush=True)
            continue
        s = result.stats
        print(json.dumps({"prompt": text, "token_ids": new_ids, "text": out_text, "num_new_tokens": len(new_ids),
                          "forward_passes": s.get("forward_passes"), "prefill_s": s.get("prefill_s"),
                          "decode_s": s.get("decode_s"), "tokens_per_s": s.get("tokens_per_s"),
                          "strategy": args.strategy}), flush=True)


def cmd_serve(args) -> None:
    """`pdx serve`: the OpenAI-compatible server (pdx.serve.app) on uvicorn until SIGINT / SIGTERM."""
    import uvicorn

    from pdx import settings
    from pdx.model import load_model
    from pdx.serve.app import create_app
    from pdx.serve.engine import Engine

    if args.no_cache:
        os.environ["PDX_NO_CACHE"] = "1"
    settings.enable_compilation_cache()
    model = load_model(args.model, dtype=args.dtype)
    engine = Engine(model, max_batch=args.max_batch, max_len=args.max_len, chunk=args.chunk,
                    sarathi=not args.no_sarathi, queue_size=args.queue_size)
    engine.compile_all()  # before the port opens: no request waits on a compile
    name = args.model_name or os.path.basename(str(model.source) or "pdx").removesuffix(".gguf") or "pdx"
    # SIGTERM / SIGINT: stop accepting, let streams in flight finish (30 s at most), then stop the engine
    uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=30)


def cmd_strategies(args) -> None:
    from pdx.decoding import registry

    for name in sorted(registry.STRATEGIES):
        print(f"{name:16s} {registry.describe(name)}")


def _scripts_dir() -> str:
    """Where `scripts/` lives: the source tree's in an editable install, site-packages' `pdx/scripts` otherwise."""
    import pdx.scripts

    return os.path.dirname(os.path.abspath(pdx.scripts.__file__))


def _available(kind: str) -> list[str]:
    """NAMEs of the shipped `scripts/{kind}_NAME.py`."""
    files = os.listdir(_scripts_dir())
    return sorted(f[len(kind) + 1 : -3] for f in files if f.startswith(kind + "_") and f.endswith(".py"))


def _run_script(kind: str, name: str, argv: list[str]) -> None:
    """`pdx bench|eval|train NAME` run the shipped `scripts/{kind}_{NAME}.py`."""
    path = os.path.join(_scripts_dir(), f"{kind}_{name}.py")
    if not os.path.isfile(path):
        raise InvalidInputError(f"no {kind} named {name!r}; available: {', '.join(_available(kind))}")
    spec = importlib.util.spec_from_file_location(f"pdx_{kind}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # what dataclasses (and pickling) look the module up by
    spec.loader.exec_module(module)
    prog, sys.argv[0] = sys.argv[0], f"pdx {kind} {name}"  # the script's argparse names itself after argv[0]
    try:
        module.main(argv)
    finally:
        sys.argv[0] = prog


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdx", description="Fast LLM decoding on JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--prompt-file", help='a text file (one prompt) or .jsonl: one prompt per line, a JSON string '
                   'or {"prompt": "..."}')
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--format", choices=("text", "json"), default="text")
    g.add_argument("--strategy", default="ar", help="decoding strategy (`pdx strategies` lists them)")
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="strategy option (repeatable)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="weight storage")
    g.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the converted-weights and compiled-program caches (PDX_CACHE_DIR)")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    v.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    v.add_argument("--model-name", default=None, help="the model id clients send (default: the file's name)")
    v.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-batch", type=int, default=16, help="batch slots (requests decoded together)")
    v.add_argument("--max-len", type=int, default=2048, help="positions per slot: prompt + max_tokens")
    v.add_argument("--chunk", type=int, default=256, help="prompt tokens per step (SARATHI chunk)")
    v.add_argument("--no-sarathi", action="store_true", help="prefill a new prompt alone, decodes waiting")
    v.add_argument("--queue-size", type=int, default=64, help="waiting requests before 429")
    v.add_argument("--dtype", choices=DTYPES, default="float32", help="weight storage")
    v.add_argument("--log-level", default="warning")
    v.add_argument("--no-cache", action="store_true", help="no converted-weights or compiled-program caches")
    v.set_defaults(func=cmd_serve)

    s = sub.add_parser("strategies", help="list decoding strategies")
    s.set_defaults(func=cmd_strategies)

    for kind, about in (("bench", "run a benchmark (scripts/bench_NAME.py)"),
                        ("eval", "run an evaluation (scripts/eval_NAME.py)"),
                        ("train", "train a model, resumably (scripts/train_NAME.py)")):
        p = sub.add_parser(kind, help=about, description=f"{about}; available: {', '.join(_available(kind))}")
        p.add_argument("name", help=f"one of: {', '.join(_available(kind))}")
        p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script")
        p.set_defaults(func=lambda a, kind=kind: _run_script(kind, a.name, a.args))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PdxError as e:
        print(f"pdx: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
