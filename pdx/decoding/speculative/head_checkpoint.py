"""Checkpoints of trained draft heads (Medusa and the other trained drafters), bound to their target.

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
