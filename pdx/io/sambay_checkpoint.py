"""Load SambaY checkpoints in the Phi-4-mini-flash naming (`model_type: phi4flash`, HF safetensors).

Tensor names (layer i of kind mamba/memory, swa/full, gmu, cross; see `pdx.models.sambay`):
    model.embed_tokens.weight, model.final_layernorm.{weight,bias}, lm_head.weight (untied only)
    model.layers.{i}.input_layernorm.{weight,bias}, .post_attention_layernorm.{weight,bias}, .mlp.fc1/fc2.weight
    Mamba: .attn.in_proj.weight, .attn.conv1d.{weight [Di,1,K], bias}, .attn.x_proj.weight,
           .attn.dt_proj.{weight,bias}, .attn.A_log, .attn.D, .attn.out_proj.weight
    attention: .attn.Wqkv.{weight,bias} (q only in cross layers), .attn.out_proj.{weight,bias},
           .attn.inner_cross_attn.{lambda_q1,lambda_k1,lambda_q2,lambda_k2,subln.weight}
    GMU: .attn.in_proj.weight [Di, D], .attn.out_proj.weight [D, Di]
Every tensor is checked against the config; missing, extra or misshapen tensors raise ModelLoadError.
"""

from __future__ import annotations

import math
import os

import numpy as np

from pdx.errors import ModelLoadError, UnsupportedError
from pdx.io.hf_checkpoint import read_json, read_safetensors
from pdx.models.sambay import Config

MODEL_TYPES = ("phi4flash",)
ARCHITECTURES = ("Phi4FlashForCausalLM",)


def is_sambay_config(raw: dict) -> bool:
    return raw.get("model_type") in MODEL_TYPES or any(a in ARCHITECTURES for a in raw.get("architectures") or ())


def is_sambay_dir(path: str) -> bool:
    """Does `path/config.json` describe a SambaY (Phi-4-mini-flash) model (so `pdx.load_model` routes it here)?"""
    config = os.path.join(path, "config.json")
    return os.path.isfile(config) and is_sambay_config(read_json(config))


def _eos(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    return () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)


def config_from_hf(raw: dict) -> Config:
    """Config from `Phi4FlashConfig` keys (config.json)."""
    if int(raw.get("mb_per_layer", 2)) != 2:
        raise UnsupportedError(f"mb_per_layer {raw['mb_per_layer']} is not supported (only 2: Mamba on even layers)")
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedError(f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    window = raw.get("sliding_window")
    if isinstance(window, list):  # an expanded per-layer list: the self-decoder's attention layers carry it
        window = next((w for w in window if w is not None), None)
    if window is None:
        raise ModelLoadError("config.json has no sliding_window; SambaY's self-decoder attention needs one")
    try:
        hidden = int(raw["hidden_size"])
        dt_rank = raw.get("mamba_dt_rank", "auto")
        return Config(
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden, intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]), num_heads=int(raw["num_attention_heads"]),
            num_kv_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
            sliding_window=int(window), mamba_d_state=int(raw.get("mamba_d_state", 16)),
            mamba_d_conv=int(raw.get("mamba_d_conv", 4)), mamba_expand=int(raw.get("mamba_expand", 2)),
            mamba_dt_rank=math.ceil(hidden / 16) if dt_rank == "auto" else int(dt_rank),
            mamba_conv_bias=bool(raw.get("mamba_conv_bias", True)), mamba_proj_bias=bool(raw.get("mamba_proj_bias",
                                                                                                 False)),
            layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 262144)),
            bos_token_id=raw.get("bos_token_id"), eos_token_ids=_eos(raw), pad_token_id=raw.get("pad_token_id"),
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks required key {e}") from e


def _layer_map(cfg: Config, kind: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """HF name under `model.layers.{i}.` -> (pdx name, shape) for one layer of `kind`."""
    D, F, N, K, Hd, Di, Ns, R, Kc = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                                     cfg.head_dim, cfg.d_inner, cfg.mamba_d_state, cfg.dt_rank, cfg.mamba_d_conv)
    m = {"input_layernorm.weight": ("ln1_w", (D,)), "input_layernorm.bias": ("ln1_b", (D,)),
         "post_attention_layernorm.weight": ("ln2_w", (D,)), "post_attention_layernorm.bias": ("ln2_b", (D,)),
         "mlp.fc1.weight": ("fc1", (2 * F, D)), "mlp.fc2.weight": ("fc2", (D, F))}
    if kind in ("mamba", "memory"):
        m |= {"attn.in_proj.weight": ("in_proj", (2 * Di, D)), "attn.conv1d.weight": ("conv_weight", (Di, Kc)),
              "attn.x_proj.weight": ("x_proj", (R + 2 * Ns, Di)), "attn.dt_proj.weight": ("dt_proj", (Di, R)),
              "attn.dt_proj.bias": ("dt_proj_bias", (Di,)), "attn.A_log": ("A_log", (Di, Ns)), "attn.D": ("D", (Di,)),
              "attn.out_proj.weight": ("out_proj", (D, Di))}
        if cfg.mamba_conv_bias:
            m["attn.conv1d.bias"] = ("conv_bias", (Di,))
        if cfg.mamba_proj_bias:
            m |= {"attn.in_proj.bias": ("in_proj_bias", (2 * Di,)), "attn.out_proj.bias": ("out_proj_bias", (D,))}
    elif kind == "gmu":
        m |= {"attn.in_proj.weight": ("in_proj", (Di, D)), "attn.out_proj.weight": ("out_proj", (D, Di))}
    else:
        rows = N * Hd if kind == "cross" else (N + 2 * K) * Hd
        w, b = ("wq", "bq") if kind == "cross" else ("wqkv", "bqkv")
        m |= {"attn.Wqkv.weight": (w, (rows, D)), "attn.Wqkv.bias": (b, (rows,)),
              "attn.out_proj.weight": ("wo", (D, N * Hd)), "attn.out_proj.bias": ("bo", (D,)),
              "attn.inner_cross_attn.subln.weight": ("subln", (2 * Hd,))}
        m |= {f"attn.inner_cross_attn.{n}": (n, (Hd,)) for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
    return m


def params_from_tensors(tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    """pdx params (numpy, stacked groups) from Phi-4-mini-flash-named tensors; sizes checked, leftovers rejected."""
    used: set[str] = set()

    def take(name: str, shape: tuple) -> np.ndarray:
        if name not in tensors:
            raise ModelLoadError(f"checkpoint is missing tensor {name!r}")
        w = tensors[name]
        if w.size != int(np.prod(shape)):
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(w.shape)}, but config.json implies {shape} (check "
                                 "hidden_size, num_attention_heads / num_key_value_heads, intermediate_size and the "
                                 "mamba_* sizes)")
        used.add(name)
        return np.asarray(w, np.float32).reshape(shape)

    def layer(i: int, kind: str) -> dict:
        return {pdx: take(f"model.layers.{i}.{name}", shape) for name, (pdx, shape) in _layer_map(cfg, kind).items()}

    def stack(layers: list[dict]) -> dict | None:
        return {k: np.stack([p[k] for p in layers]) for k in layers[0]} if layers else None

    by_kind: dict[str, list[dict]] = {k: [] for k in ("mamba", "swa", "memory", "full", "gmu", "cross")}
    for i, kind in enumerate(cfg.layer_kinds()):
        by_kind[kind].append(layer(i, kind))
    V, D = cfg.vocab_size, cfg.hidden_size
    params = {
        "embed": take("model.embed_tokens.weight", (V, D)),
        "self": {"mamba": stack(by_kind["mamba"]), "swa": stack(by_kind["swa"])},
        "memory": by_kind["memory"][0],
        "full": by_kind["full"][0],
        "cross": {"gmu": stack(by_kind["gmu"]), "attn": stack(by_kind["cross"])},
        "final_norm": {"w": take("model.final_layernorm.weight", (D,)), "b": take("model.final_layernorm.bias", (D,))},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = take("lm_head.weight", (V, D))
    extra = sorted(set(tensors) - used - {"lm_head.weight"})
    if extra:
        raise ModelLoadError(f"checkpoint has {len(extra)} tensor(s) the config does not explain, e.g. {extra[:3]} "
                             f"(num_hidden_layers {cfg.num_layers}, mamba_proj_bias {cfg.mamba_proj_bias})")
    return params


def load(path: str | os.PathLike) -> tuple[Config, dict]:
    """(Config, numpy params) from a Phi-4-mini-flash-style directory (config.json + safetensors)."""
    path = os.fspath(path)
    raw = read_json(os.path.join(path, "config.json"))
    if not is_sambay_config(raw):
        raise UnsupportedError(f"{path}/config.json is not a SambaY / phi4flash config (model_type "
                               f"{raw.get('model_type')!r})")
    cfg = config_from_hf(raw)
    return cfg, params_from_tensors(read_safetensors(path), cfg)


def save(path: str | os.PathLike, cfg: Config, params: dict) -> None:
    """Write `params` in the Phi-4-mini-flash naming (config.json + model.safetensors): the loader's inverse."""
    import json

    import jax
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    layers = {"mamba": [], "swa": [], "gmu": [], "cross": []}
    unstack = lambda g: [] if g is None else [{k: np.asarray(v[j]) for k, v in g.items()}
                                              for j in range(len(next(iter(g.values()))))]
    p = jax.device_get(stack_groups(params))
    layers["mamba"], layers["swa"] = unstack(p["self"]["mamba"]), unstack(p["self"]["swa"])
    layers["gmu"], layers["cross"] = unstack(p["cross"]["gmu"]), unstack(p["cross"]["attn"])
    single = {"memory": p["memory"], "full": p["full"]}
    tensors = {"model.embed_tokens.weight": np.asarray(p["embed"]),
               "model.final_layernorm.weight": np.asarray(p["final_norm"]["w"]),
               "model.final_layernorm.bias": np.asarray(p["final_norm"]["b"])}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(p["lm_head"])
    counters = {k: 0 for k in layers}
    for i, kind in enumerate(cfg.layer_kinds()):
        if kind in single:
            lp = single[kind]
        else:
            lp = layers[kind][counters[kind]]
            counters[kind] += 1
        for name, (pdx, _) in _layer_map(cfg, kind).items():
            w = np.asarray(lp[pdx], np.float32)
            tensors[f"model.layers.{i}.{name}"] = w[:, None, :] if name == "attn.conv1d.weight" else w
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    raw = {"architectures": list(ARCHITECTURES), "model_type": "phi4flash", "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "sliding_window": cfg.sliding_window, "mb_per_layer": 2,
           "mamba_d_state": cfg.mamba_d_state, "mamba_d_conv": cfg.mamba_d_conv, "mamba_expand": cfg.mamba_expand,
           "mamba_dt_rank": cfg.dt_rank, "mamba_conv_bias": cfg.mamba_conv_bias,
           "mamba_proj_bias": cfg.mamba_proj_bias, "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": "silu",
           "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
           "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None,
           "pad_token_id": cfg.pad_token_id}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f, indent=1)


def stack_groups(params: dict) -> dict:
    """Params with stacked groups (the layout `save` reads), whichever layout they come in."""
    from pdx.models.sambay import stack_layers

    return stack_layers(params)
