"""LLaDA-8B and Dream-7B checkpoint formats, written with small random tensors by transformers
models (Llama, Qwen2) under the LLaDA / Dream tensor names, loaded by `pdx.load_model`."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import pdx
from pdx.decoding.diffusion import core, fast_dllm
from pdx.errors import ModelLoadError, UnsupportedError
from pdx.masks import BIDIRECTIONAL
from pdx.models import transformer as tf
from tests.reference import llada_torch

SIZES = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
MASK, EOS = 63, 2


def _torch_model(kind: str, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind == "llada":
        return LlamaForCausalLM(LlamaConfig(**SIZES, num_key_value_heads=4, initializer_range=0.3,
                                            rms_norm_eps=1e-5, rope_theta=500000.0)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**SIZES, num_key_value_heads=2, initializer_range=0.3, eos_token_id=EOS,
                                        tie_word_embeddings=False)).eval()


def _llada_names(name: str) -> str:
    name = name.replace("model.layers.", "model.transformer.blocks.")
    for hf, ours in [("input_layernorm", "attn_norm"), ("self_attn.o_proj", "attn_out"), ("self_attn.", ""),
                     ("post_attention_layernorm", "ff_norm"), ("mlp.gate_proj", "ff_proj"), ("mlp.up_proj", "up_proj"),
                     ("mlp.down_proj", "ff_out"), ("model.embed_tokens", "model.transformer.wte"),
                     ("model.norm", "model.transformer.ln_f"), ("lm_head", "model.transformer.ff_out")]:
        name = name.replace(hf, ours)
    return name


def write_llada(path, model, **overrides):
    """A LLaDA-8B-Instruct-style directory (config keys and tensor names of its modeling_llada.py)."""
    config = dict(model_type="llada", architectures=["LLaDAModelLM"], d_model=64, n_heads=4, n_kv_heads=4, n_layers=2,
                  mlp_hidden_size=96, vocab_size=64, embedding_size=64, rope_theta=500000.0, rms_norm_eps=1e-5,
                  weight_tying=False, include_bias=False, block_type="llama", activation_type="silu",
                  mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS, max_sequence_length=4096)
    config.update(overrides)
    (path / "config.json").write_text(json.dumps(config))
    tensors = {_llada_names(k): v.detach().numpy() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"))


def write_dream(path, model):
    """A Dream-v0-Instruct-7B-style directory: Qwen2 tensors, model_type "Dream", a mask token."""
    config = json.loads(model.config.to_json_string())
    config.update(model_type="Dream", architectures=["DreamModel"], mask_token_id=MASK, pad_token_id=0)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.detach().numpy() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


def _bidirectional_logits(ref, tokens):
    mask = torch.ones(tokens.shape[0], 1, tokens.shape[1], tokens.shape[1], dtype=torch.bool)
    with torch.no_grad():
        return ref(torch.tensor(tokens), attention_mask=mask).logits.numpy()


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_format_loads_with_bidirectional_parity(tmp_path, kind):
    ref = _torch_model(kind)
    (write_llada if kind == "llada" else write_dream)(tmp_path, ref)
    model = pdx.load_model(tmp_path)
    assert model.cfg.mask_token_id == MASK and model.cfg.eos_token_ids == (EOS,)
    assert model.family.capabilities(model.cfg).logit_shift == (kind == "dream")
    tokens = np.random.default_rng(0).integers(0, 63, (2, 10))
    ours, _ = tf.forward(model.params, model.cfg, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(10), (2, 10)),
                         mask_mode=BIDIRECTIONAL)
    np.testing.assert_allclose(np.asarray(ours), _bidirectional_logits(ref, tokens), atol=1e-4, rtol=0)


def test_dream_shifted_decoding_matches_torch(tmp_path):
    """Dream's logit shift through the full pass and the dual-cache window (exact under block-causal attention)."""
    ref = _torch_model("dream")
    write_dream(tmp_path, ref)
    model = pdx.load_model(tmp_path)
    prompts = [[5, 17, 9, 33, 41], [7, 3, 12, 60, 22, 11]]
    result = fast_dllm.generate(model, prompts, max_new_tokens=16, block_size=8, threshold=0.2, cache="dual",
                                attention="block_causal")
    gen, steps = llada_torch.decode(ref, prompts, prompt_width=16, gen_length=16, block_size=8, mask_id=MASK,
                                    eos_ids=(EOS,), pad_id=0, mode="threshold", knob=0.2, attention="block_causal",
                                    logit_shift=1)
    np.testing.assert_array_equal(result.tokens, core.finish_rows(gen, MASK, (EOS,), 0)[0])
    np.testing.assert_array_equal(result.stats["commit_step"], steps)


def test_bad_llada_checkpoints(tmp_path):
    ref = _torch_model("llada")
    write_llada(tmp_path, ref, include_bias=True)
    with pytest.raises(UnsupportedError, match="include_bias"):
        pdx.load_model(tmp_path)
    write_llada(tmp_path, ref)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["mask_token_id"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mask_token_id"):
        pdx.load_model(tmp_path)
    write_llada(tmp_path, ref)
    tensors = {_llada_names(k): v.detach().numpy() for k, v in ref.state_dict().items()}
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="up_proj"):
        pdx.load_model(tmp_path)
