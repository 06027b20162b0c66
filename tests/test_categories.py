"""Token categories (first, punctuation, whitespace, digit, other) against hand-written expectations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.tiny_hf import build_tokenizer
from tokext.attention.collect import batch_context, category_table
from tokext.attention.metrics import CATEGORIES, token_category

FIRST, PUNCT, SPACE, DIGIT, OTHER = range(5)


def test_category_order_is_the_documented_one():
    assert CATEGORIES == ("first", "punctuation", "whitespace", "digit", "other")


@pytest.mark.parametrize(
    "text, expected",
    [
        (",", PUNCT),
        (".", PUNCT),
        ("!", PUNCT),
        ("?!", PUNCT),
        (" ,", PUNCT),
        ("$", PUNCT),
        ("(", PUNCT),
        ("\n", SPACE),
        (" ", SPACE),
        ("\t", SPACE),
        ("\n\n", SPACE),
        (" \n ", SPACE),
        ("", SPACE),
        ("7", DIGIT),
        ("42", DIGIT),
        (" 42", DIGIT),
        ("cat", OTHER),
        (" cat", OTHER),
        ("7.", OTHER),
        ("3.14", OTHER),
        ("a,", OTHER),
        ("Ċ", OTHER),  # a byte-level vocabulary entry, not decoded text: a letter
        ("\ufffd", OTHER),  # half of a multi-byte character, as a byte-level tokenizer decodes it
    ],
)
def test_token_category_of_decoded_text(text, expected):
    assert token_category(text) == expected


def _byte_level_tokenizer():
    """GPT-2-style byte-level BPE: Ċ is a newline byte, Ġ a space, ĉ a tab, Ã half of a UTF-8 letter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "<|endoftext|>": 0,
        "Ċ": 1,
        "Ġ": 2,
        "ĉ": 3,
        ",": 4,
        ".": 5,
        "!": 6,
        "7": 7,
        "42": 8,
        "cat": 9,
        "Ġcat": 10,
        "Ġ42": 11,
        "ĊĊ": 12,
        "Ã": 13,
        "Ġ,": 14,
    }
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _stub_model(vocab_size: int):
    return SimpleNamespace(cfg=SimpleNamespace(d_vocab=vocab_size), tokenizer=None)


def test_category_table_decodes_byte_level_tokens():
    tokenizer = _byte_level_tokenizer()
    table = category_table(_stub_model(15), tokenizer)
    expected = [
        OTHER,  # <|endoftext|>: special
        SPACE,
        SPACE,
        SPACE,  # Ċ Ġ ĉ
        PUNCT,
        PUNCT,
        PUNCT,  # , . !
        DIGIT,
        DIGIT,  # 7 42
        OTHER,
        OTHER,  # cat, Ġcat
        DIGIT,  # Ġ42
        SPACE,  # ĊĊ
        OTHER,  # Ã: an incomplete UTF-8 sequence
        PUNCT,
    ]  # Ġ,
    assert table.tolist() == expected


def test_category_table_is_per_tokenizer():
    word_level = build_tokenizer(add_bos=True)
    model = _stub_model(len(word_level))
    model.tokenizer = word_level
    table = category_table(model)
    ids = word_level.convert_tokens_to_ids
    by_hand = {
        "<pad>": OTHER,
        "<unk>": OTHER,
        "<s>": OTHER,
        "</s>": OTHER,
        ",": PUNCT,
        ".": PUNCT,
        "!": PUNCT,
        "?": PUNCT,
        ";": PUNCT,
        "=": PUNCT,
        "+": PUNCT,
        "(": PUNCT,
        "\n": SPACE,
        "3": DIGIT,
        "0": DIGIT,
        "cat": OTHER,
        "Paris": OTHER,
        "x": OTHER,
    }
    assert {tok: int(table[ids(tok)]) for tok in by_hand} == by_hand
    # an explicit tokenizer overrides the model's, with its own table
    other = category_table(model, _byte_level_tokenizer())
    assert other.shape == table.shape and int(other[1]) == SPACE and int(table[1]) == OTHER
    assert category_table(model) is table  # cached for the model's tokenizer


def test_no_tokenizer_means_other_everywhere():
    assert category_table(SimpleNamespace(cfg=SimpleNamespace(d_vocab=6))).tolist() == [OTHER] * 6


def test_first_real_token_is_first_whatever_its_text():
    table = category_table(_stub_model(15), _byte_level_tokenizer())
    # right padding; row 0 starts with BOS, row 1 with a comma, a BOS later in row 0 is "other"
    tokens = torch.tensor([[0, 9, 4, 0, 1, 7], [4, 10, 11, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    ctx = batch_context(tokens, mask, [0, 1], table)
    assert ctx.categories.tolist() == [
        [FIRST, OTHER, PUNCT, OTHER, SPACE, DIGIT],
        [FIRST, OTHER, DIGIT, SPACE, OTHER, OTHER],
    ]
    # left padding: the first real token sits after the pads
    tokens = torch.tensor([[0, 0, 7, 4, 1]])
    ctx = batch_context(tokens, torch.tensor([[0, 0, 1, 1, 1]]), [0], table)
    assert ctx.categories.tolist() == [[OTHER, OTHER, FIRST, PUNCT, SPACE]]
