"""Process-wide settings read from the environment: where pdx keeps its caches, and whether it may.

    PDX_CACHE_DIR   cache root (default `$XDG_CACHE_HOME/pdx`, else `~/.cache/pdx`): converted weights
                    under `weights/`, compiled programs under `exe/` (pdx's executables) and `xla/` (JAX's)
    PDX_NO_CACHE    1 / true / yes: use neither cache (the CLI's `--no-cache` does the same)
    PDX_CACHE_MAX_GB  converted weights, and executables, kept (default 8 each): least recently used go first
    PDX_CPU_KERNELS 0 / false / no / off: never build or call pdx's CPU kernels (`pdx.kernels_cpu`)
"""

from __future__ import annotations

import os

from pdx.errors import InvalidInputError


def _flag(name: str) -> bool | None:
    """An on/off environment setting: True (1/true/yes/on), False (0/false/no/off) or None (unset/other)."""
    text = os.environ.get(name, "").strip().lower()
    return True if text in ("1", "true", "yes", "on") else False if text in ("0", "false", "no", "off") else None


def cache_enabled() -> bool:
    return _flag("PDX_NO_CACHE") is not True


def cpu_kernels_enabled() -> bool:
    """Whether pdx may build and call its CPU kernels (`pdx.kernels_cpu`); PDX_CPU_KERNELS=0 says no."""
    return _flag("PDX_CPU_KERNELS") is not False


def cache_dir() -> str | None:
    """The cache root, or None when caching is off."""
    if not cache_enabled():
        return None
    root = os.environ.get("PDX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pdx")
    return os.path.abspath(root)


def cache_max_bytes() -> int:
    text = os.environ.get("PDX_CACHE_MAX_GB", "8")
    try:
        gb = float(text)
    except ValueError:
        raise InvalidInputError(f"PDX_CACHE_MAX_GB must be a number of GB, got {text!r}") from None
    return int(gb * (1 << 30))


def enable_compilation_cache(root: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at `<root>/xla` and pdx's executable cache at `<root>/exe`
    (default root: `cache_dir()`), so a later process running the same program loads it instead of
    compiling; returns the XLA directory (None: caching is off)."""
    import jax

    from pdx.decoding import executable_cache

    root = cache_dir() if root is None else root
    if root is None:
        return None
    executable_cache.enable(os.path.join(root, "exe"), cache_max_bytes())
    path = os.path.join(root, "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
