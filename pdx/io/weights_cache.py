"""Converted-weights cache: the params `pdx.load_model` would build (dequantized, in the dtype, fused and
laid out for the backend), its config and tokenizer, stored once per source so later loads skip the
conversion.

An entry is a directory `<cache>/weights/<key>/` holding `params.safetensors` (every array, named by
its path in the param tree) and `meta.json` (family, config, tree skeleton, tokenizer, checksum of
the tensor file). The key hashes the source file(s)' bytes, the dtype, the backend layout, pdx's
version and the source of pdx's own loaders and models, so a changed or truncated checkpoint or a
changed converter misses. Entries are written to a temporary directory and renamed into place (a
reader never sees half an entry; two writers both produce a whole one and one rename wins); an entry
whose files fail their checksum or do not parse is removed and rebuilt, never half-read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import typing
import uuid
import zlib

import numpy as np

FORMAT = 1
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


def key(source: str, dtype: str, backend: str) -> str:
    """The entry name for `source` (a file or a checkpoint directory) loaded as `dtype` on `backend`."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([FORMAT, dtype, backend, _pdx_version()]).encode())
    _hash_files(h, _pdx_code_files())
    _hash_files(h, _source_files(source))
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
    import jax.numpy as jnp

    from pdx.models.quant import QuantizedWeight

    if isinstance(skel, str):
        return jnp.asarray(arrays[skel])
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


def _crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


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
                "tokenizer": _tokenizer_to_json(tokenizer), "crc32": _crc(tensors)}
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
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.path.join(directory, "weights", name)
    if not os.path.isfile(os.path.join(path, "meta.json")):
        return None
    tensors = os.path.join(path, "params.safetensors")
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT or not meta["family"].startswith("pdx.models.") or \
                _crc(tensors) != meta["crc32"]:
            raise ValueError("stale or damaged entry")
        family = importlib.import_module(meta["family"])
        cfg = _config_from_json(family.Config, meta["config"])
        params = _unflatten(meta["tree"], load_file(tensors))
        os.utime(path)  # recently used (eviction order)
        return family, cfg, params, _tokenizer_from_json(meta["tokenizer"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError, ImportError):
        shutil.rmtree(path, ignore_errors=True)
        return None
