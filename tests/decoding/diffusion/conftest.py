import pytest

from tests.decoding.diffusion import tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(pdx model, transformers model) of the random tiny Llama (tiny_llama.build)."""
    return tiny_llama.build(tmp_path_factory.mktemp("tiny_llama"))
