"""Load HF checkpoint directories (`config.json` + `*.safetensors`, as `save_pretrained` writes them)."""

from __future__ import annotations

import json
import os

import numpy as np

from pdx.errors import ModelLoadError, UnsupportedError
from pdx.models.layers import RopeScaling
from pdx.models.transformer import Config

_LLAMA_TYPES = ("llama", "mistral", "qwen2")


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ModelLoadError(f"missing file: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """rope theta and scaling from either the transformers-5 `rope_parameters` or the older keys."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UnsupportedError(f"rope scaling {kind!r} is not supported (only 'llama3')")
    return theta, RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                              float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))


def _windows(hf: dict, layers: int) -> tuple[int, ...] | None:
    window = hf.get("sliding_window") or 0
    if not window:
        return None
    if "layer_types" in hf and hf["layer_types"]:
        return tuple(window if t == "sliding_attention" else 0 for t in hf["layer_types"])
    if hf.get("model_type") == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        first = hf.get("max_window_layers", layers)
        return tuple(window if i >= first else 0 for i in range(layers))
    return (window,) * layers


def config_from_hf(hf: dict) -> Config:
    model_type = hf.get("model_type")
    if model_type not in _LLAMA_TYPES:
        raise UnsupportedError(
            f"model_type {model_type!r} is not supported; pdx loads Llama-family types {_LLAMA_TYPES}, "
            "'mamba2', 'phi4flash' (SambaY), 'llada' and 'Dream' directories, GGUF files and pdx's own tiny dLLMs")
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        layers = int(hf["num_hidden_layers"])
        theta, scaling = _rope(hf)
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        if hf.get("mlp_bias"):
            raise UnsupportedError("mlp_bias=True is not supported")
        return Config(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", model_type != "mistral")),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            attention_out_bias=model_type == "llama" and bool(hf.get("attention_bias", False)),
            layer_windows=_windows(hf, layers),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
            mask_token_id=hf.get("mask_token_id"),
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks required key {e}") from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint dir (single file or sharded with an index), as fp32 numpy."""
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors files")
    tensors = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ModelLoadError(f"shard {file} listed in the index is missing")
        try:
            with safe_open(file, framework="np") as f:
                for key in f.keys():
                    tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError on damaged files
            raise ModelLoadError(f"{file} is truncated or corrupt: {e}") from e
    return tensors


def params_from_hf(tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    L, D, F, N, K, H, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    layer_map = {  # HF name under model.layers.{i}. -> (pdx name, pdx shape per layer)
        "input_layernorm.weight": ("attn_norm", (D,)),
        "self_attn.q_proj.weight": ("wq", (N * H, D)),
        "self_attn.k_proj.weight": ("wk", (K * H, D)),
        "self_attn.v_proj.weight": ("wv", (K * H, D)),
        "self_attn.o_proj.weight": ("wo", (D, N * H)),
        "post_attention_layernorm.weight": ("mlp_norm", (D,)),
        "mlp.gate_proj.weight": ("w_gate", (F, D)),
        "mlp.up_proj.weight": ("w_up", (F, D)),
        "mlp.down_proj.weight": ("w_down", (D, F)),
    }
    if cfg.attention_bias:
        layer_map |= {"self_attn.q_proj.bias": ("bq", (N * H,)), "self_attn.k_proj.bias": ("bk", (K * H,)),
                      "self_attn.v_proj.bias": ("bv", (K * H,))}
    if cfg.attention_out_bias:
        layer_map["self_attn.o_proj.bias"] = ("bo", (D,))

    def take(name: str, shape: tuple) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"checkpoint is missing tensor {name!r}")
        w = tensors[name]
        if w.size != int(np.prod(shape)):
            raise ModelLoadError(f"tensor {name!r} has shape {w.shape}, but config.json implies {shape}")
        return w.reshape(shape)

    layers = {pdx: np.stack([take(f"model.layers.{i}.{hf}", shape) for i in range(L)])
              for hf, (pdx, shape) in layer_map.items()}
    params = {"embed": take("model.embed_tokens.weight", (V, D)), "layers": layers,
              "final_norm": take("model.norm.weight", (D,))}
    if not cfg.tie_embeddings:
        params["lm_head"] = take("lm_head.weight", (V, D))
    return params


def load_hf_dir(path: str | os.PathLike) -> tuple[Config, dict]:
    path = os.fspath(path)
    cfg = config_from_hf(read_json(os.path.join(path, "config.json")))
    return cfg, params_from_hf(read_safetensors(path), cfg)
