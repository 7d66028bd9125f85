"""pdx: fast LLM decoding as pure JAX functions.

Public API (imported lazily, so `import pdx` is cheap):
    load_model(path=None, dtype="float32") -> Model
    default_model_path() -> str
    Model (cfg, params, tokenizer)
    errors: PdxError, ModelLoadError, UnsupportedError, ConfigError, InvalidInputError
"""

from pdx.errors import ConfigError, InvalidInputError, ModelLoadError, PdxError, UnsupportedError

__all__ = ["load_model", "default_model_path", "Model", "PdxError", "ModelLoadError", "UnsupportedError",
           "ConfigError", "InvalidInputError"]

_LAZY = {"load_model": "pdx.model", "default_model_path": "pdx.model", "Model": "pdx.model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pdx' has no attribute {name!r}")
