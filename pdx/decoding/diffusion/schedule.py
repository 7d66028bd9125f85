"""LLaDA's linear number-of-tokens schedule."""

from __future__ import annotations

import numpy as np


def linear_schedule(num_masked: int, steps: int) -> np.ndarray:
    """Tokens to commit at each of `steps` steps so that `num_masked` are committed in total:
    `num_masked // steps` each, the first `num_masked % steps` steps one more (LLaDA's rule). [steps]"""
    base, extra = divmod(num_masked, steps)
    return np.array([base + (i < extra) for i in range(steps)], np.int32)
