"""The model protocol: what a family module provides, and the capabilities it declares.

A family is a module (`pdx.models.transformer`, `mamba2`, `sambay`) with these functions;
decoding strategies reach models only through them and read `capabilities(cfg)`, never the
family's identity. `docs/model-protocol.md` explains the protocol and how to add a family or a
strategy.

    Config                                         frozen dataclass, static under jit
    init_params(cfg, key, dtype, scale) -> params  stacked layers (the portable layout)
    init_cache(cfg, batch, max_len, dtype, *, per_layer=None) -> cache   a pytree with `lengths [B]`
    forward(params, cfg, tokens, positions, cache=None, *, mask_mode, valid, cache_visible,
            refill, tree_mask, cache_rows, logits, trace) -> (logits, cache) | (logits, cache, trace) when trace=True
    rollback(params, cfg, before, after, trace, keep) -> cache
        `after`/`trace` from a traced forward that started at `before`: the cache as if that forward
        had consumed only the first `keep [B]` of its tokens (speculative rejection)
    is_per_layer(params) -> bool                   which layout the params are in
    unstack_layers(params) / stack_layers(params)  per-layer (fast on XLA CPU) <-> stacked
    skip_layers(params, cfg, skip) -> (params, cfg)  the model without layers `skip` (layer_skip only)
    hidden_states(params, cfg, tokens, positions, cache=None, **forward keywords but logits/trace)
        -> (final-normed hidden states [B, T, D], cache)          (hidden_states only)
    lm_head(params, cfg, x [..., D]) -> fp32 logits [..., V]     (hidden_states only)
    lm_head_rows(params, cfg, ids [n]) -> fp32 [n, D]: output-embedding rows (a drafter's vocabulary subset)
    capabilities(cfg) -> Capabilities

Every family's `forward` takes every keyword; one it does not declare in `extras` (or a mask mode
it does not list) raises `UnsupportedError` through `check_forward`.
"""

from __future__ import annotations

import dataclasses

from pdx.errors import UnsupportedError

CAUSAL_LM = "causal_lm"  # next-token prediction: AR and speculative decoding
MASKED_DIFFUSION = "masked_diffusion"  # predicts masked tokens from a mask_token_id canvas: dLLM decoding
ROLLBACK_KV = "kv_length"  # lower `cache.lengths`: slots past it are dead
ROLLBACK_TRACE = "state_trace"  # recurrent states: rebuild from the traced forward's inputs
EXTRAS = ("cache_visible", "refill", "tree_mask", "cache_rows")
MASK_KINDS = ("causal", "bidirectional", "block_causal")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a family (with a given config) can do; strategies compare it against their `Needs`."""

    name: str  # family name in messages
    objective: str  # CAUSAL_LM or MASKED_DIFFUSION
    mask_modes: frozenset[str]  # MaskMode kinds `forward` accepts
    extras: frozenset[str]  # optional `forward` keywords it honours (subset of EXTRAS)
    rollback: str  # ROLLBACK_KV or ROLLBACK_TRACE
    layer_skip: bool = False  # `skip_layers` exists (self-speculation)
    hidden_states: bool = False  # `hidden_states`, `lm_head`, `lm_head_rows` exist (drafting from hidden states)
    int8_weights: bool = False  # `pdx.models.quant.quantize_params` applies to its params
    logit_shift: int = 0  # dLLM: logits at position i predict the token at i + logit_shift (Dream: 1)
    layouts: frozenset[str] = frozenset({"stacked", "per_layer"})


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a strategy (with given options) requires of the model family."""

    objective: str = CAUSAL_LM
    mask_modes: frozenset[str] = frozenset({"causal"})
    extras: frozenset[str] = frozenset()
    layer_skip: bool = False
    hidden_states: bool = False
    rollback: str | None = None  # a required rollback kind (tree verification compacts KV slots: ROLLBACK_KV)


def missing(caps: Capabilities, needs: Needs) -> list[str]:
    """Human-readable list of what `needs` asks for and `caps` lacks (empty: supported)."""
    out = []
    if caps.objective != needs.objective:
        kind = "a masked-diffusion LLM (a config with mask_token_id)" if needs.objective == MASKED_DIFFUSION \
            else "a causal (next-token) LM"
        out.append(f"it needs {kind}, and this is a {caps.objective.replace('_', '-')} model")
    for mode in sorted(needs.mask_modes - caps.mask_modes):
        out.append(f"it needs {mode} attention")
    for extra in sorted(needs.extras - caps.extras):
        out.append({"tree_mask": "it verifies a tree of drafts in one pass (tree attention)",
                    "cache_visible": "it attends to cached slots past the write offset (dual cache)",
                    "refill": "it refills a KV cache from a pass that attends to no cached slot (cache refresh)",
                    "cache_rows": "it packs the tokens of several cache rows into one sequence"}[extra])
    if needs.layer_skip and not caps.layer_skip:
        out.append("it drops layers to draft (layer skipping)")
    if needs.hidden_states and not caps.hidden_states:
        out.append("it drafts from the target's hidden states (hidden_states, lm_head)")
    if needs.rollback is not None and caps.rollback != needs.rollback:
        out.append(f"it rolls back by {needs.rollback.replace('_', ' ')}, and this model's state needs "
                   f"{caps.rollback.replace('_', ' ')}")
    return out


def check(family, cfg, needs: Needs, strategy: str) -> Capabilities:
    """Raise `UnsupportedError` unless `family` (with `cfg`) provides `needs`; returns its capabilities."""
    caps = family.capabilities(cfg)
    gaps = missing(caps, needs)
    if gaps:
        raise UnsupportedError(f"strategy {strategy!r} does not run on {caps.name}: " + "; ".join(gaps))
    return caps


def new_cache(family, params, cfg, batch: int, max_len: int, dtype):
    """`family.init_cache` in the layout of `params` (per-layer buffers for per-layer params)."""
    return family.init_cache(cfg, batch, max_len, dtype, per_layer=family.is_per_layer(params))


def check_forward(caps: Capabilities, mask_mode, cache_visible=None, tree_mask=None, cache_rows=None,
                  refill: bool = False) -> None:
    """`forward`-level guard: a mask mode or extra the family does not declare is an `UnsupportedError`."""
    kind = getattr(mask_mode, "kind", mask_mode)
    if kind not in caps.mask_modes:
        raise UnsupportedError(f"{caps.name} supports mask modes {sorted(caps.mask_modes)}, not {kind!r}")
    for name, value in (("cache_visible", cache_visible), ("refill", refill or None), ("tree_mask", tree_mask),
                        ("cache_rows", cache_rows)):
        if value is not None and name not in caps.extras:
            raise UnsupportedError(f"{caps.name}'s forward does not take {name}")


FUNCTIONS = ("init_params", "init_cache", "forward", "rollback", "is_per_layer", "unstack_layers", "stack_layers",
             "capabilities")


def conforms(family) -> list[str]:
    """Names of the protocol functions `family` lacks (empty: a complete family)."""
    return [f for f in FUNCTIONS if not callable(getattr(family, f, None))] + (
        ["Config"] if not isinstance(getattr(family, "Config", None), type) else [])
