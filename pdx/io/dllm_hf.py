"""Load the HF checkpoint formats of LLaDA-8B (`model_type: llada`) and Dream-7B (`model_type: Dream`).

LLaDA ships its own OLMo-derived modeling code: config keys `d_model`, `n_heads`, `n_kv_heads`,
`n_layers`, `mlp_hidden_size`, `embedding_size`, `weight_tying`, and tensors under
`model.transformer.` (`wte`, `blocks.{i}.{q,k,v}_proj`, `attn_out`, `ff_proj` (gate), `up_proj`,
`ff_out` (down), `attn_norm`, `ff_norm`, `ln_f`, `ff_out` (head)). Dream is Qwen2 (HF tensor
names, q/k/v biases) plus `mask_token_id`, and predicts token i + 1 at position i
(`Config.logit_shift = 1`). Both become a `pdx.models.transformer` Config with `mask_token_id` set.
"""

from __future__ import annotations

import dataclasses
import os

from pdx.errors import ModelLoadError, UnsupportedError
from pdx.io import hf_checkpoint
from pdx.models.transformer import Config

DLLM_TYPES = ("llada", "Dream")

_LLADA_LAYER = {  # LLaDA name under model.transformer.blocks.{i}. -> HF Llama name under model.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight",
    "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight",
    "attn_out.weight": "self_attn.o_proj.weight",
    "ff_norm.weight": "post_attention_layernorm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}


def model_type(path: str) -> str | None:
    cfg = os.path.join(path, "config.json")
    return hf_checkpoint.read_json(cfg).get("model_type") if os.path.isfile(cfg) else None


def llada_config(hf: dict) -> Config:
    unsupported = {"alibi": True, "include_bias": True, "include_qkv_bias": True, "attention_layer_norm": True}
    for key, bad in unsupported.items():
        if hf.get(key, False) == bad:
            raise UnsupportedError(f"LLaDA config with {key}={bad} is not supported")
    if hf.get("block_type", "llama") != "llama" or hf.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise UnsupportedError(f"LLaDA block_type {hf.get('block_type')!r} / activation "
                               f"{hf.get('activation_type')!r} is not supported (only llama / silu)")
    if hf.get("mask_token_id") is None:
        raise ModelLoadError("LLaDA config.json has no mask_token_id")
    try:
        heads, hidden = int(hf["n_heads"]), int(hf["d_model"])
        eos = hf.get("eos_token_id")
        return Config(
            vocab_size=int(hf.get("embedding_size") or hf["vocab_size"]), hidden_size=hidden,
            intermediate_size=int(hf["mlp_hidden_size"]), num_layers=int(hf["n_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("n_kv_heads") or heads), head_dim=hidden // heads,
            rope_theta=float(hf.get("rope_theta", 10000.0)), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("weight_tying", False)),
            max_position_embeddings=int(hf.get("max_sequence_length", 4096)),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=() if eos is None else (int(eos),),
            pad_token_id=hf.get("pad_token_id"), mask_token_id=int(hf["mask_token_id"]),
        )
    except KeyError as e:
        raise ModelLoadError(f"LLaDA config.json lacks required key {e}") from e


def llada_tensors(tensors: dict, cfg: Config) -> dict:
    """Rename LLaDA tensors to the HF Llama names `hf_checkpoint.params_from_hf` maps."""
    out = {}
    prefix = "model.transformer."
    for name, w in tensors.items():
        if not name.startswith(prefix):
            raise ModelLoadError(f"unexpected tensor {name!r} in a LLaDA checkpoint")
        rest = name[len(prefix):]
        if rest == "wte.weight":
            out["model.embed_tokens.weight"] = w
        elif rest == "ln_f.weight":
            out["model.norm.weight"] = w
        elif rest == "ff_out.weight":
            out["lm_head.weight"] = w
        elif rest.startswith("blocks."):
            _, i, sub = rest.split(".", 2)
            if sub not in _LLADA_LAYER:
                raise UnsupportedError(f"LLaDA tensor {name!r} is not supported")
            out[f"model.layers.{i}.{_LLADA_LAYER[sub]}"] = w
        else:
            raise ModelLoadError(f"unexpected tensor {name!r} in a LLaDA checkpoint")
    return out


def load(path: str | os.PathLike) -> tuple[Config, dict]:
    """(config, params) of a LLaDA or Dream checkpoint directory (a `pdx.models.transformer` model)."""
    path = os.fspath(path)
    hf = hf_checkpoint.read_json(os.path.join(path, "config.json"))
    kind = hf.get("model_type")
    if kind == "llada":
        cfg = llada_config(hf)
        return cfg, hf_checkpoint.params_from_hf(llada_tensors(hf_checkpoint.read_safetensors(path), cfg), cfg)
    if kind == "Dream":
        if hf.get("mask_token_id") is None:
            raise ModelLoadError("Dream config.json has no mask_token_id")
        cfg = dataclasses.replace(hf_checkpoint.config_from_hf({**hf, "model_type": "qwen2"}), logit_shift=1)
        return cfg, hf_checkpoint.params_from_hf(hf_checkpoint.read_safetensors(path), cfg)
    raise UnsupportedError(f"model_type {kind!r} is not a dLLM checkpoint format {DLLM_TYPES}")
