"""Greedy token parity of a speculative drafter with AR on SmolLM2 and real HumanEval prompts, shared by
the slow tests of the linear and tree drafters (the AR references are computed once per session)."""

from __future__ import annotations

from pdx.decoding import ar
from pdx.decoding.speculative import engine
from tests.decoding.test_ar import HUMANEVAL

PROMPTS = HUMANEVAL[::2]  # 4 prompts of different lengths: all 4 as one padded batch, the shortest and longest alone
NEW_TOKENS = 64
_references: dict[tuple, object] = {}


def assert_greedy_identical_to_ar(model, humaneval, drafter) -> None:
    """`drafter`'s greedy output equals AR's on the shortest and longest prompt alone and on the padded batch
    of all, and no decode takes more target passes than AR's steps (every pass emits at least one token)."""
    prompts = [model.tokenizer.encode(humaneval[t]["prompt"]) for t in PROMPTS]
    alone = sorted(prompts, key=len)
    for group in [[alone[0]], [alone[-1]], prompts]:
        key = tuple(map(tuple, group))
        if key not in _references:
            _references[key] = ar.generate(model, group, max_new_tokens=NEW_TOKENS)
        ref = _references[key]
        out = engine.generate(model, group, drafter=drafter, max_new_tokens=NEW_TOKENS)
        assert [out.row(i) for i in range(len(group))] == [ref.row(i) for i in range(len(group))]
        assert out.stats["target_passes"] <= ref.stats["decode_steps"]
