"""CLI-facing speculative strategies (`pdx generate --strategy spec-pld|spec-aded|spec-draft|spec-layerskip|
spec-tree|lookahead|spec-medusa|spec-clover`).

Each takes `generate(model, prompts, **options)`; drafter options (k, adaptive, ...) are peeled
off here and the rest go to the engine (same names as `pdx.decoding.ar.generate`).

Default draft lengths make a verify pass K + 1 = 4 or 8 tokens: XLA CPU's GEMM works in tiles of
4/8 rows, so a 5- or 9-token pass costs as much as 8 or 12 (SmolLM2: 4 tokens 1.3x a one-token
step, 8 tokens 1.7x, 9 tokens 2.9x).
"""

from __future__ import annotations

from pdx.decoding.registry import strategy
from pdx.decoding.speculative import clover, drafters, engine, medusa, ngram
from pdx.errors import InvalidInputError


@strategy("spec-pld")
def spec_pld(model, prompts, *, k: int = 3, max_ngram: int = 3, adaptive: bool = False, **options):
    """Prompt lookup decoding: drafts copied from earlier text matching the last n-gram."""
    return engine.generate(model, prompts, drafter=drafters.PromptLookup(k=k, max_ngram=max_ngram),
                           adaptive=adaptive, **options)


@strategy("spec-draft")
def spec_draft(model, prompts, *, draft=None, k: int = 3, adaptive: bool = False, **options):
    """A second model drafts: `draft` is a loaded `pdx.Model` sharing the target's vocabulary (the CLI
    loads `--option draft=PATH`)."""
    if draft is None:
        raise InvalidInputError("spec-draft needs a draft model: --option draft=PATH (GGUF or HF directory)")
    return engine.generate(model, prompts, drafter=drafters.draft_model(model, draft, k), adaptive=adaptive, **options)


def _skip_layers(model, prompts, skip, num_skip):
    """`skip` as given (a list of layer indices), searched ("auto"), or the default heuristic."""
    n = model.cfg.num_layers
    if skip == "auto":
        skip = drafters.calibrate_layer_skip(model, prompts, n // 3 if num_skip is None else num_skip)
    skip = list(range(n // 4, n, 2)) if skip is None else skip
    if not isinstance(skip, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < n for i in skip):
        raise InvalidInputError(f"skip must be a list of layer indices in [0, {n}), got {skip!r}")
    if len(set(skip)) >= n:
        raise InvalidInputError("skip leaves no layer to draft with")
    return skip


@strategy("spec-layerskip")
def spec_layerskip(model, prompts, *, skip=None, num_skip: int | None = None, k: int = 3, adaptive: bool = False,
                   **options):
    """Self-speculation: the target with the layers in `skip` left out drafts for itself.

    skip: a list of layer indices; "auto" searches `num_skip` layers (default a third) on the
    prompts themselves with `calibrate_layer_skip`; default every other layer of the upper three
    quarters (a fixed heuristic).
    """
    skip = _skip_layers(model, prompts, skip, num_skip)
    return engine.generate(model, prompts, drafter=drafters.layer_skip(model, skip, k), adaptive=adaptive, **options)


@strategy("spec-aded")
def spec_aded(model, prompts, *, k: int = 7, contexts=(3, 2, 1), slots: int = 4096, adaptive: bool = True,
              **options):
    """ADED-style adaptive n-gram drafting from tables learned online over prompt and output."""
    if not isinstance(contexts, (list, tuple)):
        raise InvalidInputError(f"contexts must be a list of context lengths, got {contexts!r}")
    return engine.generate(model, prompts, drafter=ngram.NGramTable(k=k, contexts=tuple(contexts), slots=slots),
                           adaptive=adaptive, **options)


@strategy("lookahead")
def lookahead(model, prompts, *, window: int = 5, ngram_size: int = 4, guesses: int = 5, **options):
    """Lookahead decoding with the target alone: Jacobi window + n-gram pool, verified in the same pass."""
    return engine.generate(model, prompts, drafter=ngram.Lookahead(window=window, ngram=ngram_size, guesses=guesses),
                           **options)


@strategy("spec-tree")
def spec_tree(model, prompts, *, tree=(3, 2, 1, 1), draft=None, skip=None, num_skip: int | None = None, **options):
    """Static-tree speculation: `tree` gives the branching per depth (top-k children of every node);
    drafted by `draft` (a second model, a path or `pdx.Model`) or else by the layer-skipped target."""
    if not isinstance(tree, (list, tuple)):
        raise InvalidInputError(f"tree must be a list of branching factors per depth, e.g. [3, 2, 1], got {tree!r}")
    chain = (drafters.draft_model(model, draft, 1) if draft is not None
             else drafters.layer_skip(model, _skip_layers(model, prompts, skip, num_skip), 1))
    return engine.generate(model, prompts, drafter=drafters.tree_draft(chain, tree), **options)


@strategy("spec-medusa")
def spec_medusa(model, prompts, *, heads: str | None = None, tree=None, **options):
    """Medusa heads on the target's hidden states draft a static tree (`medusa.py`). heads: a checkpoint
    of `scripts/train_draft_heads.py` (default: the shipped SmolLM2 heads); tree: branching factors per
    depth (default: the checkpoint's sparse tree)."""
    return engine.generate(model, prompts, drafter=medusa.load(model, heads, tree), **options)


@strategy("spec-clover")
def spec_clover(model, prompts, *, heads: str | None = None, tree=None, **options):
    """Clover-2 heads on the target's hidden states draft a static tree, each token conditioned on the ones
    drafted before it (`clover.py`). heads: a checkpoint of `scripts/train_draft_heads.py --drafter clover`
    (default: the shipped SmolLM2 heads); tree: branching factors per depth (default: the checkpoint's
    sparse tree)."""
    return engine.generate(model, prompts, drafter=clover.load(model, heads, tree), **options)
