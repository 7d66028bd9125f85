"""Tokenizers built with the `tokenizers` package: from GGUF vocab/merges or an HF `tokenizer.json`.

For GGUF files the pre-tokenizer follows `tokenizer.ggml.pre`, as llama.cpp does. SmolLM2 names
`smollm`: every digit is split off on its own, then the GPT-2 byte-level regex runs. That is how
the model was trained (transformers' GGUF converter drops the digit split; we do not).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field

from pdx.errors import InvalidInputError, ModelLoadError, UnsupportedError
from pdx.files import atomic_write

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# llama.cpp pre-tokenizer names -> regexes applied in order, each splitting off matches as pieces.
_PRE_TOKENIZERS = {
    "default": [_GPT2_REGEX],
    "gpt2": [_GPT2_REGEX],
    "smollm": [r"\p{N}", _GPT2_REGEX],
    "starcoder": [r"\p{N}", _GPT2_REGEX],
    "refact": [r"\p{N}", _GPT2_REGEX],
}

_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types that are special tokens
_SPECIAL_SWITCH = threading.Lock()


@dataclass
class Tokenizer:
    """Text <-> ids, special tokens and the chat template of one model."""

    backend: object  # tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos: bool = False
    chat_template: str | None = None
    special_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, allow_special: bool = False, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special-token strings are only recognised with `allow_special`."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
        with _SPECIAL_SWITCH:  # `encode_special_tokens` is the backend's state: one switch-and-encode at a time
            self.backend.encode_special_tokens = not allow_special  # True: special strings are plain text
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidInputError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role", "content"}]) with the model's own Jinja chat template."""
        if not self.chat_template:
            raise InvalidInputError("this model has no chat template; pass a plain prompt instead of chat messages")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise InvalidInputError(f"chat messages need 'role' and 'content' keys, got {m!r}")
        return _render(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                       bos_token=self.token_text(self.bos_token_id),
                       eos_token=self.token_text(self.eos_token_ids[0] if self.eos_token_ids else None))

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.backend.id_to_token(token_id)


def _render(template: str, **context) -> str:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise InvalidInputError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(**context)
    except jinja2.TemplateError as e:
        raise InvalidInputError(f"chat template failed to render: {e}") from e


def from_gguf(reader) -> Tokenizer:
    """Byte-level BPE tokenizer from GGUF metadata (`tokenizer.ggml.model == "gpt2"`)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from pdx.io.gguf_file import field

    kind = field(reader, "tokenizer.ggml.model", "", required=False)
    if kind != "gpt2":
        raise UnsupportedError(f"GGUF tokenizer model {kind!r} is not supported; pdx reads byte-level BPE ('gpt2')")
    pre = field(reader, "tokenizer.ggml.pre", "default", required=False)
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), required=False)
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges", [], required=False)]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_TOKENIZERS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    special = {tokens[i]: i for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)}
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    eos = field(reader, "tokenizer.ggml.eos_token_id", None, required=False)
    eot = field(reader, "tokenizer.ggml.eot_token_id", None, required=False)
    return Tokenizer(
        backend=backend,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id", None, required=False),
        eos_token_ids=tuple(sorted({int(t) for t in (eos, eot) if t is not None})),
        add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", False, required=False)),
        chat_template=field(reader, "tokenizer.chat_template", None, required=False),
        special_tokens=special,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what a byte-level BPE vocabulary is written in)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level(eos_token_ids: tuple[int, ...] = (), specials: tuple[str, ...] = ()) -> Tokenizer:
    """The tokenizer of byte-level models (pdx's tiny SambaY and transformer, the code models): id = UTF-8
    byte value; `specials` (e.g. an EOS and a mask token) take ids 256, 257, ... in order."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return Tokenizer(backend=backend, eos_token_ids=tuple(eos_token_ids),
                     special_tokens={t: 256 + i for i, t in enumerate(specials)})


def save_byte_level(directory: str | os.PathLike, eos_token_ids: tuple[int, ...] = (),
                    specials: tuple[str, ...] = ()) -> None:
    """Write `byte_level()`'s `tokenizer.json` and a `tokenizer_config.json` naming the EOS token into a
    checkpoint directory (each file replaced atomically), so `pdx.load_model(directory)` has a tokenizer."""
    tok = byte_level(eos_token_ids, specials)
    files = {"tokenizer.json": tok.backend.to_str()}
    if eos_token_ids:
        files["tokenizer_config.json"] = json.dumps({"eos_token": tok.token_text(eos_token_ids[0])})
    for name, text in files.items():
        path = os.path.join(os.fspath(directory), name)
        atomic_write(path, text)


def from_hf_dir(path: str | os.PathLike) -> Tokenizer:
    """Tokenizer from an HF directory's `tokenizer.json` (+ `tokenizer_config.json` for template/BOS)."""
    from tokenizers import Tokenizer as HFTokenizer

    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise ModelLoadError(f"{path} has no tokenizer.json")
    try:
        backend = HFTokenizer.from_file(tok_file)
    except Exception as e:
        raise ModelLoadError(f"{tok_file} is corrupt: {e}") from e
    conf = {}
    conf_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(conf_file):
        with open(conf_file) as f:
            conf = json.load(f)
    template = conf.get("chat_template")
    template_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.isfile(template_file):
        with open(template_file) as f:
            template = f.read()

    def token_id(name):
        tok = conf.get(name)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return backend.token_to_id(tok) if tok else None

    specials = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    eos = token_id("eos_token")
    return Tokenizer(backend=backend, bos_token_id=token_id("bos_token"),
                     eos_token_ids=() if eos is None else (eos,), add_bos=bool(conf.get("add_bos_token", False)),
                     chat_template=template, special_tokens=specials)
