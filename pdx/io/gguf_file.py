"""Load Llama-family GGUF files (llama.cpp format) into a transformer `Config` and params."""

from __future__ import annotations

import os

import numpy as np

from pdx.errors import ModelLoadError, UnsupportedError
from pdx.models.transformer import Config

# GGUF architectures we read, and whether llama.cpp's converter permuted the Q/K rows for its
# interleaved RoPE (llama-type archs) or kept HF's half-split layout (NEOX-style archs).
_ARCHS = {"llama": True, "mistral": True, "qwen2": False}

_LAYER_TENSORS = {  # GGUF name in blk.N -> (pdx name, reshape of the [out, in] matrix)
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "attn_q.bias": "bq",
    "attn_k.bias": "bk",
    "attn_v.bias": "bv",
    "attn_output.bias": "bo",
    "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
}


def open_reader(path: str | os.PathLike):
    """A `gguf.GGUFReader`, with every failure turned into a `ModelLoadError`."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise ModelLoadError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from e


def field(reader, key: str, default=None, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise ModelLoadError(f"GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def read_config(reader) -> Config:
    arch = field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise UnsupportedError(f"GGUF architecture {arch!r} is not supported; pdx reads {sorted(_ARCHS)}")
    heads = int(field(reader, f"{arch}.attention.head_count"))
    hidden = int(field(reader, f"{arch}.embedding_length"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", hidden // heads, required=False))
    window = int(field(reader, f"{arch}.attention.sliding_window", 0, required=False) or 0)
    layers = int(field(reader, f"{arch}.block_count"))
    eos = field(reader, "tokenizer.ggml.eos_token_id", None, required=False)
    eot = field(reader, "tokenizer.ggml.eot_token_id", None, required=False)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field(reader, f"{arch}.vocab_size", None, required=False) or (len(tokens.data) if tokens else None)
    if vocab is None:
        raise ModelLoadError("GGUF metadata has neither a vocab_size nor tokenizer.ggml.tokens")
    return Config(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(field(reader, f"{arch}.feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(field(reader, f"{arch}.attention.head_count_kv", heads, required=False)),
        head_dim=head_dim,
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0, required=False)),
        rms_norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, required=False)),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        attention_bias=any(t.name == "blk.0.attn_q.bias" for t in reader.tensors),
        attention_out_bias=any(t.name == "blk.0.attn_output.bias" for t in reader.tensors),
        layer_windows=(window,) * layers if window else None,
        max_position_embeddings=int(field(reader, f"{arch}.context_length", 8192, required=False)),
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id", None, required=False),
        eos_token_ids=tuple(sorted({int(t) for t in (eos, eot) if t is not None})),
        pad_token_id=field(reader, "tokenizer.ggml.padding_token_id", None, required=False),
    )


def dequantize(tensor) -> np.ndarray:
    """fp32 array of a GGUF tensor in row-major `[rows, cols]` order."""
    import gguf

    qtype = tensor.tensor_type
    try:
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            out = np.asarray(tensor.data, dtype=np.float32)
        else:
            out = gguf.quants.dequantize(tensor.data, qtype).astype(np.float32, copy=False)
    except NotImplementedError as e:
        raise UnsupportedError(
            f"tensor {tensor.name!r} has type {qtype.name}, which the gguf package cannot dequantize; "
            "re-quantize the model to a supported type (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, K-quants, IQ)"
        ) from e
    expected = tuple(int(d) for d in reversed(tensor.shape))
    if out.size != int(np.prod(expected)):
        raise ModelLoadError(f"tensor {tensor.name!r}: {out.size} values for shape {expected}")
    return out.reshape(expected)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs back to HF's half split)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_params(reader, cfg: Config) -> dict:
    """Params pytree (numpy fp32) in pdx layout; checks every tensor's shape against `cfg`."""
    arch = field(reader, "general.architecture")
    L, D, F, N, K, H, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    want = {"attn_norm": (D,), "wq": (N * H, D), "wk": (K * H, D), "wv": (K * H, D), "wo": (D, N * H),
            "bq": (N * H,), "bk": (K * H,), "bv": (K * H,), "bo": (D,), "mlp_norm": (D,), "w_gate": (F, D),
            "w_up": (F, D), "w_down": (D, F)}
    final = {"token_embd.weight": ("embed", (V, D)), "output_norm.weight": ("final_norm", (D,)),
             "output.weight": ("lm_head", (V, D))}
    layer_vals: dict[str, list] = {}
    params: dict = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            name = _LAYER_TENSORS.get(rest)
            if name is None:
                raise UnsupportedError(f"unexpected tensor {t.name!r} for a {arch} model")
            shape = want[name]
        elif t.name in final:
            name, shape = final[t.name]
        elif t.name == "rope_freqs.weight":
            raise UnsupportedError("GGUF files with rope_freqs (Llama-3 rope scaling) are not supported yet")
        else:
            raise UnsupportedError(f"unexpected tensor {t.name!r} for a {arch} model")
        w = dequantize(t)
        if w.shape != shape:
            raise ModelLoadError(f"tensor {t.name!r} has shape {w.shape}, but the metadata implies {shape}")
        if t.name.startswith("blk."):
            if _ARCHS[arch] and name in ("wq", "bq"):
                w = unpermute_qk(w, N)
            elif _ARCHS[arch] and name in ("wk", "bk"):
                w = unpermute_qk(w, K)
            layer_vals.setdefault(name, [None] * L)[int(idx)] = w
        else:
            params[name] = w
    for required in ("embed", "final_norm"):
        if required not in params:
            raise ModelLoadError(f"GGUF file has no {required} tensor")
    missing = [f"blk.{i}.{n}" for n, vals in layer_vals.items() for i, v in enumerate(vals) if v is None]
    needed = {"attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down"}
    missing += sorted(needed - set(layer_vals))
    if missing:
        raise ModelLoadError(f"GGUF file is missing layer tensors: {missing[:5]}")
    params["layers"] = {n: np.stack(v) for n, v in layer_vals.items()}
    return params


def load_gguf(path: str | os.PathLike) -> tuple[Config, dict, object]:
    """(config, numpy params, reader) from a GGUF file; the reader also builds the tokenizer."""
    reader = open_reader(path)
    cfg = read_config(reader)
    return cfg, read_params(reader, cfg), reader
