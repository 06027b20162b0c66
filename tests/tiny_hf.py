"""Tiny random Hugging Face models (Llama with grouped-query attention, GPT-2) saved to a directory
with a word-level tokenizer, so tests can load them through ``tokext.load_model`` and compare with
a separately loaded transformers model (eager attention, ``output_attentions=True``)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

WORDS = sorted(
    set(
        re.findall(
            r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]",
            (
                "The capital of France is Paris , and the capital of Germany is Berlin . Water boils at 100 degrees ; "
                "a cat sat on the mat ! Why is the sky blue ? She said : hello world . x = 3 ; y = x + 2 ( z ) "
                "one two three four five six seven eight nine ten apple river stone green quick brown fox jumps over "
                "lazy dog"
            ),
        )
    )
)
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_model(directory: Path, arch: str, seed: int = 0) -> Path:
    """Write a tiny random ``llama`` (GQA: 4 query heads, 2 KV heads) or ``gpt2`` model to ``directory``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(add_bos=(arch == "llama"))
    vocab = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=64,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
    else:
        raise ValueError(arch)
    model = AutoModelForCausalLM.from_config(config)
    # sharpen attention so patterns are far from uniform (random init is nearly uniform)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("q_proj", "k_proj", "c_attn")):
                param.mul_(6.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def reference_attentions(directory: Path, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Per-layer attention [batch, head, query, key] from a fresh transformers model (eager)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(tokens, attention_mask=attention_mask, output_attentions=True)
    return [a.double() for a in out.attentions], out.logits
