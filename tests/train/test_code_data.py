"""The standard-library code corpus: a split by file that training never crosses, and line-start cuts."""

import os

import numpy as np
import pytest

from pdx.errors import InvalidInputError
from pdx.train import code_data

FUNC = '''import os


def area(w, h):
    """Return the area of a w by h rectangle."""
    return w * h


def no_doc(x):
    return x
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    for i in range(60):
        sub = root / ("pkg" if i % 2 else "") / ("site-packages" if i % 7 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"m{i}.py").write_text(FUNC + "\n".join(f"value_{i}_{j} = {j}" for j in range(40)) + "\n")
    (root / "notes.txt").write_text("not python")
    return str(root)


def test_the_split_is_by_file_disjoint_and_deterministic(corpus):
    files = code_data.source_files(corpus)
    assert files and not any("site-packages" in f or not f.endswith(".py") for f in files)
    train, held = code_data.load_split(False, corpus), code_data.load_split(True, corpus)
    assert not set(train.files) & set(held.files) and sorted(train.files + held.files) == files
    assert held.files == [f for f in files if code_data.is_held_out(f)] == code_data.load_split(True, corpus).files
    real = code_data.source_files(code_data.stdlib_root())
    share = np.mean([code_data.is_held_out(f) for f in real])
    assert 0.07 < share < 0.13  # a tenth of the standard library is held out


def test_examples_cut_at_a_line_start_and_fit_the_canvas(corpus):
    split = code_data.load_split(False, corpus)
    sampler = code_data.Sampler(split)
    rng = np.random.default_rng(0)
    texts = b"".join(split.texts)
    for prompt, answer in sampler.examples(rng, 50, 16, 40):
        assert 1 <= len(prompt) <= 16 and 1 <= len(answer) <= 41
        assert prompt[-1] == ord("\n")  # the cut follows a newline: the answer starts a line
        body = answer[:-1] if answer[-1] == code_data.EOS else answer
        assert len(body) == 40 or answer[-1] == code_data.EOS  # short only where the file ends
        assert bytes(prompt + body) in texts
    w = sampler.windows(rng, 5, 64)
    assert w.shape == (5, 64) and w.dtype == np.int32 and w.max() <= code_data.EOS


def test_function_prompts_end_after_the_docstring(corpus):
    split = code_data.load_split(False, corpus)
    prompts = code_data.function_prompts(split, 200, 30)
    assert prompts, "every file holds one documented function"
    name, prompt, follow = prompts[0]
    assert prompt == b'def area(w, h):\n    """Return the area of a w by h rectangle."""\n'
    assert follow.startswith(b"    return w * h\n") and len(follow) == 30
    assert code_data.function_prompts(split, 20, 30) == []  # no prompt fits 20 bytes


def test_a_missing_or_empty_data_directory_raises(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        code_data.load_split(False, str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(InvalidInputError, match="no .py files"):
        code_data.load_split(False, str(tmp_path / "empty"))



@pytest.mark.parametrize("completion, parses", [
    (b"    return w * h\n    x = (1,", True),  # the unfinished last line is cut off
    (b"    x = (1,\n    2", False),  # an open bracket at the last line boundary
    (b"    return w", True),  # no full line: only the prompt is left, and it parses
    (b"    return (w\xff", True),  # ... whatever the unfinished line holds
    (b"    return \xff\n", False),  # not UTF-8
    (b"    return (w\n<EOS>", False),  # stopped at EOS: all of it counts
    (b"    return w * h<EOS>", True),
])
def test_completion_parses_closes_at_a_line_boundary(completion, parses):
    prompt = b'    def area(w, h):\n        """Area."""\n'  # a method: indented, as its file has it
    body, eos = completion.removesuffix(b"<EOS>"), completion.endswith(b"<EOS>")
    ids = list(body.replace(b"    ", b"        ")) + [code_data.EOS] * eos
    assert code_data.completion_parses(prompt, ids) is parses


def test_a_mask_left_in_a_completion_is_not_python():
    assert not code_data.completion_parses(b"x = 1\n", [code_data.MASK, 10])
