"""Shared fixtures: tiny random HF models on disk, a tiny native model, the real SmolLM2 (slow)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_hf import save_tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_hf_dir(request, tiny_llama_dir, tiny_gpt2_dir):
    return {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]


@pytest.fixture()
def native():
    from tokext.models.native import native_model

    torch.manual_seed(0)
    return native_model(seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine lose a lot to spinning; a module
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_eval(tmp_path_factory):
    """``(directory, bridge)``: the 3-layer random Llama of tests/test_evaluate.py (word-level tokenizer,
    context 1,024), saved once and loaded through ``tokext.load_model``."""
    from tests.test_evaluate import tiny_eval_model_dir
    from tokext.models.loading import load_model

    directory = str(tiny_eval_model_dir(str(tmp_path_factory.mktemp("tiny_eval_shared"))))
    return directory, load_model(directory)


@pytest.fixture(scope="session")
def smollm2():
    from tokext.models.loading import load_model

    return load_model("smollm2-135m")
