"""Mamba-2 checkpoint loading: HF and state-spaces naming, routing in `pdx.load_model`, clear errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pdx
from pdx.errors import ConfigError, ModelLoadError, UnsupportedError
from pdx.io import mamba2_checkpoint as ckpt
from pdx.models import mamba2 as m2
from tests.models.test_mamba2 import ATOL, make_hf, positions_like, step_fn, torch_one_thread  # noqa: F401

HF_CONFIG = dict(model_type="mamba2", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                 expand=2, state_size=16, n_groups=1)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A saved transformers Mamba2 (state 16, 1 group, tied) and the torch model."""
    path = tmp_path_factory.mktemp("mamba2_hf")
    model = make_hf("g1-tied-chunk5")
    model.save_pretrained(path)
    return path, model


def reference_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_state_spaces_naming_and_pytorch_bin(tmp_path, hf_dir):
    """The original mamba_ssm layout: d_model/n_layer/ssm_cfg config, `backbone.embedding`, pytorch_model.bin."""
    _, model = hf_dir
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(dict(
        d_model=32, d_intermediate=0, n_layer=2, vocab_size=90, pad_vocab_size_multiple=16, rms_norm=True,
        residual_in_fp32=True, fused_add_norm=True, tie_embeddings=True, attn_layer_idx=[], attn_cfg={},
        ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16, chunk_size=5))))
    loaded = pdx.load_model(tmp_path)
    assert loaded.family is m2 and loaded.cfg.vocab_size == 96 and loaded.cfg.num_heads == 4
    tokens = np.random.default_rng(0).integers(0, 96, (1, 11))
    ours, _ = step_fn(loaded.params, loaded.cfg, jnp.asarray(tokens), positions_like(tokens))
    np.testing.assert_allclose(np.asarray(ours), reference_logits(model, tokens), atol=ATOL, rtol=0)


def test_tokenizer_json_is_loaded(tmp_path, hf_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path, _ = hf_dir
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = pdx.load_model(tmp_path)
    assert loaded.family is m2 and loaded.tokenizer.encode("hello world") == [1, 2]


def rewrite_config(src, dst, **changes):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    raw = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


def test_state_size_mismatch_is_a_load_error(tmp_path, hf_dir):
    path = rewrite_config(hf_dir[0], tmp_path, state_size=8)
    with pytest.raises(ModelLoadError, match="in_proj.*config.json implies"):
        pdx.load_model(path)


def test_layer_count_and_missing_tensor_errors(tmp_path, hf_dir):
    with pytest.raises(ModelLoadError, match="more than the 1 layers"):
        pdx.load_model(rewrite_config(hf_dir[0], tmp_path / "a", num_hidden_layers=1))
    with pytest.raises(ModelLoadError, match="missing tensor 'backbone.layers.2.norm.weight'"):
        pdx.load_model(rewrite_config(hf_dir[0], tmp_path / "b", num_hidden_layers=3))


@pytest.mark.parametrize("changes,error,match", [
    (dict(num_heads=None), ModelLoadError, "num_heads"),
    (dict(head_dim=8), ConfigError, "hidden_size \\* expand"),
    (dict(n_groups=3), ConfigError, "multiple of n_groups"),
    (dict(conv_kernel=1), ConfigError, "conv_kernel"),
    (dict(hidden_act="gelu"), UnsupportedError, "hidden_act"),
])
def test_bad_hf_config_fields(changes, error, match):
    raw = HF_CONFIG | changes
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(error, match=match):
        ckpt.config_from_hf(raw)


@pytest.mark.parametrize("changes,error,match", [
    (dict(ssm_cfg={}), UnsupportedError, "not Mamba-2"),
    (dict(ssm_cfg=dict(layer="Mamba2", headdim=24)), ConfigError, "multiple of headdim"),
    (dict(ssm_cfg=dict(layer="Mamba2", D_has_hdim=True)), UnsupportedError, "D_has_hdim"),
    (dict(ssm_cfg=dict(layer="Mamba2", rope=True)), UnsupportedError, "rope"),
    (dict(attn_layer_idx=[1]), UnsupportedError, "hybrid"),
])
def test_bad_state_spaces_config_fields(changes, error, match):
    raw = dict(d_model=32, n_layer=2, vocab_size=96, ssm_cfg=dict(layer="Mamba2", headdim=16)) | changes
    with pytest.raises(error, match=match):
        ckpt.config_from_state_spaces(raw)


def test_infinite_limit_as_transformers_5_writes_it():
    raw = HF_CONFIG | dict(time_step_limit=[0.0, {"__float__": "Infinity"}])
    assert ckpt.config_from_hf(raw).dt_limit == (0.0, float("inf"))
