"""Write tiny Llama GGUF files for loader tests, with any weight type (K-quants as random blocks)."""

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
# K-quant block layouts: byte offsets of their fp16 scale fields, which must be finite.
_KQUANT_F16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}

D, F, N, K, L, V = 256, 256, 4, 2, 2, 64  # rows of 256 so every K-quant block fits
H = D // N


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF half-split RoPE rows -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype) -> np.ndarray:
    if qtype == T.F32:
        return w.astype(np.float32)
    if qtype in _KQUANT_F16_FIELDS:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(w.size)
        raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        for off in _KQUANT_F16_FIELDS[qtype]:
            raw[..., off : off + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        return raw.reshape(w.shape[0], -1)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def write_tiny_llama(path, qtype=T.F32, seed=0, arch="llama", skip=(), extra_tensors=(), shape_override=None,
                     metadata=True):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    if metadata:
        w.add_block_count(L)
        w.add_context_length(256)
        w.add_embedding_length(D)
        w.add_feed_forward_length(F)
        w.add_head_count(N)
        w.add_head_count_kv(K)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([chr(ord("A") + i) if i < 26 else f"t{i}" for i in range(V)])
    w.add_token_types([1] * V)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name, arr, quantize=True):
        if name in skip:
            return
        if shape_override and name in shape_override:
            arr = arr[: shape_override[name]]
        data = encode(arr, qtype) if quantize else arr.astype(np.float32)
        raw_dtype = None if data.dtype == np.float32 else qtype
        w.add_tensor(name, data, raw_dtype=raw_dtype)

    add("token_embd.weight", rng.normal(0, 0.5, (V, D)))
    for i in range(L):
        add(f"blk.{i}.attn_norm.weight", 1 + 0.1 * rng.normal(size=D), quantize=False)
        add(f"blk.{i}.attn_q.weight", permute_qk(rng.normal(0, 0.05, (N * H, D)), N))
        add(f"blk.{i}.attn_k.weight", permute_qk(rng.normal(0, 0.05, (K * H, D)), K))
        add(f"blk.{i}.attn_v.weight", rng.normal(0, 0.05, (K * H, D)))
        add(f"blk.{i}.attn_output.weight", rng.normal(0, 0.05, (D, N * H)))
        add(f"blk.{i}.ffn_norm.weight", 1 + 0.1 * rng.normal(size=D), quantize=False)
        add(f"blk.{i}.ffn_gate.weight", rng.normal(0, 0.05, (F, D)))
        add(f"blk.{i}.ffn_up.weight", rng.normal(0, 0.05, (F, D)))
        add(f"blk.{i}.ffn_down.weight", rng.normal(0, 0.05, (D, F)))
    add("output_norm.weight", 1 + 0.1 * rng.normal(size=D), quantize=False)
    for name, arr, raw_dtype in extra_tensors:
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
