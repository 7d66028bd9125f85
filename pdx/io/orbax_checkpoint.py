"""Orbax checkpoints of tiny dLLMs, saved atomically: written to a temporary sibling directory,
then renamed into place, so a crash never leaves a half-written checkpoint under the final name."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from pdx.errors import ModelLoadError
from pdx.files import atomic_dir
from pdx.models import transformer
from pdx.models.layers import RopeScaling

META = "meta.json"


def config_to_json(cfg: transformer.Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_json(d: dict) -> transformer.Config:
    d = dict(d)
    d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
    if d.get("layer_windows") is not None:
        d["layer_windows"] = tuple(d["layer_windows"])
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return transformer.Config(**d)


def save(path: str | os.PathLike, params: dict, cfg: transformer.Config, meta: dict) -> None:
    """Write `params` (orbax) and `meta.json` (config + `meta`) to `path`, replacing it atomically."""
    import orbax.checkpoint as ocp

    def write(tmp: str) -> None:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, "params"), jax.device_get(params))
            ckpt.wait_until_finished()
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"config": config_to_json(cfg), **meta}, f, indent=1)

    atomic_dir(os.fspath(path), write)


def load(path: str | os.PathLike) -> tuple[dict, transformer.Config, dict]:
    """(params as numpy, config, meta) of a checkpoint written by `save`."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta_file = os.path.join(path, META)
    if not os.path.isfile(meta_file):
        raise ModelLoadError(f"{path} is not a pdx dLLM checkpoint (no meta.json)")
    with open(meta_file) as f:
        meta = json.load(f)
    cfg = config_from_json(meta.pop("config"))
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.join(path, "params"))
    return jax.tree.map(np.asarray, params), cfg, meta


def load_dllm(path: str | os.PathLike) -> tuple[transformer.Config, dict, dict]:
    """(config, stacked params as numpy, metadata: attention kind, block size, tasks) of a trained tiny dLLM;
    `pdx.load_model(path)` wraps it in a `Model`."""
    params, cfg, meta = load(path)
    # Checkpoints written before attention weights became 2-D ([L, N, H, D] etc.): same values, new shape.
    L, D, N, K, H = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {"wq": (L, N * H, D), "wk": (L, K * H, D), "wv": (L, K * H, D), "wo": (L, D, N * H),
              "bq": (L, N * H), "bk": (L, K * H), "bv": (L, K * H)}
    params = params | {"layers": {k: np.reshape(v, shapes[k]) if k in shapes else v
                                  for k, v in params["layers"].items()}}
    return cfg, params, meta
