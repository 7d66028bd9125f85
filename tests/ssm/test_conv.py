"""Causal depthwise conv1d: against torch's conv1d, pieces == one pass, padding leaves the state alone."""

import jax.numpy as jnp
import numpy as np
import torch

from pdx.ssm.conv import causal_conv1d, causal_conv1d_step

ATOL = 1e-6


def setup(seed=0, b=2, t=9, c=5, k=4):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((b, t, c), (c, k), (c,)))


def test_matches_torch_causal_conv1d():
    x, w, bias = setup()
    c, k = w.shape
    ref = torch.nn.functional.conv1d(torch.tensor(np.asarray(x)).transpose(1, 2), torch.tensor(np.asarray(w))[:, None],
                                     torch.tensor(np.asarray(bias)), padding=k - 1, groups=c)[..., : x.shape[1]]
    y, state = causal_conv1d(x, w, bias)
    np.testing.assert_allclose(np.asarray(y), ref.transpose(1, 2).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(state), np.asarray(x[:, -(k - 1):]), atol=0)


def test_pieces_and_steps_equal_one_pass():
    x, w, bias = setup(1)
    full, full_state = causal_conv1d(x, w, bias)
    y1, state = causal_conv1d(x[:, :2], w, bias)  # shorter than the kernel: the state keeps zeros
    y2, state = causal_conv1d(x[:, 2:6], w, bias, state)
    ys = [y1, y2]
    for i in range(6, x.shape[1]):
        y, state = causal_conv1d_step(x[:, i], w, bias, state)
        ys.append(y[:, None])
    np.testing.assert_allclose(np.asarray(jnp.concatenate(ys, 1)), np.asarray(full), atol=ATOL)
    np.testing.assert_allclose(np.asarray(state), np.asarray(full_state), atol=0)


def test_right_padding_keeps_the_last_real_inputs():
    x, w, bias = setup(2, b=3, t=6)
    _, state0 = causal_conv1d(x[:, :3], w, bias)
    lengths = [3, 1, 0]
    valid = jnp.arange(3)[None] < jnp.array(lengths)[:, None]
    _, state = causal_conv1d(x[:, 3:], w, bias, state0, valid)
    for row, n in enumerate(lengths):
        _, alone = causal_conv1d(x[row : row + 1, 3 : 3 + n], w, bias, state0[row : row + 1])
        np.testing.assert_allclose(np.asarray(state[row]), np.asarray(alone[0]), atol=0)
    np.testing.assert_allclose(np.asarray(state[2]), np.asarray(state0[2]), atol=0)
