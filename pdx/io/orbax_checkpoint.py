"""Orbax checkpoints of tiny dLLMs, saved atomically: written to a temporary sibling directory,
then renamed into place, so a crash never leaves a half-written checkpoint under the final name."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from pdx.checkpoint import load_arrays, save_arrays
from pdx.errors import ModelLoadError
from pdx.models import transformer
from pdx.models.layers import RopeScaling


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
    save_arrays(path, params, {"config": config_to_json(cfg), **meta})


def load(path: str | os.PathLike) -> tuple[dict, transformer.Config, dict]:
    """(params as numpy, config, meta) of a checkpoint written by `save`."""
    params, meta = load_arrays(path, "pdx dLLM checkpoint")
    if "config" not in meta:
        raise ModelLoadError(f"{path} is not a pdx dLLM checkpoint (meta.json has no config)")
    return params, config_from_json(meta.pop("config")), meta


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
