"""Named decoding strategies for the CLI (`pdx generate --strategy NAME`, `pdx strategies`).

Each entry points at a function `generate(model, prompts, *, max_new_tokens, seed, **options)
-> GenerationResult`, where `prompts` is a list of token-id lists. Imports are lazy so the CLI
starts fast and a strategy's module is only loaded when used.
"""

from __future__ import annotations

import importlib

from pdx.errors import InvalidInputError

# name -> ("module:function", one-line description)
STRATEGIES: dict[str, tuple[str, str]] = {
    "ar": ("pdx.decoding.ar:generate", "autoregressive: greedy or temperature/top-k/top-p/min-p sampling"),
    "spec-pld": ("pdx.decoding.speculative.strategies:spec_pld",
                 "speculative, prompt-lookup drafts (options: k, max_ngram, adaptive)"),
    "spec-draft": ("pdx.decoding.speculative.strategies:spec_draft",
                   "speculative, a second model drafts (options: draft=PATH, k, adaptive)"),
    "spec-layerskip": ("pdx.decoding.speculative.strategies:spec_layerskip",
                       "speculative, the target minus some layers drafts "
                       "(options: skip=[...]|auto, num_skip, k, adaptive)"),
    "spec-aded": ("pdx.decoding.speculative.strategies:spec_aded",
                  "speculative, adaptive n-gram tables learned online (options: k, contexts, slots, adaptive)"),
    "spec-tree": ("pdx.decoding.speculative.strategies:spec_tree",
                  "speculative, a static draft tree verified in one pass "
                  "(options: tree=[3,2,1,1], draft=PATH or skip=[...]|auto, num_skip)"),
    "lookahead": ("pdx.decoding.speculative.strategies:lookahead",
                  "lookahead decoding, the target alone (options: window, ngram_size, guesses)"),
    "llada": ("pdx.decoding.diffusion.llada:generate",
              "dLLM (LLaDA): fixed steps per block, low-confidence/random remasking, CFG, optional KV cache"),
    "fast-dllm": ("pdx.decoding.diffusion.fast_dllm:generate",
                  "dLLM (Fast-dLLM): confidence-threshold / factor parallel decoding with prefix or dual KV cache"),
}


def get(name: str):
    if name not in STRATEGIES:
        raise InvalidInputError(f"unknown strategy {name!r}; `pdx strategies` lists: {', '.join(sorted(STRATEGIES))}")
    module, func = STRATEGIES[name][0].split(":")
    return getattr(importlib.import_module(module), func)
