"""The serving engine: greedy tokens equal `ar.generate`'s for each prompt alone, whatever runs beside
it (SARATHI on and off); per-request sampling is reproducible; stops, cancellation, the bounded queue and
bad requests."""

import numpy as np
import pytest

from pdx.decoding import ar
from pdx.errors import InvalidInputError, UnsupportedError
from pdx.model import Model
from pdx.serve import engine as eng
from tests.decoding.test_conformance import _mamba2
from tests.decoding.test_speculative import tiny

PROMPTS = [[5, 6, 7], list(range(10, 40)), [9, 10, 11, 12, 13, 14, 15, 16, 17], [3, 4] * 11, [8] * 19, [1, 2]]
NEW = [12, 7, 20, 5, 16, 9]


@pytest.fixture(scope="module")
def model():
    return tiny(layers=2)


def _request(prompt, max_tokens, log, **knobs):
    def emit(text, tok, finish):
        log.append(("token", tok) if finish is None else ("finish", finish))

    return eng.Request(prompt=list(prompt), max_tokens=max_tokens, emit=emit, **knobs)


def _drain(engine, limit=500):
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("the engine did not finish")


@pytest.mark.parametrize("sarathi", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_greedy_equals_ar_generate_alone_while_others_run(model, sarathi):
    engine = eng.Engine(model, max_batch=4, max_len=96, chunk=8, sarathi=sarathi)
    before = eng.serve_step._cache_size()
    logs = [[] for _ in PROMPTS]
    reqs = [_request(p, n, log) for p, n, log in zip(PROMPTS, NEW, logs)]
    for r in reqs[:4]:
        engine.submit(r)
    engine.step()
    engine.step()
    for r in reqs[4:]:  # arrive while the first ones decode
        engine.submit(r)
    _drain(engine)
    for prompt, n, r, log in zip(PROMPTS, NEW, reqs, logs):
        ref = ar.generate(model, [prompt], max_new_tokens=n, stop_token_ids=[])
        assert r.tokens == ref.row(0)
        assert log[-1] == ("finish", eng.FINISH_LENGTH) and [t for k, t in log if k == "token"] == r.tokens[:-1]
    # one program per mixed-step width and one decode step, for every mix of requests
    assert eng.serve_step._cache_size() - before <= len(engine.widths) + 1


def test_mixed_step_width_fits_the_pending_prompts(model, monkeypatch):
    engine = eng.Engine(model, max_batch=4, max_len=256, chunk=64)
    assert engine.widths == [16, 32, 64]
    widths, step = [], eng.serve_step
    monkeypatch.setattr(eng, "serve_step", lambda p, c, r, tokens, *a, **k: widths.append(tokens.shape) or
                        step(p, c, r, tokens, *a, **k))
    for prompt in ([1, 2, 3], list(range(5, 25)), list(range(100))):  # 3, then 20, then 100 prompt tokens
        engine.submit(_request(prompt, 2, []))
        engine.step()
    # a mixed step [1, B + c] takes the smallest c holding the pending prompt (the chunk at most)
    assert widths == [(1, 4 + 16), (1, 4 + 32), (1, 4 + 64)]
    _drain(engine)  # the 100-token prompt's last 36 tokens ride a 64-wide step, then decode-only steps [B, 1]
    assert widths[3:] == [(1, 4 + 64)] + [(4, 1)] * (len(widths) - 4)


@pytest.mark.parametrize("sarathi", [True, False])
def test_a_short_prompt_overtakes_a_long_prefill_only_with_sarathi(model, sarathi):
    engine = eng.Engine(model, max_batch=4, max_len=256, chunk=16, sarathi=sarathi)
    long, short = _request(range(1, 101), 2, []), _request([5, 6, 7], 2, [])
    engine.submit(long)
    engine.step()  # the long prompt's first 16 tokens
    engine.submit(short)
    steps = 0
    while not short.tokens:
        engine.step()
        steps += 1
    # SARATHI packs the short prompt first (shortest remaining), beside the long one's next chunk; the baseline
    # finishes the long prefill first, as a scheduler without chunked prefill would: 84 more tokens, the short
    # prompt riding in the last chunk's spare room
    assert (steps, long.tokens == []) == ((1, True) if sarathi else (6, False))
    _drain(engine)
    for r in (long, short):
        assert r.tokens == ar.generate(model, [r.prompt], max_new_tokens=2, stop_token_ids=[]).row(0)


def test_compile_all_leaves_nothing_to_compile(model):
    engine = eng.Engine(model, max_batch=3, max_len=128, chunk=32)
    engine.compile_all()
    assert np.asarray(engine.cache.lengths).tolist() == [0, 0, 0]  # padding only: nothing written
    compiled_before = eng.serve_step._cache_size()
    reqs = [_request(p, n, []) for p, n in zip(PROMPTS[:3], NEW)]
    for r in reqs:
        engine.submit(r)
    _drain(engine)
    assert eng.serve_step._cache_size() == compiled_before
    for p, n, r in zip(PROMPTS, NEW, reqs):
        assert r.tokens == ar.generate(model, [p], max_new_tokens=n, stop_token_ids=[]).row(0)


def test_sampling_is_per_request_reproducible(model):
    engine = eng.Engine(model, max_batch=4, max_len=64, chunk=8)
    runs = []
    for company in ([], [[3, 4, 5] * 3, [7, 7]]):  # alone, then with other requests beside it
        r = _request([5, 6, 7, 8], 16, [], temperature=1.0, top_p=0.9, seed=7)
        for p in company:
            engine.submit(_request(p, 10, [], temperature=0.8, seed=1))
        engine.submit(r)
        _drain(engine)
        runs.append(r.tokens)
    other = _request([5, 6, 7, 8], 16, [], temperature=1.0, top_p=0.9, seed=8)
    engine.submit(other)
    _drain(engine)
    assert runs[0] == runs[1] and other.tokens != runs[0] and len(set(runs[0])) > 3


def test_stop_ids_cancel_and_queue(model):
    engine = eng.Engine(model, max_batch=2, max_len=64, chunk=8, queue_size=2)
    ref = ar.generate(model, [[5, 6, 7]], max_new_tokens=8, stop_token_ids=[]).row(0)
    log = []
    r = _request([5, 6, 7], 8, log, stop_ids=frozenset({ref[3]}))
    engine.submit(r)
    _drain(engine)
    assert r.tokens == ref[:ref.index(ref[3])] and log[-1] == ("finish", eng.FINISH_STOP)
    a, b, c = (_request([5, 6, 7], 30, []) for _ in range(3))
    engine.submit(a)
    engine.submit(b)
    with pytest.raises(eng.QueueFull):
        engine.submit(c)
    engine.step()
    assert engine.load() == (0, 2)
    a.cancel()
    engine.step()
    assert engine.load() == (0, 1) and engine.slots.count(None) == 1  # a's slot is free for the next request


def test_bad_requests_and_models(model):
    engine = eng.Engine(model, max_batch=2, max_len=32, chunk=8)
    for req, match in [(_request([5] * 30, 5, []), "exceeds the server's context of 32"),
                       (_request([500], 5, []), "out of range"), (_request([], 5, []), "empty"),
                       (_request([5], 0, []), "max_tokens must be an int >= 1"),
                       (_request([5], 4, [], top_p=0.0), "top_p")]:
        with pytest.raises(InvalidInputError, match=match):
            engine.submit(req)
    with pytest.raises(InvalidInputError, match="max_len 32768 exceeds"):
        eng.Engine(model, max_len=4096 * 8)
    with pytest.raises(InvalidInputError, match="chunk must be"):
        eng.Engine(model, chunk=0)
    cfg, params, family = _mamba2()
    with pytest.raises(UnsupportedError, match="serving.*does not run on Mamba-2"):
        eng.Engine(Model(cfg=cfg, params=params, tokenizer=None, family=family))
    assert np.all(np.asarray(engine.cache.lengths) == 0)


@pytest.mark.slow
def test_smollm2_greedy_is_batch_invariant(smollm2, humaneval):
    """16 HumanEval prompts of different lengths through 16 slots (prompts packed in 64-token chunks beside
    the running decodes): each request's tokens equal `ar.generate` on its prompt alone."""
    prompts = [smollm2.tokenizer.encode(humaneval[f"HumanEval/{i}"]["prompt"]) for i in range(16)]
    engine = eng.Engine(smollm2, max_batch=16, max_len=1024, chunk=64)
    stops = frozenset(smollm2.cfg.eos_token_ids)
    reqs = [_request(p, 24 + 4 * (i % 3), [], stop_ids=stops) for i, p in enumerate(prompts)]
    for r in reqs:
        engine.submit(r)
    _drain(engine, limit=2000)
    for p, r in zip(prompts, reqs):
        ref = ar.generate(smollm2, [p], max_new_tokens=r.max_tokens).row(0)
        assert r.tokens == [t for t in ref if t not in stops]
