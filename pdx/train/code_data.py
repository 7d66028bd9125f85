"""Real code for byte-level models: the Python standard library's own `.py` files, split by file.

A file is held out when the hash of its path relative to the library root falls in the held-out
tenth, so the split is the same on every machine with the same Python, and training never sees a
byte of a held-out file. Ids are byte values; `EOS` ends a file and `MASK` is the diffusion mask.

Training examples are `(prompt, answer)` byte lists cut at a line start, as a completion prompt ends:
up to `prompt_len` bytes before the cut and the next `gen_len` bytes (shorter at the end of a file,
then EOS). Evaluation prompts are held-out functions: the `def` line through the end of its docstring;
a completion counts as Python when `completion_parses` accepts it.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import sysconfig
import textwrap

import numpy as np

from pdx.errors import InvalidInputError

EOS, MASK = 256, 257
VOCAB_SIZE = 258
SPECIALS = ("<|endoftext|>", "<|mask|>")  # the byte tokenizer's names for ids 256 and 257
HELD_OUT_TENTHS = 1


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def is_held_out(relpath: str) -> bool:
    digest = hashlib.blake2b(relpath.replace(os.sep, "/").encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 10 < HELD_OUT_TENTHS


def source_files(root: str) -> list[str]:
    """Relative paths of the `.py` files under `root` (no site-packages), sorted."""
    if not os.path.isdir(root):
        raise InvalidInputError(f"code data directory {root!r} does not exist")
    out = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
        out += [os.path.relpath(os.path.join(directory, f), root) for f in files if f.endswith(".py")]
    if not out:
        raise InvalidInputError(f"code data directory {root!r} holds no .py files")
    return sorted(out)


@dataclasses.dataclass
class Split:
    """The bytes of one side of the split: `files` (relative paths) and their contents."""

    root: str
    files: list[str]
    texts: list[bytes]

    @property
    def num_bytes(self) -> int:
        return sum(len(t) for t in self.texts)


def load_split(held_out: bool, root: str | None = None) -> Split:
    root = stdlib_root() if root is None else root
    files = [f for f in source_files(root) if is_held_out(f) == held_out]
    texts = []
    for f in files:
        with open(os.path.join(root, f), "rb") as fh:
            texts.append(fh.read())
    keep = [i for i, t in enumerate(texts) if t.strip()]
    return Split(root, [files[i] for i in keep], [texts[i] for i in keep])


class Sampler:
    """Random line-start cuts of a split, a file drawn in proportion to its size."""

    def __init__(self, split: Split):
        self.split = split
        self.sizes = np.array([len(t) for t in split.texts], np.float64)
        self.line_starts = [np.flatnonzero(np.frombuffer(b"\n" + t[:-1], np.uint8) == 10) for t in split.texts]

    def examples(self, rng: np.random.Generator, n: int, prompt_len: int, gen_len: int):
        """`n` (prompt, answer) byte-id lists: a non-empty prompt of at most `prompt_len` bytes, an answer
        of at most `gen_len` (EOS appended where the file ends inside it)."""
        files = rng.choice(len(self.sizes), n, p=self.sizes / self.sizes.sum())
        out = []
        for f in files:
            text, starts = self.split.texts[f], self.line_starts[f]
            cut = int(starts[rng.integers(1, len(starts))]) if len(starts) > 1 else len(text) // 2
            prompt = list(text[max(0, cut - prompt_len) : cut])
            answer = list(text[cut : cut + gen_len])
            if len(answer) < gen_len:
                answer.append(EOS)
            out.append((prompt or [10], answer))
        return out

    def windows(self, rng: np.random.Generator, n: int, length: int) -> np.ndarray:
        """`[n, length]` int32 byte windows (EOS after a file's end), for next-byte training."""
        files = rng.choice(len(self.sizes), n, p=self.sizes / self.sizes.sum())
        out = np.full((n, length), EOS, np.int32)
        for i, f in enumerate(files):
            text = self.split.texts[f]
            start = int(rng.integers(0, max(1, len(text) - length // 2)))
            chunk = np.frombuffer(text[start : start + length], np.uint8)
            out[i, : len(chunk)] = chunk
        return out


def function_prompts(split: Split, max_prompt: int, gen_len: int, limit: int | None = None):
    """Held-out completion prompts: each function with a docstring whose `def` line through the end of the
    docstring fits `max_prompt` bytes, and at least `gen_len` bytes of its file follow it. Returns
    [(file, prompt bytes, the file's next gen_len bytes)] in file order."""
    out = []
    for name, text in zip(split.files, split.texts):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        offsets = np.concatenate([[0], np.cumsum([len(line) for line in text.splitlines(keepends=True)])])
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
                continue
            doc = node.body[0]
            start = int(offsets[node.lineno - 1])
            end = int(offsets[doc.end_lineno])  # the line after the docstring's last
            if end - start <= max_prompt and len(text) - end >= gen_len:
                out.append((name, text[start:end], text[end : end + gen_len]))
                if limit is not None and len(out) >= limit:
                    return out
    return out


def completion_parses(prompt: bytes, completion: list[int]) -> bool:
    """Whether `prompt` and a generated `completion` (byte ids, maybe ending in EOS), closed at a line
    boundary, is Python that `ast.parse` accepts once dedented (a method's prompt starts indented).
    Closed: all of it when it stopped at EOS, else up to its last newline."""
    if EOS in completion:
        completion = completion[: completion.index(EOS)]
    elif 10 in completion:
        completion = completion[: len(completion) - completion[::-1].index(10)]
    else:
        completion = []
    if any(not 0 <= t < 256 for t in completion):
        return False
    try:
        ast.parse(textwrap.dedent((prompt + bytes(completion)).decode("utf-8")))
    except (SyntaxError, ValueError, UnicodeDecodeError):  # ValueError: a NUL byte
        return False
    return True
