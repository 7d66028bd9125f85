"""Named decoding strategies with declared options and model needs (`pdx generate --strategy NAME`).

Each entry names a function `generate(model, prompts, **options) -> GenerationResult` (lazily
imported, so the CLI starts fast), a one-line description, an option schema (names, kinds, ranges)
and what it needs of the model family (`pdx.models.protocol.Needs`, from the options). The
function itself carries `@strategy(NAME)`, so a Python call and the CLI are checked the same way,
at the API edge and before anything compiles: an unknown, mistyped or out-of-range option is an
`InvalidInputError`; a family that lacks what the strategy needs is an `UnsupportedError`.
Adding a strategy is adding an entry here and decorating its function (`docs/model-protocol.md`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import operator
from collections.abc import Callable

from pdx.errors import InvalidInputError
from pdx.models import protocol


@dataclasses.dataclass(frozen=True)
class Option:
    """One option's kind ("int", "float", "bool", "str", "int_list", "model") and its allowed values."""

    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple = ()
    nullable: bool = False  # None allowed (the strategy's default rule)
    literals: tuple = ()  # strings accepted besides the kind (e.g. "auto")

    def check(self, strategy: str, name: str, value) -> None:
        if (value is None and self.nullable) or (isinstance(value, str) and value in self.literals):
            return
        where = f"strategy {strategy!r}: option {name!r}"
        if not _is_kind(self.kind, value):
            extra = f" or one of {list(self.literals)}" if self.literals else ""
            raise InvalidInputError(f"{where} must be {_KIND_NAMES[self.kind]}{extra}, got {value!r}")
        if self.choices and value not in self.choices:
            raise InvalidInputError(f"{where} must be one of {list(self.choices)}, got {value!r}")
        numbers = value if self.kind == "int_list" else [value] if self.kind in ("int", "float") else []
        for word, bound, within in ((">=", self.ge, operator.ge), (">", self.gt, operator.gt),
                                    ("<=", self.le, operator.le), ("<", self.lt, operator.lt)):
            if bound is not None and not all(within(x, bound) for x in numbers):
                raise InvalidInputError(f"{where} must be {word} {bound}, got {value!r}")


_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "int_list": "a list of integers", "model": "a loaded model (pdx.load_model(path))"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_kind(kind: str, v) -> bool:
    return {"int": _is_int, "float": lambda v: _is_int(v) or isinstance(v, float),
            "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
            "int_list": lambda v: isinstance(v, (list, tuple)) and all(map(_is_int, v)),
            "model": lambda v: all(hasattr(v, a) for a in ("cfg", "params", "family"))}[kind](v)


# ---------------------------------------------------------------------------------------------
# Option groups shared by strategy families.

SAMPLING = {
    "max_new_tokens": Option("int", ge=1), "temperature": Option("float", ge=0), "top_k": Option("int", ge=0),
    "top_p": Option("float", gt=0, le=1), "min_p": Option("float", ge=0, lt=1),
    "repetition_penalty": Option("float", gt=0), "stop_token_ids": Option("int_list", ge=0, nullable=True),
    "seed": Option("int"), "prefill_chunk": Option("int", ge=1, nullable=True),
    "max_len": Option("int", ge=1, nullable=True),
}
SPECULATIVE = {k: v for k, v in SAMPLING.items() if k != "repetition_penalty"}  # penalties break losslessness
SPECULATIVE["verifier"] = Option("str", choices=("token", "traversal"))  # engine.VERIFIERS
DRAFT_K = Option("int", ge=1, le=64)
SKIP = {"skip": Option("int_list", ge=0, nullable=True, literals=("auto",)), "num_skip": Option("int", ge=0,
                                                                                               nullable=True)}
DLLM = {
    "max_new_tokens": Option("int", ge=1), "seed": Option("int"), "block_size": Option("int", ge=1, nullable=True),
    "temperature": Option("float", ge=0), "cfg_scale": Option("float", ge=0),
    "remasking": Option("str", choices=("low_confidence", "random")),
    "cache": Option("str", choices=("none", "prefix", "dual")),
    "attention": Option("str", choices=("bidirectional", "block_causal")), "prompt_bucket": Option("int", ge=1),
}
DLLM_RULE = {name: option for name, option in DLLM.items() if name != "remasking"}  # rules that read confidences
UNIT = Option("float", gt=0, le=1)  # a probability threshold
GAP = Option("float", ge=0)  # a logit gap


def _causal(options: dict) -> protocol.Needs:
    return protocol.Needs()


def _layer_skip(options: dict) -> protocol.Needs:
    return protocol.Needs(layer_skip=True)


_TREE = dict(extras=frozenset({"tree_mask"}), rollback=protocol.ROLLBACK_KV)


def _tree(options: dict) -> protocol.Needs:
    return protocol.Needs(**_TREE, layer_skip=options.get("draft") is None)


def _hidden_tree(options: dict) -> protocol.Needs:
    return protocol.Needs(**_TREE, hidden_states=True)


def _lookahead(options: dict) -> protocol.Needs:
    return protocol.Needs(**_TREE)


def _dllm(options: dict) -> protocol.Needs:
    """Masked diffusion with the chosen attention; a KV cache is refreshed by `refill` passes and attended
    through `cache_visible`."""
    extras = frozenset() if options["cache"] == "none" else frozenset({"cache_visible", "refill"})
    return protocol.Needs(objective=protocol.MASKED_DIFFUSION, mask_modes=frozenset({options["attention"]}),
                          extras=extras)


@dataclasses.dataclass(frozen=True)
class Strategy:
    target: str  # "module:function"
    about: str
    options: dict[str, Option]
    needs: Callable[[dict], protocol.Needs]  # from the options with the function's defaults filled in


_SPEC = "pdx.decoding.speculative.strategies"
STRATEGIES: dict[str, Strategy] = {
    "ar": Strategy("pdx.decoding.ar:generate", "autoregressive: greedy or temperature/top-k/top-p/min-p sampling",
                   SAMPLING, _causal),
    "spec-pld": Strategy(f"{_SPEC}:spec_pld", "speculative, prompt-lookup drafts",
                         SPECULATIVE | {"k": DRAFT_K, "max_ngram": Option("int", ge=1, le=16),
                                        "adaptive": Option("bool")}, _causal),
    "spec-draft": Strategy(f"{_SPEC}:spec_draft", "speculative, a second model drafts (draft=PATH)",
                           SPECULATIVE | {"draft": Option("model"), "k": DRAFT_K, "adaptive": Option("bool")},
                           _causal),
    "spec-layerskip": Strategy(f"{_SPEC}:spec_layerskip", "speculative, the target minus some layers drafts",
                               SPECULATIVE | SKIP | {"k": DRAFT_K, "adaptive": Option("bool")}, _layer_skip),
    "spec-aded": Strategy(f"{_SPEC}:spec_aded", "speculative, adaptive n-gram tables learned online",
                          SPECULATIVE | {"k": DRAFT_K, "contexts": Option("int_list", ge=1, le=8),
                                         "slots": Option("int", ge=2, le=1 << 20), "adaptive": Option("bool")},
                          _causal),
    "spec-tree": Strategy(f"{_SPEC}:spec_tree", "speculative, a static draft tree verified in one pass "
                          "(a draft model, else the layer-skipped target)",
                          SPECULATIVE | SKIP | {"tree": Option("int_list", ge=1, le=16),
                                                "draft": Option("model", nullable=True)}, _tree),
    "spec-medusa": Strategy(f"{_SPEC}:spec_medusa", "speculative, trained Medusa heads draft a tree from the "
                            "target's hidden states", SPECULATIVE | {"heads": Option("str", nullable=True),
                                                                     "tree": Option("int_list", ge=1, le=16,
                                                                                    nullable=True)},
                            _hidden_tree),
    "spec-clover": Strategy(f"{_SPEC}:spec_clover", "speculative, trained Clover-2 heads draft a tree from the "
                            "target's hidden states, each token conditioned on those drafted before it",
                            SPECULATIVE | {"heads": Option("str", nullable=True),
                                           "tree": Option("int_list", ge=1, le=16, nullable=True)}, _hidden_tree),
    "lookahead": Strategy(f"{_SPEC}:lookahead", "lookahead decoding, the target alone (Jacobi window + n-gram pool)",
                          SPECULATIVE | {"window": Option("int", ge=1, le=64), "ngram_size": Option("int", ge=2, le=16),
                                         "guesses": Option("int", ge=1, le=64)}, _lookahead),
    "llada": Strategy("pdx.decoding.diffusion.llada:generate",
                      "dLLM (LLaDA): fixed steps per block, low-confidence/random remasking, CFG, optional KV cache",
                      DLLM | {"steps": Option("int", ge=1, nullable=True)}, _dllm),
    "fast-dllm": Strategy("pdx.decoding.diffusion.fast_dllm:generate",
                          "dLLM (Fast-dLLM): confidence-threshold / factor parallel decoding, prefix or dual KV cache",
                          DLLM | {"threshold": Option("float", gt=0, le=1),
                                  "factor": Option("float", gt=0, nullable=True)}, _dllm),
    # training-free commit rules (their confidences are the model's: no random remasking)
    "localleap": Strategy("pdx.decoding.diffusion.localleap:generate",
                          "dLLM (LocalLeap): confident anchors let neighbours within a radius commit at a lower "
                          "threshold", DLLM_RULE | {"threshold": UNIT, "relaxed_threshold": UNIT,
                                                    "radius": Option("int", ge=0)}, _dllm),
    "cd4lm-cad": Strategy("pdx.decoding.diffusion.cd4lm:generate",
                          "dLLM (CD4LM's CAD): the k tokens above a threshold, capped, no EOS before a share "
                          "is decoded", DLLM_RULE | {"threshold": UNIT, "max_per_step": Option("int", ge=1),
                                                     "eos_ratio": Option("float", ge=0, le=1)}, _dllm),
    "prophet": Strategy("pdx.decoding.diffusion.prophet:generate",
                        "dLLM (Prophet): LLaDA's schedule until the mean top-2 logit gap of the answer left passes "
                        "a threshold falling with progress, then every slot at once",
                        DLLM_RULE | {"steps": Option("int", ge=1, nullable=True), "early": GAP, "mid": GAP,
                                     "late": GAP}, _dllm),
    "adablock": Strategy("pdx.decoding.diffusion.adablock:generate",
                         "dLLM (AdaBlock): each row's block ends at a confident delimiter (else a default size); "
                         "threshold commits inside", {k: v for k, v in DLLM_RULE.items() if k != "attention"}
                         | {"threshold": UNIT, "delimiter_threshold": Option("float", ge=0, le=1),
                            "delimiters": Option("int_list", ge=0, nullable=True)},
                         lambda options: _dllm(options | {"attention": "bidirectional"})),
    "credit": Strategy("pdx.decoding.diffusion.credit:generate",
                       "dLLM (CreditDecoding): a position's steadily predicted token earns credit that raises its "
                       "probability", DLLM_RULE | {"threshold": UNIT, "alpha": Option("float", ge=0),
                                                   "beta": Option("float", ge=0, le=1),
                                                   "gamma": Option("float", gt=0, le=1)}, _dllm),
}


def describe(name: str) -> str:
    """`pdx strategies`' line: the description and the options beyond the shared sampling / dLLM groups."""
    s = STRATEGIES[name]
    own = sorted(set(s.options) - set(SAMPLING) - set(DLLM))
    return s.about + (f" (options: {', '.join(own)})" if own else "")


def validate(name: str, options: dict) -> None:
    """`InvalidInputError` for an option `name` does not take, or a value of the wrong kind or range."""
    spec = STRATEGIES[name]
    for key, value in options.items():
        if key not in spec.options:
            raise InvalidInputError(f"strategy {name!r} takes no option {key!r}; it takes: "
                                    f"{', '.join(sorted(spec.options))}")
        spec.options[key].check(name, key, value)


def check(name: str, model, options: dict, defaults: dict | None = None) -> None:
    """The API-edge checks of strategy `name`: `options` against its schema, then its needs (from the
    options over the function's `defaults`) against the model's family."""
    validate(name, options)
    protocol.check(model.family, model.cfg, STRATEGIES[name].needs((defaults or {}) | options), name)


def strategy(name: str):
    """Decorate the function registered as `name`: validate options, check the model's family, then run."""

    def wrap(fn):
        defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                    if p.default is not inspect.Parameter.empty}

        @functools.wraps(fn)
        def run(model, prompts, **options):
            check(name, model, options, defaults)
            return fn(model, prompts, **options)

        run.strategy = name
        return run

    return wrap


def get(name: str):
    """The registered (validating) function of strategy `name`."""
    if name not in STRATEGIES:
        raise InvalidInputError(f"unknown strategy {name!r}; `pdx strategies` lists: {', '.join(sorted(STRATEGIES))}")
    module, func = STRATEGIES[name].target.split(":")
    return getattr(importlib.import_module(module), func)
