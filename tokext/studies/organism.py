"""Training the model organism: a 2-layer TransformerLens-native model trained from scratch on
chain-of-thought arithmetic (the format is :mod:`tokext.models.organism`'s). It reaches
near-perfect held-out accuracy in a few CPU minutes and grows a first-token (BOS) attention sink,
so sink statistics and interventions can be studied on a model whose every training choice is
known.

The default recipe was chosen by measurement (4 seeds each): a constant prefix such as "Q:" splits
the sink over the first constant tokens, and weight decay 0.1-1.0 weakened the BOS sink instead of
strengthening it.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokext.errors import InputError
from tokext.evaluation.organism import evaluate_organism, sink_mass
from tokext.models.devices import input_device
from tokext.models.inputs import pad
from tokext.models.organism import (
    FORMAT_VERSION,
    CharTokenizer,
    Organism,
    OrganismExample,
    check_target,
    save_organism,
)


def _max_len(n_terms: int, max_operand: int, ops: str, prefix: str) -> int:
    bound = max_operand**n_terms if "*" in ops else n_terms * max_operand
    num, operand = len(str(bound)) + 1, len(str(max_operand))
    question = len(prefix) + n_terms * (operand + 1) + 2 * (n_terms - 1)  # operands, ops, "=", parentheses
    return 1 + question + (n_terms - 1) * (num + 1) + 3 + num + 1  # BOS, chain, ";A:", answer, EOS


def _encode_batch(
    tok: CharTokenizer, examples: Sequence[OrganismExample], cot: Sequence[bool], loss_on: str = "completion"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [batch, pos] and a mask of the positions whose next token is scored."""
    seqs, n_prompt = [], []
    for ex, c in zip(examples, cot):
        seqs.append(torch.tensor(tok.encode(ex.text(c), eos=True)))
        n_prompt.append(1 + len(ex.question) if loss_on == "completion" else 1)  # loss starts after "="
    tokens, real = pad(seqs, tok.pad_token_id)
    pos = torch.arange(tokens.shape[1])
    scored = (pos[None, :] >= torch.tensor(n_prompt)[:, None] - 1) & real.bool()
    scored[torch.arange(len(seqs)), real.sum(1) - 1] = False  # nothing follows EOS
    return tokens, scored


def train_organism(
    *,
    steps: int = 1500,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 128,
    n_heads: int = 4,
    d_mlp: int | None = None,
    positional: str = "rotary",
    batch_size: int = 64,
    lr: float = 4e-3,
    weight_decay: float = 0.0,
    warmup: int = 100,
    n_terms: int = 3,
    max_operand: int = 9,
    ops: str = "+-",
    prefix: str = "",
    direct_fraction: float = 0.25,
    loss_on: str = "completion",
    log_every: int = 250,
    progress: bool = True,
    device: str = "cpu",
    threads: int = 2,
) -> Organism:
    """Train an organism from scratch with AdamW (linear warm-up, cosine decay) on fresh training
    problems each step; a ``direct_fraction`` of them use the direct (no-CoT) form. The loss covers
    the tokens after "=" (``loss_on="all"``: every token). The defaults (rotary, lr 4e-3, no weight
    decay, no prefix) gave >= 0.96 CoT accuracy and a BOS sink >= 0.35 for seeds 0-3.

    >>> org = train_organism(steps=2, d_model=32, log_every=0, progress=False)
    >>> org.model.cfg.n_layers, org.log[-1]["step"]
    (2, 2)
    """
    from tokext.models.native import native_model

    if steps < 1 or d_model % n_heads or not 0 <= direct_fraction <= 1 or loss_on not in ("completion", "all"):
        raise InputError(
            f"need steps >= 1, d_model % n_heads == 0, 0 <= direct_fraction <= 1, loss_on 'completion' "
            f"or 'all'; got {steps=}, {d_model=}, {n_heads=}, {direct_fraction=}, {loss_on=}"
        )
    tok = CharTokenizer()
    model_cfg: dict[str, Any] = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp or 4 * d_model,
        n_ctx=_max_len(n_terms, max_operand, ops, prefix),
        d_vocab=tok.vocab_size,
        seed=seed,
        positional_embedding_type=positional,
    )
    config = {
        "format_version": FORMAT_VERSION,
        "model": model_cfg,
        "task": dict(n_terms=n_terms, max_operand=max_operand, ops=ops, prefix=prefix),
        "train": dict(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            direct_fraction=direct_fraction,
            loss_on=loss_on,
        ),
    }
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = native_model(name="organism", **model_cfg)
        model = model.to(device) if device != "cpu" else model
        org = Organism(model, tok, config)
        _fit(org, steps, seed, log_every, progress)
    finally:
        torch.set_num_threads(previous)
    return org


def _fit(org: Organism, steps: int, seed: int, log_every: int, progress: bool) -> None:
    train, model = org.config["train"], org.model
    device = _device(model)
    groups = [
        {"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": train["weight_decay"]},
        {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0},
    ]  # no decay on biases, LN
    opt = torch.optim.AdamW(groups, lr=train["lr"], betas=(0.9, 0.98))
    warm = max(1, train["warmup"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    rng = random.Random(seed + 1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        examples = org.examples(train["batch_size"], rng.randrange(2**31), split="train")
        cot = [rng.random() >= train["direct_fraction"] for _ in examples]
        tokens, scored = _encode_batch(org.tokenizer, examples, cot, train["loss_on"])
        logits = model(tokens.to(device))
        scored, tokens = scored.to(device), tokens.to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][scored[:, :-1]], tokens[:, 1:][scored[:, :-1]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step == steps or (log_every and step % log_every == 0):
            loss = loss.detach()
            acc = evaluate_organism(org, n=100, seed=1000 + step)
            org.log.append(
                {
                    "step": step,
                    "loss": float(loss),
                    "accuracy": acc,
                    "bos_attention": float(sink_mass(org, n=50).max()),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            if progress:
                print(
                    f"step {step:5d}  loss {float(loss):.4f}  cot accuracy {acc:.3f}  "
                    f"max BOS attention {org.log[-1]['bos_attention']:.3f}  "
                    f"{time.perf_counter() - start:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
    model.eval()


def train_organism_cli(out_dir: str | Path, steps: int = 1500, seed: int = 0, force: bool = False) -> int:
    """Train, report held-out accuracy (CoT and direct), BOS sink mass and wall time, then save."""
    check_target(Path(out_dir), force)
    start = time.perf_counter()
    org = train_organism(steps=steps, seed=seed)
    seconds = time.perf_counter() - start
    cot, direct = evaluate_organism(org, cot=True), evaluate_organism(org, cot=False)
    sink = sink_mass(org)
    print(f"trained {steps} steps in {seconds:.0f} s; held-out exact match: CoT {cot:.3f}, direct {direct:.3f}")
    for layer, row in enumerate(sink.tolist()):
        print(f"layer {layer} attention to BOS per head: " + " ".join(f"{x:.3f}" for x in row))
    print(f"saved to {save_organism(org, out_dir, overwrite=force)}")
    return 0


def _device(model: Any) -> torch.device:
    return input_device(model)
