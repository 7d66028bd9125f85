"""Load Mamba-2 checkpoint directories: transformers' (`model_type: mamba2`) and the original `state-spaces/mamba2-*`.

Both name tensors `backbone.layers.{i}.mixer.*` (HF calls the embedding `embeddings`, the
original `embedding`). They differ in `config.json`: HF writes `hidden_size`, `num_heads`,
`state_size`, ...; mamba_ssm writes `d_model`, `n_layer` and an `ssm_cfg` dict holding only the
Mamba2 mixer arguments that differ from its defaults. The original repos ship
`pytorch_model.bin`, read with torch when it is installed.
"""

from __future__ import annotations

import os

import numpy as np

from pdx.errors import ConfigError, ModelLoadError, UnsupportedError
from pdx.io.hf_checkpoint import read_json, read_safetensors
from pdx.models.mamba2 import Config

# mamba_ssm's Mamba2 mixer defaults, for keys a state-spaces `ssm_cfg` leaves out.
_SSM_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, bias=False,
                     conv_bias=True, dt_limit=(0.0, float("inf")), rmsnorm=True, norm_before_gate=False,
                     D_has_hdim=False)


def is_mamba2_config(raw: dict) -> bool:
    """True for an HF Mamba-2 config or a mamba_ssm one (`d_model` + `n_layer`; Mamba-1 ones are rejected on load)."""
    return raw.get("model_type") == "mamba2" or ("d_model" in raw and "n_layer" in raw)


def is_mamba2_dir(path: str) -> bool:
    """Does `path/config.json` describe a Mamba-2 model (so `pdx.load_model` routes it here)?"""
    config = os.path.join(path, "config.json")
    return os.path.isfile(config) and is_mamba2_config(read_json(config))


def _float(value) -> float:
    """A JSON number; transformers 5 writes non-finite floats as `{"__float__": "Infinity"}`."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def _eos(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    return () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)


def config_from_hf(raw: dict) -> Config:
    """Config from transformers' `Mamba2Config` keys."""
    try:
        hidden, heads, head_dim = int(raw["hidden_size"]), int(raw["num_heads"]), int(raw["head_dim"])
        expand = raw.get("expand", 2)
        if hidden * expand != heads * head_dim:
            raise ConfigError(f"config.json: hidden_size * expand ({hidden} * {expand}) must equal num_heads * "
                              f"head_dim ({heads} * {head_dim})")
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedError(f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        return Config(
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden, num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads, head_dim=head_dim, state_size=int(raw.get("state_size", 128)),
            n_groups=int(raw.get("n_groups", 8)), conv_kernel=int(raw.get("conv_kernel", 4)),
            chunk_size=int(raw.get("chunk_size", 256)), use_bias=bool(raw.get("use_bias", False)),
            use_conv_bias=bool(raw.get("use_conv_bias", True)),
            rms_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
            dt_limit=tuple(_float(v) for v in raw.get("time_step_limit", (0.0, float("inf")))),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"), eos_token_ids=_eos(raw), pad_token_id=raw.get("pad_token_id"),
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks required key {e}") from e


def config_from_state_spaces(raw: dict) -> Config:
    """Config from mamba_ssm's `MambaConfig` keys (d_model, n_layer, ssm_cfg, ...)."""
    ssm = dict(raw.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")  # mamba_ssm's own default
    if layer != "Mamba2":
        raise UnsupportedError(f"ssm_cfg layer {layer!r} is not Mamba-2; only Mamba2 mixers are supported")
    if raw.get("attn_layer_idx") or raw.get("d_intermediate", 0) or not raw.get("rms_norm", True):
        raise UnsupportedError("hybrid checkpoints (attn_layer_idx, d_intermediate > 0) and LayerNorm "
                               "(rms_norm=false) are not supported")
    unknown = set(ssm) - set(_SSM_DEFAULTS) - {"d_ssm"}
    if unknown:
        raise UnsupportedError(f"ssm_cfg has options pdx does not implement: {sorted(unknown)}")
    ssm = _SSM_DEFAULTS | ssm
    if ssm["norm_before_gate"] or ssm["D_has_hdim"] or not ssm["rmsnorm"]:
        raise UnsupportedError("ssm_cfg norm_before_gate / D_has_hdim / rmsnorm=false are not supported")
    try:
        d_model = int(raw["d_model"])
        inner = int(ssm["expand"]) * d_model
        if ssm.get("d_ssm") not in (None, inner):
            raise UnsupportedError("ssm_cfg d_ssm != expand * d_model (a gated MLP inside in_proj) is not supported")
        if inner % int(ssm["headdim"]):
            raise ConfigError(f"config.json: expand * d_model ({inner}) is not a multiple of headdim {ssm['headdim']}")
        multiple = int(raw.get("pad_vocab_size_multiple", 1))
        vocab = -(-int(raw["vocab_size"]) // multiple) * multiple  # mamba_ssm pads the embedding
        return Config(
            vocab_size=vocab, hidden_size=d_model, num_layers=int(raw["n_layer"]),
            num_heads=inner // int(ssm["headdim"]), head_dim=int(ssm["headdim"]), state_size=int(ssm["d_state"]),
            n_groups=int(ssm["ngroups"]), conv_kernel=int(ssm["d_conv"]), chunk_size=int(ssm["chunk_size"]),
            use_bias=bool(ssm["bias"]), use_conv_bias=bool(ssm["conv_bias"]),
            dt_limit=tuple(_float(v) for v in ssm["dt_limit"]), tie_embeddings=bool(raw.get("tie_embeddings", True)),
            eos_token_ids=(0,),  # the GPT-NeoX tokenizer these models use
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks required key {e}") from e


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    """safetensors (HF) or `pytorch_model.bin` (state-spaces), as fp32 numpy."""
    bin_file = os.path.join(path, "pytorch_model.bin")
    has_safetensors = any(f.endswith(".safetensors") for f in os.listdir(path))
    if has_safetensors or not os.path.isfile(bin_file):
        return read_safetensors(path)
    try:
        import torch
    except ImportError as e:
        raise ModelLoadError(f"{bin_file} needs torch to read; install torch or convert it to safetensors") from e
    try:
        state = torch.load(bin_file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{bin_file} is truncated or corrupt: {e}") from e
    return {k: v.float().numpy() for k, v in state.items()}


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    """pdx params from `backbone.*` tensors; every tensor's size is checked against the config."""
    L, D, H, Di, Cv, K, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.conv_dim,
                             cfg.conv_kernel, cfg.vocab_size)
    layer_map = {  # name under backbone.layers.{i}. -> (pdx name, pdx shape per layer)
        "norm.weight": ("norm", (D,)),
        "mixer.in_proj.weight": ("in_proj", (Di + Cv + H, D)),
        "mixer.conv1d.weight": ("conv_weight", (Cv, K)),
        "mixer.dt_bias": ("dt_bias", (H,)),
        "mixer.A_log": ("A_log", (H,)),
        "mixer.D": ("D", (H,)),
        "mixer.norm.weight": ("gate_norm", (Di,)),
        "mixer.out_proj.weight": ("out_proj", (D, Di)),
    }
    if cfg.use_conv_bias:
        layer_map["mixer.conv1d.bias"] = ("conv_bias", (Cv,))
    if cfg.use_bias:
        layer_map |= {"mixer.in_proj.bias": ("in_proj_bias", (Di + Cv + H,)), "mixer.out_proj.bias": ("out_proj_bias",
                                                                                                      (D,))}
    if f"backbone.layers.{L}.norm.weight" in tensors:
        raise ModelLoadError(f"checkpoint has more than the {L} layers config.json declares")

    def take(name: str, shape: tuple) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"checkpoint is missing tensor {name!r}")
        w = tensors[name]
        if w.size != int(np.prod(shape)):
            raise ModelLoadError(f"tensor {name!r} has shape {w.shape}, but config.json implies {shape} (check "
                                 "state_size, n_groups, num_heads/head_dim, conv_kernel and vocab_size)")
        return w.reshape(shape)

    embed_name = next((n for n in ("backbone.embeddings.weight", "backbone.embedding.weight") if n in tensors),
                      "backbone.embeddings.weight")
    params = {
        "embed": take(embed_name, (V, D)),
        "layers": {pdx: np.stack([take(f"backbone.layers.{i}.{name}", shape) for i in range(L)])
                   for name, (pdx, shape) in layer_map.items()},
        "final_norm": take("backbone.norm_f.weight", (D,)),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = take("lm_head.weight", (V, D))
    return params


def load(path: str | os.PathLike) -> tuple[Config, dict]:
    """(Config, numpy params) from a Mamba-2 directory in either naming."""
    path = os.fspath(path)
    raw = read_json(os.path.join(path, "config.json"))
    if not is_mamba2_config(raw):
        raise UnsupportedError(f"{path}/config.json is not a Mamba-2 config (model_type {raw.get('model_type')!r})")
    cfg = config_from_hf(raw) if raw.get("model_type") == "mamba2" else config_from_state_spaces(raw)
    return cfg, params_from_tensors(_read_tensors(path), cfg)
