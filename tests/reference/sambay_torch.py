"""A short PyTorch transcription of SambaY (Phi-4-mini-flash), written from the paper's equations.

Decoder-Hybrid-Decoder (Ren et al. 2025, arXiv:2507.06607) and Differential Transformer (Ye et al.
2024, arXiv:2410.05258). It reads a state dict in the Phi-4-mini-flash tensor naming and runs a
whole sequence with no cache, every layer on every position, plain loops and explicit masks. It
shares no code with pdx, so agreeing logits check the layout, the loader's name mapping and the
cached / last-token paths of `pdx.models.sambay` at once.

    Mamba (S6):  (x, z) = in_proj(h); x = silu(conv(x)); (dt, B, C) = x_proj(x); dt = softplus(dt_proj(dt))
                 s_t = exp(dt_t A) s_{t-1} + dt_t B_t x_t;  y_t = C_t s_t + D x_t;  out = out_proj(y * silu(z))
    DiffAttn:    A_c = softmax(Q_c K_c^T / sqrt(d)) for head halves c = 1, 2 (heads 2i and 2i+1)
                 lam = exp(lq1 . lk1) - exp(lq2 . lk2) + lam_init,  lam_init = 0.8 - 0.6 exp(-0.3 depth)
                 out = (1 - lam_init) RMSNorm((A_1 - lam A_2) [V_even, V_odd])
    GMU:         out_proj(silu(in_proj(h)) * m), m = the memory layer's y
    layer:       x += mixer(LN(x)); x += fc2(y * silu(g)), (g, y) = fc1(LN(x))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer_kinds(num_layers: int) -> list[str]:
    h = num_layers // 2
    kinds = ["mamba" if i % 2 == 0 else "swa" for i in range(h)] + ["memory", "full"]
    return kinds + ["gmu" if i % 2 == 0 else "cross" for i in range(h + 2, num_layers)]


def mamba_ref(p: dict, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S6 mixer on h [B, T, D] by the sequential recurrence; returns (out [B, T, D], y [B, T, Di] pre-gate)."""
    b, t, _ = h.shape
    xz = h @ p["in_proj.weight"].T + (p["in_proj.bias"] if "in_proj.bias" in p else 0)
    x, z = xz.chunk(2, dim=-1)  # [B, T, Di]
    w = p["conv1d.weight"]  # [Di, 1, K]
    k = w.shape[-1]
    xc = F.conv1d(x.transpose(1, 2), w, p.get("conv1d.bias"), padding=k - 1, groups=w.shape[0])[..., :t]
    x = F.silu(xc).transpose(1, 2)  # [B, T, Di]
    A = -torch.exp(p["A_log"])  # [Di, N]
    n = A.shape[1]
    r = p["dt_proj.weight"].shape[1]
    dt_low, B, C = torch.split(x @ p["x_proj.weight"].T, [r, n, n], dim=-1)
    dt = F.softplus(dt_low @ p["dt_proj.weight"].T + p["dt_proj.bias"])  # [B, T, Di]
    s = torch.zeros(b, x.shape[-1], n)
    ys = []
    for i in range(t):
        s = torch.exp(dt[:, i, :, None] * A) * s + (dt[:, i] * x[:, i])[:, :, None] * B[:, i, None, :]
        ys.append((s * C[:, i, None, :]).sum(-1) + p["D"] * x[:, i])
    y = torch.stack(ys, dim=1)
    out = (y * F.silu(z)) @ p["out_proj.weight"].T + (p["out_proj.bias"] if "out_proj.bias" in p else 0)
    return out, y


def _softmax_attn(q, k, v, mask):
    """q [B, T, n, d], k/v [B, S, n, d], mask [T, S] (True = visible) -> [B, T, n, d]."""
    s = torch.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bnts,bsnd->btnd", torch.softmax(s, dim=-1), v)


def diff_attn_ref(q, k, v, mask, p: dict, depth: int, eps: float = 1e-5) -> torch.Tensor:
    """Differential attention: q [B, T, N, d], k/v [B, S, K, d], mask [T, S] -> [B, T, N, d]."""
    b, t, n, d = q.shape
    rep = n // k.shape[2]
    q1, q2 = q[:, :, 0::2], q[:, :, 1::2]
    k1, k2 = (k[:, :, c::2].repeat_interleave(rep, dim=2) for c in (0, 1))
    v1, v2 = (v[:, :, c::2].repeat_interleave(rep, dim=2) for c in (0, 1))
    a1 = torch.cat([_softmax_attn(q1, k1, v1, mask), _softmax_attn(q1, k1, v2, mask)], dim=-1)  # [B, T, N/2, 2d]
    a2 = torch.cat([_softmax_attn(q2, k2, v1, mask), _softmax_attn(q2, k2, v2, mask)], dim=-1)
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * depth)
    lam = (torch.exp((p["inner_cross_attn.lambda_q1"] * p["inner_cross_attn.lambda_k1"]).sum())
           - torch.exp((p["inner_cross_attn.lambda_q2"] * p["inner_cross_attn.lambda_k2"]).sum()) + lam_init)
    a = a1 - lam * a2
    a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + eps) * p["inner_cross_attn.subln.weight"]
    a = a * (1 - lam_init)
    return a.reshape(b, t, n // 2, 2, d).reshape(b, t, n, d)


def gmu_ref(p: dict, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (F.silu(h @ p["in_proj.weight"].T) * m) @ p["out_proj.weight"].T


class SambaYRef:
    """Whole-sequence SambaY from a Phi-4-mini-flash-named state dict and its config.json dict."""

    def __init__(self, state: dict[str, torch.Tensor], config: dict):
        self.sd = {k: v.float() for k, v in state.items()}
        self.c = config

    def _sub(self, prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in self.sd.items() if k.startswith(prefix)}

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.c
        L, D, N, K = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        d, eps, W = D // N, c["layer_norm_eps"], c["sliding_window"]
        b, t = ids.shape
        x = self.sd["model.embed_tokens.weight"][ids]
        i_pos = torch.arange(t)
        causal = i_pos[None, :] <= i_pos[:, None]  # [T, S]
        window = causal & (i_pos[:, None] - i_pos[None, :] < W)
        memory = shared_kv = None
        ln = lambda h, p, name: F.layer_norm(h, (D,), p[f"{name}.weight"], p[f"{name}.bias"], eps)
        for i, kind in enumerate(layer_kinds(L)):
            p = self._sub(f"model.layers.{i}.")
            h = ln(x, p, "input_layernorm")
            a = {k[len("attn."):]: v for k, v in p.items() if k.startswith("attn.")}
            if kind in ("mamba", "memory"):
                out, y = mamba_ref(a, h)
                if kind == "memory":
                    memory = y
            elif kind == "gmu":
                out = gmu_ref(a, h, memory)
            else:
                proj = h @ a["Wqkv.weight"].T + a["Wqkv.bias"]
                if kind == "cross":
                    q = proj
                    k, v = shared_kv
                else:
                    q, k, v = torch.split(proj, [N * d, K * d, K * d], dim=-1)
                    k, v = k.reshape(b, t, K, d), v.reshape(b, t, K, d)
                    if kind == "full":
                        shared_kv = (k, v)
                o = diff_attn_ref(q.reshape(b, t, N, d), k, v, window if kind == "swa" else causal, a, i)
                out = o.reshape(b, t, N * d) @ a["out_proj.weight"].T + a["out_proj.bias"]
            x = x + out
            g, y = (ln(x, p, "post_attention_layernorm") @ p["mlp.fc1.weight"].T).chunk(2, dim=-1)
            x = x + (y * F.silu(g)) @ p["mlp.fc2.weight"].T
        x = F.layer_norm(x, (D,), self.sd["model.final_layernorm.weight"], self.sd["model.final_layernorm.bias"], eps)
        head = self.sd["model.embed_tokens.weight"] if c.get("tie_word_embeddings", True) else self.sd["lm_head.weight"]
        return x @ head.T


def random_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the Phi-4-mini-flash naming with non-trivial norms, biases, lambdas, A and D."""
    g = torch.Generator().manual_seed(seed)
    c = config
    L, D, N, K, F_ = (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
                      c["intermediate_size"])
    d, Di, Ns, Kc = D // N, c["mamba_expand"] * D, c["mamba_d_state"], c["mamba_d_conv"]
    R = c["mamba_dt_rank"]
    rnd = lambda *shape, s=0.1: s * torch.randn(*shape, generator=g)
    sd = {"model.embed_tokens.weight": rnd(c["vocab_size"], D, s=0.5),
          "model.final_layernorm.weight": 1 + rnd(D), "model.final_layernorm.bias": rnd(D)}
    if not c.get("tie_word_embeddings", True):
        sd["lm_head.weight"] = rnd(c["vocab_size"], D, s=0.3)
    for i, kind in enumerate(layer_kinds(L)):
        pre = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            sd[pre + name + ".weight"], sd[pre + name + ".bias"] = 1 + rnd(D), rnd(D)
        sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc2.weight"] = rnd(2 * F_, D, s=0.2), rnd(D, F_, s=0.2)
        if kind in ("mamba", "memory"):
            sd |= {pre + "attn.in_proj.weight": rnd(2 * Di, D, s=0.3),
                   pre + "attn.conv1d.weight": rnd(Di, 1, Kc, s=0.5),
                   pre + "attn.conv1d.bias": rnd(Di), pre + "attn.x_proj.weight": rnd(R + 2 * Ns, Di, s=0.1),
                   pre + "attn.dt_proj.weight": rnd(Di, R, s=0.3), pre + "attn.dt_proj.bias": rnd(Di, s=0.5) - 2,
                   pre + "attn.A_log": torch.log(torch.arange(1, Ns + 1).float()).expand(Di, Ns) + rnd(Di, Ns),
                   pre + "attn.D": 1 + rnd(Di), pre + "attn.out_proj.weight": rnd(D, Di, s=0.3)}
        elif kind == "gmu":
            sd |= {pre + "attn.in_proj.weight": rnd(Di, D, s=0.3), pre + "attn.out_proj.weight": rnd(D, Di, s=0.3)}
        else:
            rows = N * d if kind == "cross" else (N + 2 * K) * d
            sd |= {pre + "attn.Wqkv.weight": rnd(rows, D, s=0.3), pre + "attn.Wqkv.bias": rnd(rows),
                   pre + "attn.out_proj.weight": rnd(D, N * d, s=0.3), pre + "attn.out_proj.bias": rnd(D),
                   pre + "attn.inner_cross_attn.subln.weight": 1 + rnd(2 * d)}
            for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                sd[pre + f"attn.inner_cross_attn.{n}"] = rnd(d)
    return sd
