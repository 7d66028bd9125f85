"""The converted-weights cache: hit on a second load with identical params, invalidated by a changed or
truncated source, a damaged entry rebuilt (never half-read), two concurrent loaders both whole."""

import multiprocessing
import os

import jax
import numpy as np
import pytest

from pdx import model as model_module
from pdx import settings
from pdx.errors import ModelLoadError
from pdx.io import weights_cache
from pdx.model import load_model
from tests.io.gguf_writer import write_tiny_llama


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PDX_CACHE_DIR", str(root))
    monkeypatch.delenv("PDX_NO_CACHE", raising=False)
    return root


def entries(root) -> list[str]:
    return sorted(os.listdir(root / "weights")) if (root / "weights").is_dir() else []


def same_params(a, b) -> bool:
    la, lb = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
    return jax.tree.structure(a.params) == jax.tree.structure(b.params) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_second_load_is_a_hit_with_identical_params(tmp_path, cache, monkeypatch, dtype):
    path = write_tiny_llama(tmp_path / "m.gguf")
    first = load_model(path, dtype=dtype)
    assert len(entries(cache)) == 1
    monkeypatch.setattr(model_module, "_convert", lambda p: pytest.fail("converted again instead of reading the cache"))
    second = load_model(path, dtype=dtype)
    assert same_params(first, second) and second.cfg == first.cfg and second.family is first.family
    assert second.tokenizer.encode("hello 123") == first.tokenizer.encode("hello 123")


def test_changed_or_truncated_source_misses(tmp_path, cache):
    path = write_tiny_llama(tmp_path / "m.gguf", seed=0)
    a = load_model(path)
    write_tiny_llama(path, seed=1)  # same name, other weights
    b = load_model(path)
    assert not same_params(a, b) and len(entries(cache)) == 2
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):  # not served from the cache: the truncated file is read, and refused
        load_model(path)


def test_damaged_entry_is_detected_and_rebuilt(tmp_path, cache):
    path = write_tiny_llama(tmp_path / "m.gguf")
    fresh = load_model(path, cache=False)
    load_model(path)
    (name,) = entries(cache)
    tensors = cache / "weights" / name / "params.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte inside the last tensor
    tensors.write_bytes(bytes(raw))
    assert weights_cache.load(str(cache), name) is None and entries(cache) == []  # detected, removed
    rebuilt = load_model(path)
    assert same_params(rebuilt, fresh) and entries(cache) == [name]
    tensors.write_bytes(b"")  # truncated to nothing
    assert same_params(load_model(path), fresh) and entries(cache) == [name]


def test_no_cache_reads_and_writes_nothing(tmp_path, cache, monkeypatch):
    path = write_tiny_llama(tmp_path / "m.gguf")
    load_model(path, cache=False)
    assert entries(cache) == []
    monkeypatch.setenv("PDX_NO_CACHE", "1")
    assert settings.cache_dir() is None
    load_model(path)
    assert entries(cache) == []


def _load_in_child(path, root, out):
    os.environ["PDX_CACHE_DIR"] = root
    m = load_model(path)
    np.save(out, np.asarray(jax.tree.leaves(m.params)[0]))


def test_two_processes_loading_at_once_leave_one_whole_entry(tmp_path, cache):
    path = write_tiny_llama(tmp_path / "m.gguf")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_load_in_child, args=(str(path), str(cache), str(tmp_path / f"out{i}.npy")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    (name,) = entries(cache)  # one entry, no temporary directories left behind
    assert weights_cache.load(str(cache), name) is not None
    np.testing.assert_array_equal(np.load(tmp_path / "out0.npy"), np.load(tmp_path / "out1.npy"))


def test_evict_keeps_the_newest_within_the_budget(tmp_path, cache, monkeypatch):
    paths = [write_tiny_llama(tmp_path / f"m{i}.gguf", seed=i) for i in range(3)]
    for p in paths:
        load_model(p)
    assert len(entries(cache)) == 3
    size = max(weights_cache._entry_bytes(str(cache / "weights" / e)) for e in entries(cache))
    removed = weights_cache.evict(str(cache), int(1.5 * size))
    assert len(removed) == 2 and len(entries(cache)) == 1
