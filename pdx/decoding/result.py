"""What every decoding strategy returns, so the CLI, benchmarks and tests treat them alike."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class GenerationResult:
    """Output of one `generate` call over a batch of prompts.

    tokens:  [B, N] int32 generated ids (N = max_new_tokens); entries past `lengths[b]` are padding.
    lengths: [B] number of generated tokens per row, a stop token included.
    stats:   counters and timings, e.g. forward_passes (target model passes, NFE for dLLMs),
             prefill_s, decode_s, compile_s, drafted, accepted, steps.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    stats: dict

    def row(self, b: int) -> list[int]:
        """Generated ids of row `b`, without padding."""
        return self.tokens[b, : self.lengths[b]].tolist()
