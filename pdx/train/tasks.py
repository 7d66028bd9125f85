"""A synthetic ParallelBench-like task suite for tiny dLLMs.

Easy tasks for parallel decoding (every answer token is determined by the prompt alone): copy,
shift (a Caesar shift of each letter), reverse, sort. Hard ones (answer tokens depend on each
other): multi-digit addition (carries), a constrained choice (answer any one of four listed runs of
consecutive letters: decoding the letters independently mixes words), repeat (write any one of four listed
letters 12 times: each slot alone is a 4-way coin flip, together they must agree) and a 4x4
sudoku (cells constrain each other; several completions may be valid).

Long canvases (`fill-256/512`, `agree-256/512`: 256 and 512 generated columns), where a KV cache
must pay and answer tokens depend on each other across the canvas:
- fill: a copy with edits spread over the whole prompt: the prompt is letters and dittos (BLANK), the
  answer (all but one column, then EOS) repeats each letter and replaces every ditto by the letter before it (so
  a ditto's answer depends on its neighbour's answer, in chains). The 512 version's prompt ends in SEP (513
  tokens, left-padded to 544 columns), so every answer column, its EOS included, reads the prompt column 512
  to its left; without it the EOS column's source was the answer's own first letter, and 2800 training steps
  placed that EOS in only 56% of held-out answers (every letter right). Its 1056-column canvas trains at about
  2.5 s per step of 8 here (0.5 s at 256).
- agree: write any one of four listed letters in every column (no EOS): each slot alone is a 4-way coin
  flip, together all 256 or 512 must agree.

One shared vocabulary of 48 ids; each example is a prompt and an answer, and the model is trained
to write `answer + EOS` padded with EOS to the generation length (LLaDA's SFT recipe).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from pdx.errors import InvalidInputError

PAD, EOS, SEP, PLUS, SLASH, BLANK = 0, 1, 2, 3, 4, 5
TASK_IDS = {"copy": 6, "reverse": 7, "sort": 8, "add": 9, "choice": 10, "sudoku": 11, "shift": 38, "repeat": 39,
            "fill": 40, "agree": 41}
DIGIT0, LETTER0, NUM_LETTERS = 12, 22, 16
MASK = 47
VOCAB_SIZE = 48
PROMPT_LEN = 32  # every prompt fits; the training canvas is left-padded to this width
GEN_LEN = 32  # answer + EOS padding


def model_config(hidden: int = 64, layers: int = 3, positions: int = 128, diffusion: bool = True):
    """A tiny transformer over the task vocabulary (4 heads; 3 x 64 by default): a dLLM (mask token) or,
    with `diffusion=False`, a causal LM. `positions` bounds the canvas (long tasks: 1024)."""
    from pdx.models import transformer

    return transformer.Config(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=3 * hidden,
                              num_layers=layers, num_heads=4, num_kv_heads=4, head_dim=hidden // 4,
                              max_position_embeddings=positions, eos_token_ids=(EOS,), pad_token_id=PAD,
                              mask_token_id=MASK if diffusion else None)


def digits(n: int, width: int = 0) -> list[int]:
    return [DIGIT0 + int(c) for c in str(n).zfill(width)]


def _letters(rng, n: int) -> list[int]:
    return (LETTER0 + rng.integers(0, NUM_LETTERS, n)).tolist()


@dataclasses.dataclass(frozen=True)
class Task:
    """`make(rng) -> (prompt, answer)`; `check(prompt, output) -> bool` (output without EOS). `curriculum`,
    where set, makes easier training instances of the same task, half of each training draw. The canvas
    is `prompt_len` prompt columns (left-padded) and `gen_len` generated ones (answer, EOS, EOS padding)."""

    name: str
    easy: bool
    make: Callable
    check: Callable
    curriculum: Callable | None = None
    prompt_len: int = PROMPT_LEN
    gen_len: int = GEN_LEN


EASY_LEN = 24  # fixed answer length of the easy tasks: 25 tokens with EOS, so 10 per forward is reachable


def _copy(rng):
    s = _letters(rng, EASY_LEN)
    return [TASK_IDS["copy"], *s, SEP], s


def _shift_letters(s: list[int]) -> list[int]:
    return [LETTER0 + (t - LETTER0 + 3) % NUM_LETTERS for t in s]


def _shift(rng):
    s = _letters(rng, EASY_LEN)
    return [TASK_IDS["shift"], *s, SEP], _shift_letters(s)


def _reverse(rng):
    s = _letters(rng, EASY_LEN)
    return [TASK_IDS["reverse"], *s, SEP], s[::-1]


def _sort(rng):
    s = (DIGIT0 + rng.integers(0, 10, EASY_LEN)).tolist()
    return [TASK_IDS["sort"], *s, SEP], sorted(s)


ADD_WIDTH = 11  # sums are written zero-padded to a fixed width, so digit k of the answer always sits at the same
# offset from digit k of each operand (left-aligned sums of varying length made the alignment depend on the carry out)


def _add_instance(a: int, b: int):
    return [TASK_IDS["add"], *digits(a), PLUS, *digits(b), SEP], digits(a + b, ADD_WIDTH)


def _add(rng):
    return _add_instance(*(int(rng.integers(10**9, 10**10)) for _ in range(2)))


def _add_zero_rich(rng):
    """10-digit operands whose lower digits are 0 half the time. A digit of a uniform sum is independent
    of either operand's digit alone, so training on uniform sums gives no gradient toward reading one
    operand, and the model stays at chance digits; where the other digit is 0 the answer copies it."""
    def operand():
        d = rng.integers(0, 10, 10) * (rng.random(10) >= 0.5)
        d[0] = rng.integers(1, 10)
        return int("".join(map(str, d)))

    return _add_instance(operand(), operand())


def _choice(rng):
    """Four listed words, each a run of consecutive letters (cyclic, distinct starts: `fghij`, `opabc`);
    any one is an answer. Posed so because 3 x 64 and 4 x 128 models trained on random words (up to 5000
    steps, with 1-3-word curricula, or each word from its own letter group) never learned to look a word
    up from a committed letter (0-11.5% exact): here a committed letter fixes its neighbours (the letter
    after it), and the first one must come from the prompt, which keeps what the task tests: several
    valid answers, and a parallel decoder that picks letters of different words fails."""
    starts = rng.choice(NUM_LETTERS, 4, replace=False)
    words = [[LETTER0 + (int(s) + k) % NUM_LETTERS for k in range(5)] for s in starts]
    prompt = [TASK_IDS["choice"]]
    for w in words:
        prompt += [*w, SLASH]
    prompt[-1] = SEP
    return prompt, words[int(rng.integers(0, 4))]


def _choice_words(prompt: list[int]) -> list[list[int]]:
    words, cur = [], []
    for t in prompt[1:]:
        if t in (SLASH, SEP):
            words.append(cur)
            cur = []
        else:
            cur.append(t)
    return words


def _repeat(rng):
    letters = _letters(rng, 4)
    return [TASK_IDS["repeat"], *letters, SEP], [letters[int(rng.integers(0, 4))]] * 12


def _repeat_ok(prompt, out) -> bool:
    return len(out) == 12 and len(set(out)) == 1 and out[0] in prompt[1:5]


_SHIDOKU = np.array([[0, 1, 2, 3], [2, 3, 0, 1], [1, 0, 3, 2], [3, 2, 1, 0]])


def _sudoku_grid(rng) -> np.ndarray:
    """A random valid 4x4 sudoku (rows, columns and 2x2 boxes hold 0..3 once) by validity-preserving symmetries."""
    g = rng.permutation(4)[_SHIDOKU]
    bands = [rng.permutation([0, 1]) + 2 * b for b in rng.permutation(2)]
    g = g[np.concatenate(bands)]
    stacks = [rng.permutation([0, 1]) + 2 * s for s in rng.permutation(2)]
    g = g[:, np.concatenate(stacks)]
    return g.T if rng.random() < 0.5 else g


def _sudoku(rng):
    g = _sudoku_grid(rng).reshape(-1)
    cells = [DIGIT0 + 1 + int(v) for v in g]
    blanks = rng.choice(16, int(rng.integers(4, 9)), replace=False)
    puzzle = [BLANK if i in blanks else c for i, c in enumerate(cells)]
    return [TASK_IDS["sudoku"], *puzzle, SEP], cells


def _sudoku_ok(prompt, out) -> bool:
    if len(out) != 16 or any(not DIGIT0 + 1 <= t <= DIGIT0 + 4 for t in out):
        return False
    if any(p != BLANK and p != o for p, o in zip(prompt[1:17], out)):
        return False
    g = np.array(out).reshape(4, 4)
    groups = [*g, *g.T, *(g[r:r + 2, c:c + 2].reshape(-1) for r in (0, 2) for c in (0, 2))]
    return all(len(set(x.tolist())) == 4 for x in groups)


# The long tasks: (kind, generated columns), in the order they were added (`held_out` seeds by position).
LONG_SIZES = (("fill", 256), ("agree", 256), ("agree", 512), ("fill", 512))
DITTO_RATE = 0.3  # share of a fill prompt's tokens (after the first) that repeat the letter before them


def _filled(prompt: list[int]) -> list[int]:
    """A fill prompt's answer: its letters, each ditto replaced by the letter before it (a final SEP ends it)."""
    out = []
    for t in prompt[1:-1] if prompt[-1] == SEP else prompt[1:]:
        out.append(out[-1] if t == BLANK else t)
    return out


FILL_TERMINATED = 512  # fill lengths from which the prompt ends in SEP


def _fill_prompt_len(length: int) -> int:
    """Prompt columns of fill-`length`: exactly the prompt, or with its SEP, rounded up to a 32-column block."""
    return length if length < FILL_TERMINATED else -(-(length + 1) // 32) * 32


def _fill(length: int):
    def make(rng):
        n = length - 1
        letters = _letters(rng, n)
        body = [BLANK if i > 0 and d else t for i, (t, d) in enumerate(zip(letters, rng.random(n) < DITTO_RATE))]
        prompt = [TASK_IDS["fill"], *body, *([SEP] if length >= FILL_TERMINATED else [])]
        return prompt, _filled(prompt)

    return make


def _agree(length: int):
    def make(rng):  # the answer fills every column, no EOS: a 3 x 64 model places EOS at column 255 of 256 only
        letters = _letters(rng, 4)  # roughly (it wrote a letter there, all else right), which is not what agree tests
        return [TASK_IDS["agree"], *letters, SEP], [letters[int(rng.integers(0, 4))]] * length

    return make


def _agree_ok(length: int):
    return lambda prompt, out: len(out) == length and len(set(out)) == 1 and out[0] in prompt[1:5]


def _exact(prompt: list[int], out: list[int]) -> bool:
    return out == _answer_of(prompt)


def _answer_of(prompt: list[int]) -> list[int]:
    """The unique answer of a deterministic task, recomputed from its prompt."""
    kind = {v: k for k, v in TASK_IDS.items()}[prompt[0]]
    body = prompt[1:-1]
    if kind == "copy":
        return body
    if kind == "shift":
        return _shift_letters(body)
    if kind == "reverse":
        return body[::-1]
    if kind == "sort":
        return sorted(body)
    if kind == "fill":
        return _filled(prompt)
    i = body.index(PLUS)
    num = lambda ts: int("".join(str(t - DIGIT0) for t in ts))  # noqa: E731
    return digits(num(body[:i]) + num(body[i + 1 :]), ADD_WIDTH)


TASKS = {
    "copy": Task("copy", True, _copy, _exact),
    "shift": Task("shift", True, _shift, _exact),
    "reverse": Task("reverse", True, _reverse, _exact),
    "sort": Task("sort", True, _sort, _exact),
    "add": Task("add", False, _add, _exact, _add_zero_rich),
    "choice": Task("choice", False, _choice, lambda prompt, out: out in _choice_words(prompt)),
    "sudoku": Task("sudoku", False, _sudoku, _sudoku_ok),
    "repeat": Task("repeat", False, _repeat, _repeat_ok),
    **{f"{kind}-{n}": Task(f"{kind}-{n}", False, _fill(n), _exact, prompt_len=_fill_prompt_len(n), gen_len=n)
       if kind == "fill" else Task(f"{kind}-{n}", False, _agree(n), _agree_ok(n), gen_len=n) for kind, n in LONG_SIZES},
}
SHORT = tuple(name for name, task in TASKS.items() if task.gen_len == GEN_LEN)  # the 32-column suite
LONG = tuple(name for name in TASKS if name not in SHORT)


def get(name: str) -> Task:
    """The task called `name`; an unknown name is an `InvalidInputError` listing the known ones."""
    if name not in TASKS:
        raise InvalidInputError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def check_canvas(names, prompt_len: int, gen_len: int) -> None:
    """Raise `InvalidInputError` unless every task's prompts and answers fit a canvas of `prompt_len`
    prompt and `gen_len` generated columns (checked before anything trains or decodes)."""
    for name in names:
        task = get(name)
        if task.prompt_len > prompt_len or task.gen_len > gen_len:
            raise InvalidInputError(f"task {name!r} needs {task.prompt_len} prompt and {task.gen_len} generated "
                                    f"columns; the canvas has {prompt_len} and {gen_len}")


def solved(name: str, prompt: list[int], row: list[int]) -> bool:
    """Whether a decoded row (generated tokens, ending in EOS unless cut off) solves task `name` for `prompt`."""
    return get(name).check(prompt, row[:-1] if row[-1:] == [EOS] else row)


def sample(rng: np.random.Generator, n: int, names=tuple(TASKS)) -> list[tuple[list[int], list[int]]]:
    """`n` training (prompt, answer) pairs, tasks drawn uniformly from `names` (half of them from a task's
    curriculum where it has one)."""
    tasks = [get(name) for name in names]
    out = []
    for _ in range(n):
        task = tasks[int(rng.integers(0, len(tasks)))]
        easier = task.curriculum is not None and rng.random() < 0.5
        out.append((task.curriculum if easier else task.make)(rng))
    return out


def held_out(name: str, n: int, seed: int = 12345) -> list[tuple[list[int], list[int]]]:
    """A fixed evaluation set (training draws from other seeds; collisions are astronomically unlikely
    except for `sudoku`, whose small space the test set shares with training by design)."""
    task = get(name)
    rng = np.random.default_rng([seed, list(TASKS).index(name)])
    return [task.make(rng) for _ in range(n)]
