"""Checkpoints of trained draft heads (Medusa, Clover), bound to their target, and what the head-based
tree drafters share: loading one with its tree, and the output layer over a vocabulary subset.

A checkpoint is an orbax directory (`checkpoint.save_arrays`, written atomically): the head
arrays, the vocabulary subset, and meta.json with the drafter kind, the default tree and the target's
fingerprint. Heads read one model's hidden states and write into its output embedding, so loading them
for another model is refused: the fingerprint is the target's architecture and a probe of its output
embedding (a few fixed rows, compared with a tolerance that float32, bfloat16 and int8 storage of the
same weights all meet).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from pdx import checkpoint
from pdx.decoding.speculative import tree as trees
from pdx.errors import InvalidInputError, ModelLoadError

ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
PROBE_ROWS, PROBE_COLS = 16, 16
PROBE_TOLERANCE = 0.05  # of the probe's largest magnitude (int8 storage errs by at most 1/254 of a row's max)


def fingerprint(model) -> dict:
    """The target's identity as far as its heads care: architecture and an output-embedding probe."""
    cfg = model.cfg
    ids = np.linspace(0, cfg.vocab_size - 1, PROBE_ROWS).astype(np.int32)
    rows = model.family.lm_head_rows(model.params, cfg, jnp.asarray(ids))[:, :PROBE_COLS]
    return {"architecture": {f: getattr(cfg, f, None) for f in ARCH_FIELDS},
            "probe": np.asarray(rows, np.float32).round(6).tolist()}


def mismatch(saved: dict, model) -> str | None:
    """Why heads saved with fingerprint `saved` do not fit `model` (None: they do)."""
    now = fingerprint(model)
    if saved.get("architecture") != now["architecture"]:
        return f"they were trained for {saved.get('architecture')}, and this model is {now['architecture']}"
    a, b = np.asarray(saved.get("probe"), np.float32), np.asarray(now["probe"], np.float32)
    if a.shape != b.shape or np.max(np.abs(a - b)) > PROBE_TOLERANCE * max(float(np.max(np.abs(a))), 1e-6):
        return "they were trained for a model of the same shape with other weights (output embedding differs)"
    return None


def save(path: str | os.PathLike, kind: str, arrays: dict, model, meta: dict) -> None:
    """Write head `arrays` (numpy/jax pytree) of drafter `kind` for `model`, with `meta`, atomically."""
    checkpoint.save_arrays(path, arrays, {"kind": kind, "target": fingerprint(model), **meta})


def load(path: str | os.PathLike, kind: str, model) -> tuple[dict, dict]:
    """(arrays, meta) of the `kind` heads at `path`; refused unless they were trained for `model`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelLoadError(f"no draft-head checkpoint at {path}")
    arrays, meta = checkpoint.load_arrays(path, "draft-head checkpoint")
    if meta.get("kind") != kind:
        raise InvalidInputError(f"{path} holds {meta.get('kind')!r} draft heads, not {kind!r}")
    why = mismatch(meta.get("target", {}), model)
    if why:
        raise InvalidInputError(f"the draft heads at {path} do not fit this model: {why}")
    return arrays, meta


def load_drafter(path: str | os.PathLike | None, kind: str, model, default: str, head_keys: set[str],
                 tree=None) -> tuple[dict, np.ndarray, trees.Tree, dict]:
    """(heads, vocab, tree, meta) of the `kind` drafter checkpoint at `path` (None: the shipped one at
    `default`), refused unless it was trained for `model` and its heads hold exactly `head_keys`; `tree`:
    branching factors per depth, default the checkpoint's own sparse tree (`meta["tree"]`)."""
    if path is None and not os.path.isdir(default):
        raise ModelLoadError(f"the shipped {kind} heads are missing ({default}): reinstall pdx, or train heads "
                             "with scripts/train_draft_heads.py and pass heads=PATH")
    path = default if path is None else path
    arrays, meta = load(path, kind, model)
    heads = arrays.get("heads")
    if not isinstance(heads, dict) or set(heads) != set(head_keys) or "vocab" not in arrays:
        raise ModelLoadError(f"{path} does not hold {kind} heads ({', '.join(sorted(head_keys))}) and a vocabulary")
    shape = trees.from_paths(meta["tree"]) if tree is None else trees.branching(tuple(tree))
    return heads, np.asarray(arrays["vocab"], np.int32), shape, meta


def check_subset(tree: trees.Tree, vocab: np.ndarray, subset: int) -> None:
    """A head drafter's vocabulary: `vocab` ids for an output layer over `subset` tokens, enough of them
    for the deepest top-k rank the tree asks for."""
    if len(vocab) != subset:
        raise InvalidInputError(f"{len(vocab)} vocabulary ids for heads over {subset} tokens")
    if int(tree.rank.max()) >= len(vocab):
        raise InvalidInputError("the tree asks for more top-k ranks than the heads' vocabulary holds")


def subset_arrays(model, vocab: np.ndarray) -> dict:
    """The output layer over the subset: `out_rows [|S|, D]`, the target's own (frozen) output embedding
    on the subset's token ids `vocab [|S|]` (fp32), and those ids."""
    ids = jnp.asarray(vocab, jnp.int32)
    return {"out_rows": model.family.lm_head_rows(model.params, model.cfg, ids), "vocab": ids}
