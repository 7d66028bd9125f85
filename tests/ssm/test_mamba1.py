"""Mamba-1 mixer against transformers' `MambaMixer` (torch path) with identical weights, fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pdx.ssm import mamba1

ATOL = 2e-5  # outputs of magnitude ~0.1-1; observed max error ~1e-6


@pytest.fixture(scope="module")
def torch_mixer():
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=16, state_size=4, intermediate_size=32, conv_kernel=4, time_step_rank=3,
                      use_bias=True, use_conv_bias=True, num_hidden_layers=1)
    m = MambaMixer(cfg, 0).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("D", "conv1d.bias", "in_proj.bias", "out_proj.bias"):
                p.copy_(0.5 * torch.randn_like(p) + (1.0 if name == "D" else 0.0))
            elif name == "A_log":
                p.add_(0.3 * torch.randn_like(p))
    return m


def pdx_params(m) -> dict:
    t = {n: jnp.asarray(p.detach().numpy()) for n, p in m.named_parameters()}
    return {"in_proj": t["in_proj.weight"], "in_proj_bias": t["in_proj.bias"],
            "conv_weight": t["conv1d.weight"][:, 0], "conv_bias": t["conv1d.bias"], "x_proj": t["x_proj.weight"],
            "dt_proj": t["dt_proj.weight"], "dt_proj_bias": t["dt_proj.bias"], "A_log": t["A_log"], "D": t["D"],
            "out_proj": t["out_proj.weight"], "out_proj_bias": t["out_proj.bias"]}


mixer = jax.jit(mamba1.mixer, static_argnames=("step", "chunk"))


def test_full_sequence_matches_mamba_mixer(torch_mixer):
    h = np.random.default_rng(0).standard_normal((2, 13, 16)).astype(np.float32)
    with torch.no_grad():
        ref = torch_mixer(torch.tensor(h)).numpy()
    p = pdx_params(torch_mixer)
    for chunk in (5, 64):  # ragged last chunk / one chunk shorter than the chunk size
        out, y, _, _ = mixer(p, jnp.asarray(h), None, None, jnp.ones((2, 13), bool), step=False, chunk=chunk)
        np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=0)
        assert y.shape == (2, 13, 32)


def test_prefill_then_steps_matches_full_and_padding_is_inert(torch_mixer):
    """Prefill 9 (in two pieces, the second right-padded) + 4 O(1) steps == one pass over 13 tokens."""
    h = np.random.default_rng(1).standard_normal((2, 13, 16)).astype(np.float32)
    with torch.no_grad():
        ref = torch_mixer(torch.tensor(h)).numpy()
    p = pdx_params(torch_mixer)
    x = jnp.asarray(h)
    outs = []
    o, _, conv, ssm = mixer(p, x[:, :5], None, None, jnp.ones((2, 5), bool), step=False, chunk=3)
    outs.append(o)
    piece = jnp.concatenate([x[:, 5:9], jnp.full((2, 3, 16), 7.0)], axis=1)  # 4 real tokens + 3 padding
    valid = jnp.arange(7)[None] < 4
    o, _, conv, ssm = mixer(p, piece, conv, ssm, jnp.broadcast_to(valid, (2, 7)), step=False, chunk=3)
    outs.append(o[:, :4])
    for t in range(9, 13):
        o, y, conv, ssm = mixer(p, x[:, t : t + 1], conv, ssm, jnp.ones((2, 1), bool), step=True)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), ref, atol=ATOL, rtol=0)
    # a frozen row (valid False) keeps its states in the O(1) step
    _, _, conv2, ssm2 = mixer(p, x[:, :1], conv, ssm, jnp.zeros((2, 1), bool), step=True)
    np.testing.assert_array_equal(np.asarray(conv2), np.asarray(conv))
    np.testing.assert_array_equal(np.asarray(ssm2), np.asarray(ssm))


@pytest.mark.slow
def test_selective_scan_equals_sequential_steps():
    """The chunked associative scan is the step recurrence, from a nonzero initial state."""
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    b, t, di, n = 2, 11, 8, 4
    x = jax.random.normal(k[0], (b, t, di))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, t, di)))
    A = -jnp.exp(jax.random.normal(k[2], (di, n)))
    B, C = jax.random.normal(k[3], (b, t, n)), jax.random.normal(k[4], (b, t, n))
    D = jnp.ones((di,))
    h0 = jax.random.normal(k[5], (b, di, n))
    y, hT = jax.jit(mamba1.selective_scan, static_argnames="chunk")(x, dt, A, B, C, D, h0, chunk=4)
    step = jax.jit(mamba1.selective_step)
    h, ys = h0, []
    for i in range(t):
        yi, h = step(h, x[:, i], dt[:, i], A, B[:, i], C[:, i], D)
        ys.append(yi)
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.stack(ys, 1)), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hT), np.asarray(h), atol=1e-5, rtol=1e-5)
