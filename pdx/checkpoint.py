"""Orbax pytree checkpoints with a JSON meta file, written atomically (a temporary sibling directory
renamed into place, so a crash never leaves a half-written checkpoint under the final name); shared by
the model checkpoints (`pdx.io.orbax_checkpoint`) and the draft heads (`pdx.decoding.speculative`)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from pdx.errors import ModelLoadError
from pdx.files import atomic_dir

META = "meta.json"


def save_arrays(path: str | os.PathLike, arrays, meta: dict) -> None:
    """Write the pytree `arrays` (orbax, under params/) and `meta` (meta.json) to `path` atomically."""
    import orbax.checkpoint as ocp

    def write(tmp: str) -> None:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, "params"), jax.device_get(arrays))
            ckpt.wait_until_finished()
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)

    atomic_dir(os.fspath(path), write)


def load_arrays(path: str | os.PathLike, what: str = "pdx checkpoint") -> tuple[dict, dict]:
    """(arrays as numpy, meta) of a directory written by `save_arrays`; a missing, truncated or corrupt
    one is a `ModelLoadError` naming `what` was expected there."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta_file = os.path.join(path, META)
    if not os.path.isfile(meta_file):
        raise ModelLoadError(f"{path} is not a {what} (no meta.json)")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        with ocp.StandardCheckpointer() as ckpt:
            arrays = ckpt.restore(os.path.join(path, "params"))
    except (OSError, ValueError, KeyError) as e:  # json.JSONDecodeError is a ValueError
        raise ModelLoadError(f"{path} is a truncated or corrupt {what}: {e}") from e
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path} is a corrupt {what}: meta.json is not an object")
    return jax.tree.map(np.asarray, arrays), meta
