"""Mamba-1 selective scan and mixer: chunked parallel prefill, exact O(1) decode step.

The recurrence per channel d and state index n (A is diagonal, `[Di, N]`):

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t            # [B, Di, N]
    y_t = C_t . h_t + D x_t                             # [B, Di]  (pre-gate output)
    out_t = out_proj(y_t * silu(z_t))

Prefill runs `lax.scan` over chunks of `chunk` steps and a `lax.associative_scan` inside each
chunk (log-depth; only `[B, chunk, Di, N]` is ever materialised, never `[B, T, Di, N]`). Decode
runs `selective_step`, whose cost does not depend on the context length. A step with dt = 0 is the
identity on the state (exp(0) = 1, no input), which is how padding leaves states untouched.

`mixer` is a whole Mamba-1 block (transformers' `MambaMixer`, mamba_ssm's `Mamba`) on a param dict
(weights `[out, in]`): in_proj [2 Di, D] (+ in_proj_bias), conv_weight [Di, K], conv_bias [Di],
x_proj [R + 2N, Di], dt_proj [Di, R], dt_proj_bias [Di], A_log [Di, N], D [Di], out_proj [D, Di]
(+ out_proj_bias). It also returns the pre-gate `y`, the memory SambaY's Gated Memory Units read.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pdx.ssm.conv import causal_conv1d, causal_conv1d_step, window_after


class MixerTrace(NamedTuple):
    """Per-position inputs of one multi-token `mixer` call, enough to rebuild its states after any prefix."""

    conv_in: jax.Array  # [B, T, Di] conv inputs
    x: jax.Array  # [B, T, Di] SSM inputs (after conv + silu)
    dt: jax.Array  # [B, T, Di] discretized steps (0 at padding)
    B: jax.Array  # [B, T, N]


def _combine(left, right):
    """Compose two affine state maps h -> a h + b (left first, then right)."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    state: jax.Array | None = None,
    chunk: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Run the recurrence over `T` steps; returns `(y [B, T, Di], final state [B, Di, N])`, fp32 inside.

    x: [B, T, Di] (after conv + silu); dt: [B, T, Di] discretized steps (softplus already applied,
    0 at padding); A: [Di, N] (negative); B, C: [B, T, N]; D: [Di]; state: [B, Di, N] or None (zeros).
    `y` includes the `D x` skip and is not gated.
    """
    b, t, di = x.shape
    n = A.shape[-1]
    out_dtype = x.dtype
    if state is None:
        state = jnp.zeros((b, di, n), jnp.float32)
    q = max(1, min(chunk, t))
    pad = -t % q
    xf, dtf, Bf, Cf = (jnp.pad(a.astype(jnp.float32), ((0, 0), (0, pad), (0, 0))) for a in (x, dt, B, C))
    nc = (t + pad) // q
    # [nc, B, Q, ...]: scan over chunks
    xs = tuple(a.reshape(b, nc, q, a.shape[-1]).swapaxes(0, 1) for a in (xf, dtf, Bf, Cf))
    Af = A.astype(jnp.float32)

    def step(h, inputs):
        xc, dtc, Bc, Cc = inputs  # [B, Q, Di], [B, Q, Di], [B, Q, N], [B, Q, N]
        dA = jnp.exp(dtc[..., None] * Af)  # [B, Q, Di, N]
        dBx = (dtc * xc)[..., None] * Bc[:, :, None, :]  # [B, Q, Di, N]
        a_cum, b_cum = lax.associative_scan(_combine, (dA, dBx), axis=1)
        hs = a_cum * h[:, None] + b_cum  # [B, Q, Di, N]: state after each step
        y = jnp.einsum("bqdn,bqn->bqd", hs, Cc)  # [B, Q, Di]
        return hs[:, -1], y

    state, ys = lax.scan(step, state.astype(jnp.float32), xs)
    y = ys.swapaxes(0, 1).reshape(b, nc * q, di)[:, :t]  # [B, T, Di]
    y = y + D.astype(jnp.float32) * x.astype(jnp.float32)
    return y.astype(out_dtype), state


def selective_step(
    state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One step: state [B, Di, N], x/dt [B, Di], B/C [B, N] -> (y [B, Di], state [B, Di, N]); O(1) in the context."""
    xf, dtf = x.astype(jnp.float32), dt.astype(jnp.float32)
    dA = jnp.exp(dtf[..., None] * A.astype(jnp.float32))  # [B, Di, N]
    state = state.astype(jnp.float32) * dA + (dtf * xf)[..., None] * B.astype(jnp.float32)[:, None, :]
    y = jnp.einsum("bdn,bn->bd", state, C.astype(jnp.float32)) + D.astype(jnp.float32) * xf
    return y.astype(x.dtype), state


def mixer(
    p: dict,
    h: jax.Array,
    conv_state: jax.Array | None,
    ssm_state: jax.Array | None,
    valid: jax.Array,
    step: bool,
    chunk: int = 64,
    trace: bool = False,
):
    """A Mamba-1 block on `h [B, T, D]`; returns `(out [B, T, D], y [B, T, Di], conv_state, ssm_state)`,
    and a `MixerTrace` last when `trace` (for `rewind`).

    `y` is the pre-gate SSM output (`C h + D x`); `out = out_proj(y * silu(z))`. conv_state:
    [B, K-1, Di] last conv inputs (None: zeros); ssm_state: [B, Di, N] fp32 (None: zeros).
    `valid [B, T]` is a per-row prefix of real tokens: padding gets dt = 0 and stays out of the conv
    window, so states are as if it had never been fed. `step` (static) takes the O(1) path (T == 1).
    """
    b, t, _ = h.shape
    di, n = p["A_log"].shape
    r = p["dt_proj"].shape[1]
    xz = jnp.einsum("btd,ed->bte", h, p["in_proj"].astype(h.dtype))  # [B, T, 2 Di]
    if "in_proj_bias" in p:
        xz = xz + p["in_proj_bias"].astype(xz.dtype)
    x, z = jnp.split(xz, 2, axis=-1)  # [B, T, Di] each
    if conv_state is None:
        conv_state = jnp.zeros((b, p["conv_weight"].shape[-1] - 1, di), h.dtype)
    if ssm_state is None:
        ssm_state = jnp.zeros((b, di, n), jnp.float32)
    with jax.named_scope("conv"):
        if step:
            xc, new_conv = causal_conv1d_step(x[:, 0], p["conv_weight"], p.get("conv_bias"), conv_state)
            new_conv = jnp.where(valid[:, :, None], new_conv, conv_state)
            xc = xc[:, None]
        else:
            xc, new_conv = causal_conv1d(x, p["conv_weight"], p.get("conv_bias"), conv_state, valid)
        xc = jax.nn.silu(xc)  # [B, T, Di]
    x_dbl = jnp.einsum("btd,ed->bte", xc, p["x_proj"].astype(xc.dtype))  # [B, T, R + 2N]
    dt_low, Bm, Cm = jnp.split(x_dbl, [r, r + n], axis=-1)
    dt = jnp.einsum("btr,dr->btd", dt_low, p["dt_proj"].astype(dt_low.dtype))  # [B, T, Di]
    dt = jax.nn.softplus(dt.astype(jnp.float32) + p["dt_proj_bias"].astype(jnp.float32))
    dt = jnp.where(valid[..., None], dt, 0.0)
    A = -jnp.exp(p["A_log"].astype(jnp.float32))  # [Di, N]
    with jax.named_scope("selective_scan"):
        if step:
            y, new_ssm = selective_step(ssm_state, xc[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], p["D"])
            y = y[:, None]
        else:
            y, new_ssm = selective_scan(xc, dt, A, Bm, Cm, p["D"], ssm_state, chunk)
    with jax.named_scope("gate_out"):
        out = jnp.einsum("bti,di->btd", y * jax.nn.silu(z), p["out_proj"].astype(y.dtype))
        if "out_proj_bias" in p:
            out = out + p["out_proj_bias"].astype(out.dtype)
    if trace:
        return out, y, new_conv, new_ssm, MixerTrace(x, xc, dt, Bm)
    return out, y, new_conv, new_ssm


def rewind(A_log: jax.Array, conv_state: jax.Array, ssm_state: jax.Array, tr: MixerTrace, n: jax.Array):
    """States after only the first `n [B]` of the T tokens a traced `mixer` call consumed from `conv_state
    [B, K-1, Di]`, `ssm_state [B, Di, N]`: the conv window re-cut, the SSM state rebuilt with dt = 0 past n.
    O(T) state updates and no weight reads (speculative rollback)."""
    t = tr.dt.shape[1]
    keep = jnp.arange(t)[None, :, None] < n[:, None, None]  # [B, T, 1]
    padded = jnp.concatenate([conv_state, tr.conv_in.astype(conv_state.dtype)], axis=1)  # [B, K-1+T, Di]
    A = -jnp.exp(A_log.astype(jnp.float32))
    zero_skip = jnp.zeros(A.shape[:1], jnp.float32)
    _, ssm = selective_scan(tr.x, jnp.where(keep, tr.dt, 0.0), A, tr.B, tr.B, zero_skip, ssm_state, t)  # y unused
    return window_after(padded, n, conv_state.shape[1]), ssm


def init_mixer_params(key: jax.Array, d_model: int, d_inner: int, d_state: int, dt_rank: int, conv_kernel: int,
                      dtype=jnp.float32, scale: float = 0.02, bias: bool = False) -> dict:
    """Random mixer params as mamba_ssm initialises them: A = 1..N (S4D-real), D = 1, dt in [1e-3, 0.1]."""
    ks = jax.random.split(key, 6)
    dt = jnp.exp(jax.random.uniform(ks[4], (d_inner,), minval=jnp.log(1e-3), maxval=jnp.log(0.1)))
    p = {
        "in_proj": scale * jax.random.normal(ks[0], (2 * d_inner, d_model)),
        "conv_weight": jax.random.normal(ks[1], (d_inner, conv_kernel)) / jnp.sqrt(conv_kernel),
        "conv_bias": jnp.zeros((d_inner,)),
        "x_proj": scale * jax.random.normal(ks[2], (dt_rank + 2 * d_state, d_inner)),
        "dt_proj": jax.random.uniform(ks[3], (d_inner, dt_rank), minval=-1.0, maxval=1.0) / jnp.sqrt(dt_rank),
        "dt_proj_bias": dt + jnp.log(-jnp.expm1(-dt)),  # inverse softplus
        "A_log": jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state))),
        "D": jnp.ones((d_inner,)),
        "out_proj": scale * jax.random.normal(ks[5], (d_model, d_inner)),
    }
    if bias:
        p["in_proj_bias"] = jnp.zeros((2 * d_inner,))
        p["out_proj_bias"] = jnp.zeros((d_model,))
    return {k: v.astype(dtype) for k, v in p.items()}
