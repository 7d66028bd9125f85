"""The on-disk executable cache: a stored program is loaded (not compiled) by a later run with identical
output, a damaged entry is removed and compiled again, unstable static arguments are never stored,
and the source-hash memo of the weights cache never outlives a change to its file."""

import dataclasses
import os

import jax
import pytest

from pdx.decoding import ar, compiled, executable_cache
from pdx.io import weights_cache
from pdx.model import Model
from pdx.models import transformer as tf

CFG = dataclasses.replace(tf.SMOLLM2_135M, vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=2, num_kv_heads=1, head_dim=16, eos_token_ids=(2,))


@pytest.fixture
def exe_dir(tmp_path):
    executable_cache.enable(str(tmp_path / "exe"))
    compiled.clear()
    yield tmp_path / "exe"
    executable_cache.enable(None)
    compiled.clear()


@pytest.fixture(scope="module")
def model():
    return Model(cfg=CFG, params=tf.init_params(CFG, jax.random.PRNGKey(1), scale=0.3), tokenizer=None, family=tf)


def run_fresh(model):
    """Generate as a new process would: nothing compiled in memory."""
    compiled.clear()
    return ar.generate(model, [[4, 5, 6]], max_new_tokens=6, temperature=0.7, seed=3)


def test_a_stored_program_is_loaded_not_compiled(exe_dir, model):
    before = compiled.compile_count(ar.prefill), compiled.compile_count(ar.decode)
    first = run_fresh(model)
    assert sorted(os.listdir(exe_dir)) and all(f.endswith(".exe") for f in os.listdir(exe_dir))
    stored = (compiled.compile_count(ar.prefill), compiled.compile_count(ar.decode))
    assert stored == (before[0] + 1, before[1] + 1)
    second = run_fresh(model)
    assert (compiled.compile_count(ar.prefill), compiled.compile_count(ar.decode)) == stored  # loaded from disk
    assert second.row(0) == first.row(0)


def test_a_damaged_entry_is_removed_and_compiled_again(exe_dir, model):
    first = run_fresh(model)
    files = sorted(exe_dir.iterdir())
    for f in files:  # one flipped byte in each; the checksum catches it before anything is deserialized
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    assert all(executable_cache.load(str(f)) is None for f in files) and not any(f.exists() for f in files)
    count = compiled.compile_count(ar.prefill)
    files[0].write_bytes(b"")  # and an empty (truncated) file
    assert executable_cache.load(str(files[0])) is None
    assert run_fresh(model).row(0) == first.row(0)
    assert compiled.compile_count(ar.prefill) == count + 1 and len(list(exe_dir.iterdir())) == len(files)


def test_only_stable_static_arguments_are_stored(exe_dir):
    assert executable_cache.entry_path(ar.prefill, {"family": tf, "cfg": CFG}, "sig", "reference")
    closure = lambda x: x  # noqa: E731
    outside = dataclasses.make_dataclass("Outside", ["a"])(1)  # defined outside pdx: its code is not in the key
    for static in (closure, outside, object(), jax.numpy.ones(2)):
        assert executable_cache.entry_path(ar.prefill, {"f": static}, "sig", "reference") is None
    executable_cache.enable(None)
    assert executable_cache.entry_path(ar.prefill, {"cfg": CFG}, "sig", "reference") is None


def test_source_hash_memo_never_outlives_a_change(tmp_path):
    src, root = tmp_path / "m.bin", str(tmp_path / "cache")
    src.write_bytes(b"a" * 1000)
    fresh = weights_cache.key(str(src), "float32", "cpu", root)
    assert not os.path.isdir(os.path.join(root, "sources"))  # just written: its mtime may not be final yet
    os.utime(src, (1e9, 1e9))  # settled
    settled = weights_cache.key(str(src), "float32", "cpu", root)
    assert settled == fresh and len(os.listdir(os.path.join(root, "sources"))) == 1
    (memo,) = (tmp_path / "cache" / "sources").iterdir()
    memo.write_text("0" * 40)
    assert weights_cache.key(str(src), "float32", "cpu", root) != settled  # served from the memo
    src.write_bytes(b"b" * 1000)  # same size, new content, new mtime
    assert weights_cache.key(str(src), "float32", "cpu", root) != settled
