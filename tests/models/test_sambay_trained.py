"""The shipped byte-level AR checkpoints (tiny SambaY and transformer: scripts/train_sambay.py; the code AR
model: scripts/train_code_dllm.py): they load through pdx.load_model, have learned (held-out bytes far below
the uniform ln 256 = 5.55 nats) and generate through the AR engine."""

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pdx
from pdx.decoding import ar
from pdx.models import sambay as sb
from pdx.models import transformer as tf
from pdx.train import code_data

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "checkpoints")


@pytest.mark.slow
@pytest.mark.parametrize("name, family, max_loss", [("sambay_tiny", sb, 3.0), ("transformer_tiny", tf, 3.0),
                                                    ("code_dllm/ar", tf, 2.2)])
def test_shipped_checkpoint_learned_and_generates(name, family, max_loss):
    model = pdx.load_model(os.path.join(ROOT, name))
    assert model.family is family
    text = code_data.load_split(True).texts[0][:192]  # a held-out standard-library file: never trained on
    ids = jnp.asarray(np.frombuffer(text, np.uint8).astype(np.int32))[None]
    pos = jnp.arange(ids.shape[1])[None]
    logits, _ = family.forward(model.params, model.cfg, ids, pos)
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean())
    assert loss < max_loss, f"{name}: held-out loss {loss:.2f} nats"
    out = ar.generate(model, [list(b"def add(a, b):\n")], max_new_tokens=16)
    assert out.tokens.shape == (1, 16) and 0 <= out.tokens.min() and out.tokens.max() < 256


def test_byte_level_tokenizer_is_the_identity_on_bytes():
    from pdx.io import tokenizer

    tok = tokenizer.byte_level((0,))
    text = "def add(a, b):\n\treturn a + b  # ∑ é 12"
    assert tok.encode(text) == list(text.encode()) and tok.decode(list(text.encode())) == text
    assert tok.vocab_size == 256


@pytest.mark.parametrize("name", ["sambay_tiny", pytest.param("transformer_tiny", marks=pytest.mark.slow)])
def test_shipped_byte_level_checkpoints_generate_from_the_cli(name, capsys):
    """They ship a byte tokenizer: `pdx generate --model checkpoints/NAME` reads text and writes text."""
    import json

    from pdx import cli

    path = os.path.join(ROOT, name)
    assert pdx.load_model(path).tokenizer.eos_token_ids == (0,)
    assert cli.main(["generate", "--model", path, "--prompt", "def add(a, b):", "--max-new-tokens", "8",
                     "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] and all(0 <= t < 256 for t in out["token_ids"])
