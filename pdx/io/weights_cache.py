"""Converted-weights cache: the params `pdx.load_model` would build (dequantized, in the dtype, fused and
laid out for the backend), its config and tokenizer, stored once per source so later loads skip the
conversion.

An entry is a directory `<cache>/weights/<key>/` holding `params.safetensors` (every array, named by
its path in the param tree) and `meta.json` (family, config, tree skeleton, tokenizer, checksum of
the tensor file, per 16 MiB piece). The key hashes the source file(s)' bytes (memoised by path, size
and mtime under `<cache>/sources/`), the dtype, the backend layout, pdx's version and the source of
pdx's own loaders and models, so a changed or truncated checkpoint or a changed converter misses. A
load maps the tensor file and hands views of it to one `jax.device_put`.
Entries are written to a temporary directory and renamed into place (a
reader never sees half an entry; two writers both produce a whole one and one rename wins); an entry
whose files fail their checksum or do not parse is removed and rebuilt, never half-read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import mmap
import os
import shutil
import time
import typing
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pdx.files import atomic_write

FORMAT = 2
_CHUNK = 1 << 24
_CODE = ("io", "models", "ssm", "model.py")  # pdx sources whose change alters converted params


def _hash_files(h, paths: list[str]) -> None:
    for path in paths:
        h.update(os.path.basename(path).encode() + b"\0" + str(os.path.getsize(path)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)


def _source_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))


def _pdx_code_files() -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = []
    for part in _CODE:
        p = os.path.join(root, part)
        if os.path.isfile(p):
            out.append(p)
        else:
            out += sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(".py"))
    return out


def _pdx_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pdx")
    except metadata.PackageNotFoundError:
        return "source"


_SETTLED_NS = 2_000_000_000  # a file untouched this long has a final mtime (coarse clocks, racy writers)


def _source_digest(paths: list[str], directory: str | None) -> str:
    """Content hash of the source files, memoised under `directory` by their (path, size, mtime, inode).

    Hashing a 100 MB GGUF costs a start 0.1-0.3 s. The memo is written only for files whose mtime is
    settled (older than `_SETTLED_NS` when hashed), as git does for racily clean files: any later write
    gives a newer mtime, so a changed or truncated file never reuses the memo."""
    stats = [(os.path.realpath(p), st.st_size, st.st_mtime_ns, st.st_ino) for p in paths for st in [os.stat(p)]]
    memo = None
    if directory:
        memo = os.path.join(directory, "sources",
                            hashlib.blake2b(json.dumps(stats).encode(), digest_size=16).hexdigest())
        try:
            with open(memo) as f:
                return f.read().strip()
        except OSError:
            pass
    h = hashlib.blake2b(digest_size=20)
    _hash_files(h, paths)
    digest = h.hexdigest()
    if memo and all(time.time_ns() - mtime > _SETTLED_NS for _, _, mtime, _ in stats):
        try:
            os.makedirs(os.path.dirname(memo), exist_ok=True)
            atomic_write(memo, digest)
        except OSError:
            pass  # a read-only cache only costs the next start the hash
    return digest


def key(source: str, dtype: str, backend: str, directory: str | None = None) -> str:
    """The entry name for `source` (a file or a checkpoint directory) loaded as `dtype` on `backend`
    (`directory`: the cache root, where the source's content hash is memoised)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([FORMAT, dtype, backend, _pdx_version()]).encode())
    _hash_files(h, _pdx_code_files())
    h.update(_source_digest(_source_files(source), directory).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Param trees <-> (flat arrays, JSON skeleton)


def _flatten(tree, prefix: str, arrays: dict):
    from pdx.models.quant import QuantizedWeight

    if isinstance(tree, dict):
        return {"dict": {k: _flatten(v, f"{prefix}{k}.", arrays) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {type(tree).__name__: [_flatten(v, f"{prefix}{i}.", arrays) for i, v in enumerate(tree)]}
    if isinstance(tree, QuantizedWeight):
        return {"int8": {"q": _flatten(tree.q, prefix + "q.", arrays), "scale": _flatten(tree.scale, prefix + "s.",
                                                                                         arrays)}}
    name = prefix.rstrip(".")
    arrays[name] = np.asarray(tree)
    return name


def _unflatten(skel, arrays: dict):
    """The param tree of `skel` over host `arrays` (the caller moves it to the device in one transfer)."""
    from pdx.models.quant import QuantizedWeight

    if isinstance(skel, str):
        return arrays[skel]
    (kind, body), = skel.items()
    if kind == "dict":
        return {k: _unflatten(v, arrays) for k, v in body.items()}
    if kind in ("list", "tuple"):
        items = [_unflatten(v, arrays) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "int8":
        return QuantizedWeight(q=_unflatten(body["q"], arrays), scale=_unflatten(body["scale"], arrays))
    raise ValueError(f"unknown node {kind!r}")


def _config_to_json(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _config_from_json(cls, d: dict):
    """`cls(**d)` with JSON's lists back to tuples and nested dataclasses rebuilt from the type hints."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in d.items():
        if isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, dict):
            nested = [t for t in typing.get_args(hints[name]) or (hints[name],) if dataclasses.is_dataclass(t)]
            value = nested[0](**value)
        kwargs[name] = value
    return cls(**kwargs)


def _tokenizer_to_json(tok) -> dict | None:
    if tok is None:
        return None
    return {"backend": tok.backend.to_str(), "bos_token_id": tok.bos_token_id, "eos_token_ids": list(tok.eos_token_ids),
            "add_bos": tok.add_bos, "chat_template": tok.chat_template, "special_tokens": tok.special_tokens}


def _tokenizer_from_json(d: dict | None):
    if d is None:
        return None
    from tokenizers import Tokenizer as Backend

    from pdx.io.tokenizer import Tokenizer

    return Tokenizer(backend=Backend.from_str(d["backend"]), bos_token_id=d["bos_token_id"],
                     eos_token_ids=tuple(d["eos_token_ids"]), add_bos=d["add_bos"], chat_template=d["chat_template"],
                     special_tokens=d["special_tokens"])


# ---------------------------------------------------------------------------------------------
# Entries


def _crcs(data) -> list[int]:
    """CRC-32 of each `_CHUNK`-byte piece of `data` (bytes-like), computed on every core (zlib releases the GIL)."""
    view = memoryview(data)
    pieces = [view[i:i + _CHUNK] for i in range(0, len(view), _CHUNK)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(zlib.crc32, pieces))


_NUMPY_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8", "I32": "int32",
                 "I64": "int64", "BOOL": "bool"}


def _tensor_views(data) -> dict:
    """The arrays of a safetensors file held in `data`, as views into it (safetensors' own numpy loader
    copies every tensor, a fifth of a warm start). Raises ValueError on a malformed file."""
    import ml_dtypes

    if len(data) < 8:
        raise ValueError("truncated safetensors file")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + n]))
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = np.dtype(ml_dtypes.bfloat16) if info["dtype"] == "BF16" else np.dtype(_NUMPY_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if base + end > len(data) or end - begin != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {name} lies outside the file")
        out[name] = np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=base + begin).reshape(shape)
    return out


def _map(path: str) -> mmap.mmap:
    """The file mapped read-only: its pages come straight from the page cache (reading 540 MB into fresh
    memory cost a start about a second in page faults). Entries are replaced by rename, never rewritten
    in place, so a mapping never sees its file change."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))


def store(directory: str, name: str, family, cfg, params, tokenizer) -> str:
    """Write the entry `name` under `directory` atomically; returns its path."""
    from safetensors.numpy import save_file

    final = os.path.join(directory, "weights", name)
    tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        arrays: dict = {}
        skeleton = _flatten(params, "", arrays)
        tensors = os.path.join(tmp, "params.safetensors")
        save_file(arrays, tensors)
        meta = {"format": FORMAT, "family": family.__name__, "config": _config_to_json(cfg), "tree": skeleton,
                "tokenizer": _tokenizer_to_json(tokenizer), "crc32": _crcs(_map(tensors))}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        try:
            os.rename(tmp, final)
        except OSError:  # another process stored the same entry first: keep theirs
            if not os.path.isfile(os.path.join(final, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _entry_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def evict(directory: str, max_bytes: int, keep: str | None = None) -> list[str]:
    """Remove least recently used entries (by mtime: `load` touches what it reads) until the entries
    total at most `max_bytes`; never `keep`. Returns the names removed."""
    root = os.path.join(directory, "weights")
    if not os.path.isdir(root):
        return []
    entries = [e for e in os.listdir(root) if ".tmp-" not in e and os.path.isdir(os.path.join(root, e))]
    entries.sort(key=lambda e: os.path.getmtime(os.path.join(root, e)), reverse=True)  # newest first
    total, removed = 0, []
    for e in entries:
        total += _entry_bytes(os.path.join(root, e))
        if total > max_bytes and e != keep:
            shutil.rmtree(os.path.join(root, e), ignore_errors=True)
            removed.append(e)
    return removed


def load(directory: str, name: str):
    """(family, cfg, params, tokenizer) of entry `name`, or None when it is missing or damaged (a damaged
    entry is removed, so the caller rebuilds it)."""
    import jax

    path = os.path.join(directory, "weights", name)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        return None
    tensors = os.path.join(path, "params.safetensors")
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        data = _map(tensors)
        if meta.get("format") != FORMAT or not meta["family"].startswith("pdx.models.") or \
                _crcs(data) != meta["crc32"]:
            raise ValueError("stale or damaged entry")
        family = importlib.import_module(meta["family"])
        cfg = _config_from_json(family.Config, meta["config"])
        params = jax.device_put(_unflatten(meta["tree"], _tensor_views(data)))  # one call: 3x faster than per leaf
        jax.block_until_ready(params)  # copied off the mapping before it can go
        os.utime(path)  # recently used (eviction order)
        return family, cfg, params, _tokenizer_from_json(meta["tokenizer"])
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        shutil.rmtree(path, ignore_errors=True)
        return None
