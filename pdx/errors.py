"""Every user-facing failure in pdx raises a `PdxError` subclass.

Messages say what was wrong and what to do about it. Validation happens at the API edge,
before anything is traced or compiled, so a bad argument never surfaces as an XLA error.
"""


class PdxError(Exception):
    """Base class for all pdx errors."""


class ModelLoadError(PdxError):
    """A checkpoint or tokenizer could not be loaded: missing, truncated, corrupt or unsupported."""


class UnsupportedError(ModelLoadError):
    """The file is valid but uses a feature pdx does not implement (architecture, tensor type)."""


class ConfigError(PdxError, ValueError):
    """A model or strategy configuration is inconsistent."""


class InvalidInputError(PdxError, ValueError):
    """Arguments to a public function are invalid (shapes, token ids, options)."""


def require(condition: bool, message: str, error: type[PdxError] = InvalidInputError) -> None:
    """Raise `error(message)` unless `condition` holds; keeps API-edge checks one line each."""
    if not condition:
        raise error(message)
