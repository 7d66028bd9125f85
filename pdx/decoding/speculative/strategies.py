"""CLI-facing speculative strategies (`pdx generate --strategy spec-pld|spec-draft|spec-layerskip`).

Each takes `generate(model, prompts, **options)`; drafter options (k, adaptive, ...) are peeled
off here and the rest go to the engine (same names as `pdx.decoding.ar.generate`).
"""

from __future__ import annotations

from pdx.decoding.speculative import drafters, engine
from pdx.errors import InvalidInputError


def spec_pld(model, prompts, *, k: int = 4, max_ngram: int = 3, adaptive: bool = False, **options):
    """Prompt lookup decoding: drafts copied from earlier text matching the last n-gram."""
    if not (isinstance(max_ngram, int) and max_ngram >= 1):
        raise InvalidInputError(f"max_ngram must be an int >= 1, got {max_ngram!r}")
    return engine.generate(model, prompts, drafter=drafters.PromptLookup(k=k, max_ngram=max_ngram),
                           adaptive=adaptive, **options)


def spec_draft(model, prompts, *, draft=None, k: int = 4, adaptive: bool = False, **options):
    """A second model drafts: `draft` is a `pdx.Model` or a path that `pdx.load_model` reads."""
    from pdx.model import Model, load_model

    if draft is None:
        raise InvalidInputError("spec-draft needs a draft model: --option draft=PATH (GGUF or HF directory)")
    draft_model = draft if isinstance(draft, Model) else load_model(draft)
    return engine.generate(model, prompts, drafter=drafters.draft_model(model, draft_model, k), adaptive=adaptive,
                           **options)


def spec_layerskip(model, prompts, *, skip=None, num_skip: int | None = None, k: int = 4, adaptive: bool = False,
                   **options):
    """Self-speculation: the target with the layers in `skip` left out drafts for itself.

    skip: a list of layer indices; "auto" searches `num_skip` layers (default a third) on the
    prompts themselves with `calibrate_layer_skip`; default every other layer of the upper three
    quarters (a fixed heuristic).
    """
    n = model.cfg.num_layers
    if skip == "auto":
        skip = drafters.calibrate_layer_skip(model, prompts, n // 3 if num_skip is None else num_skip)
    skip = list(range(n // 4, n, 2)) if skip is None else skip
    if not isinstance(skip, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < n for i in skip):
        raise InvalidInputError(f"skip must be a list of layer indices in [0, {n}), got {skip!r}")
    if len(set(skip)) >= n:
        raise InvalidInputError("skip leaves no layer to draft with")
    return engine.generate(model, prompts, drafter=drafters.layer_skip(model, skip, k), adaptive=adaptive, **options)
