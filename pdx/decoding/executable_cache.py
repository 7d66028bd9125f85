"""On-disk cache of compiled decoding programs: a later process loads the executable instead of tracing,
lowering and compiling it again.

JAX's persistent compilation cache skips only XLA's compile; tracing and lowering SmolLM2's unrolled
30 layers still cost a start about a second. An entry here is the serialized executable
(`jax.experimental.serialize_executable`) with its argument and result tree structures, keyed by
everything the program depends on: the function, its static arguments, the shapes and dtypes of its
arguments, the attention implementation, the JAX/jaxlib versions, the devices, `XLA_FLAGS` and the
source of pdx itself. Programs whose static arguments have no stable text (a closure, an object
printed with its address) are never stored. Files carry a CRC-32 of their payload and are written
atomically; a damaged entry is removed and the program compiled again, never half-loaded.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import os
import pickle
import types
import zlib

from pdx.files import atomic_write

FORMAT = 1
_DIR: str | None = None
_MAX_BYTES = 8 << 30


def enable(directory: str | None, max_bytes: int = 8 << 30) -> None:
    """Store and load executables under `directory` (None: off, the default), keeping at most `max_bytes`."""
    global _DIR, _MAX_BYTES
    _DIR, _MAX_BYTES = directory, max_bytes
    if directory:
        os.makedirs(directory, exist_ok=True)


def directory() -> str | None:
    return _DIR


class _Unstable(Exception):
    """A static argument has no text that is the same in every process."""


def stable_text(obj) -> str:
    """Text of `obj` that is identical across processes; raises `_Unstable` when there is none."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return repr(obj)
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__qualname__}.{obj.name}"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}({','.join(stable_text(o) for o in obj)})"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{stable_text(k)}:{stable_text(v)}" for k, v in sorted(obj.items(), key=str)) + "}"
    if isinstance(obj, types.ModuleType):
        return f"module:{obj.__name__}"
    if not _pdx_defined(obj):  # code outside pdx is not in the key: its edits would go unseen
        raise _Unstable(type(obj).__name__)
    if isinstance(obj, (types.FunctionType, type)) and "<locals>" not in obj.__qualname__:
        return f"{obj.__module__}.{obj.__qualname__}"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = ",".join(f"{f.name}={stable_text(getattr(obj, f.name))}" for f in dataclasses.fields(obj))
        return f"{type(obj).__module__}.{type(obj).__qualname__}({fields})"
    raise _Unstable(type(obj).__name__)


def _pdx_defined(obj) -> bool:
    module = getattr(obj, "__module__", None) if isinstance(obj, (types.FunctionType, type)) else type(obj).__module__
    return module == "pdx" or (module or "").startswith("pdx.")


@functools.cache
def _environment() -> str:
    """The JAX build, the devices, XLA's flags and a hash of pdx's own source."""
    import jax
    import jaxlib

    h = hashlib.blake2b(digest_size=16)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith((".py", ".cc")):
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(f.encode() + b"\0" + fh.read())
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    return repr((FORMAT, jax.__version__, jaxlib.__version__, devices, os.environ.get("XLA_FLAGS", ""), h.hexdigest()))


def entry_path(fn, statics: dict, signature, impl: str) -> str | None:
    """Where the executable of `fn(*args, **statics)` with this argument signature lives (None: not storable)."""
    if _DIR is None:
        return None
    target = getattr(fn, "__wrapped__", fn)
    try:
        text = "|".join([stable_text(target), stable_text(statics), str(signature), impl, _environment()])
    except _Unstable:
        return None
    return os.path.join(_DIR, hashlib.blake2b(text.encode(), digest_size=20).hexdigest() + ".exe")


def load(path: str):
    """The executable stored at `path`, or None when absent or damaged (a damaged file is removed)."""
    from jax.experimental import serialize_executable

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        crc, payload = int.from_bytes(data[:4], "little"), data[4:]
        if len(data) < 4 or zlib.crc32(payload) != crc:
            raise ValueError("checksum mismatch")
        exe = serialize_executable.deserialize_and_load(*pickle.loads(payload))
    except Exception:  # noqa: BLE001 - any failure to read an entry means: compile again
        _remove(path)
        return None
    os.utime(path)  # recently used
    return exe


def store(path: str, exe) -> None:
    """Write `exe` to `path` atomically, then keep the cache within its byte bound; a full or
    read-only disk only costs the next start a compile."""
    from jax.experimental import serialize_executable

    payload = pickle.dumps(serialize_executable.serialize(exe))
    try:
        atomic_write(path, zlib.crc32(payload).to_bytes(4, "little") + payload)
    except OSError:
        pass
    evict(_MAX_BYTES)


def evict(max_bytes: int) -> list[str]:
    """Remove least recently used entries until they total at most `max_bytes`; returns the files removed."""
    if _DIR is None or not os.path.isdir(_DIR):
        return []
    files = [os.path.join(_DIR, f) for f in os.listdir(_DIR) if f.endswith(".exe")]
    files.sort(key=os.path.getmtime, reverse=True)  # newest first
    total, removed = 0, []
    for f in files:
        total += os.path.getsize(f)
        if total > max_bytes:
            _remove(f)
            removed.append(f)
    return removed


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
