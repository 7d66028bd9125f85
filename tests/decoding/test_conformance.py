"""Every registered strategy on every model family: token-identical greedy output to the family's
reference decoding, the same row alone as in a padded batch, or `UnsupportedError` before compiling.

Families join by an entry in `FAMILIES` (a builder of a tiny model), strategies by their entry in
`pdx.decoding.registry` plus the options in `EXACT` under which their greedy output must equal the
reference (AR for causal LMs; LLaDA one token per step for masked-diffusion LLMs). Both layouts run:
per-layer params (what `pdx.load_model` gives on CPU) and stacked params with stacked caches (the
`lax.scan` path TPU and GPU take).
"""

import dataclasses
import functools
import os
import tempfile

import jax
import numpy as np
import pytest

from pdx.decoding import compiled, registry
from pdx.errors import UnsupportedError
from pdx.model import Model
from pdx.models import mamba2, protocol, sambay
from pdx.models import transformer as tf

NEW = 10
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11], [3, 4, 3, 4, 3, 4, 3, 4, 9]]  # a ragged (padded) batch


def _transformer(mask_token_id=None, logit_shift=0, seed=0):
    cfg = dataclasses.replace(tf.SMOLLM2_135M, vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(2,), pad_token_id=0,
                              mask_token_id=mask_token_id, logit_shift=logit_shift)
    return cfg, tf.init_params(cfg, jax.random.PRNGKey(seed), scale=0.3), tf


def _mamba2(seed=0):
    cfg = mamba2.Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, head_dim=8, state_size=8,
                        n_groups=2, chunk_size=4, eos_token_ids=(2,), tie_embeddings=False)
    return cfg, mamba2.init_params(cfg, jax.random.PRNGKey(seed), scale=0.3), mamba2


def _sambay(seed=0):
    cfg = dataclasses.replace(sambay.TINY, vocab_size=64, num_layers=4, eos_token_ids=(2,))
    return cfg, sambay.init_params(cfg, jax.random.PRNGKey(seed), scale=0.3), sambay


# name -> (builder of (cfg, stacked params, family), kind of reference decoding)
FAMILIES = {
    "transformer": (_transformer, "ar"),
    "mamba2": (_mamba2, "ar"),
    "sambay": (_sambay, "ar"),
    "llada-dllm": (lambda seed=0: _transformer(mask_token_id=63, seed=seed), "dllm"),
    "dream-dllm": (lambda seed=0: _transformer(mask_token_id=63, logit_shift=1, seed=seed), "dllm"),
}


def build(name: str, layout: str, seed: int = 0) -> Model:
    cfg, params, family = FAMILIES[name][0](seed=seed)
    params = family.unstack_layers(params) if layout == "per_layer" else params
    return Model(cfg=cfg, params=params, tokenizer=None, family=family)


def draft_for(name: str, layout: str) -> Model:
    """A second, differently seeded model of the same family (the draft for spec-draft)."""
    return build(name, layout, seed=7)


@functools.cache
def medusa_heads(name: str) -> str:
    """A checkpoint of random Medusa heads for the family's tiny model (a path that does not exist for a
    family without hidden states: the strategy refuses it before reading anything)."""
    if not FAMILIES[name][0]()[2].capabilities(FAMILIES[name][0]()[0]).hidden_states:
        return "/nonexistent/medusa"
    from pdx.decoding.speculative import head_checkpoint, medusa

    model = build(name, "stacked")
    heads = medusa.init_heads(model.cfg.hidden_size, 2, model.cfg.vocab_size)
    heads["w"] = 0.5 * jax.random.normal(jax.random.PRNGKey(1), heads["w"].shape) / model.cfg.hidden_size ** 0.5
    path = os.path.join(tempfile.mkdtemp(prefix="pdx-medusa-"), "heads")
    head_checkpoint.save(path, medusa.KIND, {"heads": heads, "vocab": np.arange(model.cfg.vocab_size)}, model,
                         {"tree": [[0], [1], [0, 0]]})
    return path


@functools.cache
def clover_heads(name: str) -> str:
    """A checkpoint of Clover heads for the family's tiny model, initialised from it and perturbed (a path
    that does not exist for a family without hidden states)."""
    if not FAMILIES[name][0]()[2].capabilities(FAMILIES[name][0]()[0]).hidden_states:
        return "/nonexistent/clover"
    import dataclasses as dc

    from pdx.decoding.speculative import clover, head_checkpoint
    from pdx.train import clover_heads

    model = build(name, "stacked")
    geo = clover.Geometry.of(model.cfg)
    rng = np.random.default_rng(1)
    heads = jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape, np.float32) / a.shape[-1] ** 0.5,
                         clover_heads.init_for(model, geo))
    path = os.path.join(tempfile.mkdtemp(prefix="pdx-clover-"), "heads")
    head_checkpoint.save(path, clover.KIND, {"heads": heads, "vocab": np.arange(model.cfg.vocab_size)}, model,
                         {"tree": [[0], [1], [0, 0]], "geometry": dc.asdict(geo)})
    return path


# Options under which each strategy's greedy output must equal the family's reference decoding
# (a function of the family name and layout, so draft models can be built). Every strategy needs one.
EXACT = {
    "ar": lambda f, lay: {},
    "spec-pld": lambda f, lay: {"k": 3},
    "spec-draft": lambda f, lay: {"k": 3, "draft": draft_for(f, lay)},
    "spec-layerskip": lambda f, lay: {"k": 3, "skip": [1]},
    "spec-aded": lambda f, lay: {"k": 3},
    "spec-tree": lambda f, lay: {"tree": [2, 2], "skip": [1]},
    "spec-medusa": lambda f, lay: {"heads": medusa_heads(f)},
    "spec-clover": lambda f, lay: {"heads": clover_heads(f)},
    "lookahead": lambda f, lay: {"window": 3, "ngram_size": 3, "guesses": 2},
    "llada": lambda f, lay: {"block_size": 5},
    "fast-dllm": lambda f, lay: {"block_size": 5, "threshold": 1.0, "cache": "none"},
    "localleap": lambda f, lay: {"block_size": 5, "threshold": 1.0, "relaxed_threshold": 1.0},
    "cd4lm-cad": lambda f, lay: {"block_size": 5, "threshold": 1.0, "max_per_step": 1, "eos_ratio": 0.0},
    "credit": lambda f, lay: {"block_size": 5, "threshold": 1.0, "alpha": 0.0},
    "prophet": lambda f, lay: {"block_size": 5, "early": 1e9, "mid": 1e9, "late": 1e9},
    "adablock": lambda f, lay: {"block_size": 5, "threshold": 1.0, "delimiter_threshold": 1.0},
}
DLLM_STRATEGIES = ("llada", "fast-dllm", "localleap", "cd4lm-cad", "credit", "prophet", "adablock")

# The support matrix as declared today: a change in a family's capabilities must show up here too.
UNSUPPORTED = {
    ("mamba2", "spec-tree"), ("mamba2", "lookahead"), ("mamba2", "spec-medusa"), ("mamba2", "spec-clover"),
    ("sambay", "spec-layerskip"), ("sambay", "spec-tree"), ("sambay", "lookahead"), ("sambay", "spec-medusa"),
    ("sambay", "spec-clover"),
} | {(f, s) for f in ("transformer", "mamba2", "sambay") for s in DLLM_STRATEGIES} \
  | {(f, s) for f in ("llada-dllm", "dream-dllm") for s in registry.STRATEGIES if s not in DLLM_STRATEGIES}

PAIRS = [(f, s) for f in FAMILIES for s in registry.STRATEGIES]


def test_every_strategy_declares_exact_options():
    assert set(EXACT) == set(registry.STRATEGIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_families_implement_the_protocol(name):
    family = FAMILIES[name][0]()[2]
    assert protocol.conforms(family) == []


_REFERENCE = {}


def reference(name: str, layout: str, prompts) -> list[list[int]]:
    """The family's reference greedy decoding of each prompt (cached per family, layout and prompts)."""
    key = (name, layout, str(prompts))
    if key not in _REFERENCE:
        model = build(name, layout)
        if FAMILIES[name][1] == "ar":
            out = registry.get("ar")(model, prompts, max_new_tokens=NEW, stop_token_ids=[])
        else:  # LLaDA with one token per step and no cache: the dLLM's baseline decoding
            out = registry.get("llada")(model, prompts, max_new_tokens=NEW, block_size=5, steps=NEW)
        _REFERENCE[key] = [out.row(i) for i in range(len(prompts))]
    return _REFERENCE[key]


def run(strategy: str, name: str, layout: str, prompts):
    model = build(name, layout)
    options = EXACT[strategy](name, layout) | {"max_new_tokens": NEW}
    if "stop_token_ids" in registry.STRATEGIES[strategy].options:
        options["stop_token_ids"] = []  # run every row to the end: more tokens compared
    return registry.get(strategy)(model, prompts, **options)


# The per-layer layout (CPU's) runs in the default suite, the stacked one (TPU/GPU's) with the slow tests.
LAYOUT_PARAMS = [pytest.param("per_layer"), pytest.param("stacked", marks=pytest.mark.slow)]


@pytest.mark.parametrize("layout", LAYOUT_PARAMS)
@pytest.mark.parametrize("name, strategy", PAIRS)
def test_identical_to_reference_or_unsupported(name, strategy, layout):
    if (name, strategy) in UNSUPPORTED:
        before = sum(compiled._COUNTS.values())
        with pytest.raises(UnsupportedError, match=f"strategy '{strategy}' does not run on"):
            run(strategy, name, layout, PROMPTS)
        assert sum(compiled._COUNTS.values()) == before  # refused at the API edge: nothing compiled
        return
    out = run(strategy, name, layout, PROMPTS)
    assert [out.row(i) for i in range(len(PROMPTS))] == reference(name, layout, PROMPTS)


@pytest.mark.slow
@pytest.mark.parametrize("name, strategy", [p for p in PAIRS if p not in UNSUPPORTED])
def test_row_alone_equals_row_in_padded_batch(name, strategy):
    alone = run(strategy, name, "per_layer", PROMPTS[1:2])
    assert alone.row(0) == reference(name, "per_layer", PROMPTS)[1]
