"""Tiny random Hugging Face models (Llama with grouped-query attention, GPT-2, OPT) for the
intervention tests, with a character-level tokenizer (so token categories are easy to control).

``tests/conftest.py`` has word-level tiny models and the SmolLM2 fixture. Each model here is
saved once per test session to a temporary directory with its tokenizer and loaded through
:func:`tokext.load_model`, like a user's local model directory.
The builders are cached, so every test module that imports them shares one copy. Weights are
drawn with a large ``initializer_range`` so attention patterns are peaked and interventions move
the logits by clearly measurable amounts.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import torch

CHARS = string.ascii_lowercase + string.digits + " .,!?\n"
SPECIALS = ["[PAD]", "[BOS]", "[EOS]"]


def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[PAD]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]")


VOCAB = len(SPECIALS) + len(CHARS)


def _save(model, name: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="tokext-tiny-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    target = root / name
    model.save_pretrained(target)
    _tokenizer().save_pretrained(target)
    return target


@functools.cache
def llama_dir() -> Path:
    """3-layer Llama, 4 query heads sharing 2 KV heads (GQA), d_model 32, RoPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _save(LlamaForCausalLM(config).eval(), "tiny-llama")


@functools.cache
def long_llama_dir() -> Path:
    """2-layer Llama, 4 query heads sharing 2 KV heads, d_model 32, RoPE, 2,048 positions (task prompts fit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _save(LlamaForCausalLM(config).eval(), "tiny-llama-long")


@functools.cache
def gpt2_dir() -> Path:
    """3-layer GPT-2, 4 heads, d_model 32, learned positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=128,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _save(GPT2LMHeadModel(config).eval(), "tiny-gpt2")


@functools.cache
def opt_dir() -> Path:
    """2-layer OPT: TransformerLens wraps it with a delegating attention bridge (edits discarded)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(2)
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _save(OPTForCausalLM(config).eval(), "tiny-opt")


@functools.cache
def _loaded(kind: str):
    from tokext.models.loading import load_model

    directory = {"llama": llama_dir, "gpt2": gpt2_dir, "opt": opt_dir}[kind]()
    return load_model(str(directory))


@functools.cache
def _native():
    from tokext.models.native import native_model

    return native_model(n_layers=3, d_model=32, n_heads=4, d_head=8, d_vocab=VOCAB, seed=3)


def tiny_tokens(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """[n, length] random non-special token ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIALS), VOCAB, (n, length), generator=gen)


def encode_text(texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` under the tiny tokenizer (no BOS)."""
    offset = len(SPECIALS)
    return [[offset + CHARS.index(c) for c in text] for text in texts]


@pytest.fixture(scope="session")
def tiny_llama():
    return _loaded("llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return _loaded("gpt2")


@pytest.fixture(scope="session")
def tiny_opt():
    return _loaded("opt")


@pytest.fixture(scope="session")
def tiny_native():
    return _native()
