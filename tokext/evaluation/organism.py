"""Scoring the model organism: greedy completions of its held-out problems, exact match, answer
loss, and its first-token (BOS) attention.

Run these inside :func:`tokext.interventions.intervene` to score an intervention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tokext.errors import InputError
from tokext.models.devices import input_device
from tokext.models.hooks import attached, pattern_hook_name
from tokext.models.inputs import pad
from tokext.models.organism import Organism, OrganismExample

if TYPE_CHECKING:
    import pandas as pd


@torch.no_grad()
def generate_greedy(organism: Organism, prompts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
    """Greedy completions of ``prompts`` (text after the prompt, up to EOS), batched; the whole
    right-padded sequence is recomputed at each step."""
    tok, model = organism.tokenizer, organism.model
    n_ctx = int(model.cfg.n_ctx)
    seqs = [tok.encode(p) for p in prompts]
    length = torch.tensor([len(s) for s in seqs])
    budget = int(max_new_tokens if max_new_tokens is not None else n_ctx - int(length.min()))
    tokens = torch.full((len(seqs), min(n_ctx, int(length.max()) + budget)), tok.pad_token_id)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = torch.tensor(s)
    done = length >= tokens.shape[1]
    was_training = model.training
    model.eval()
    rows = torch.arange(len(seqs))
    for _ in range(budget):
        if bool(done.all()):
            break
        width = int(length[~done].max())
        logits = model(tokens[:, :width].to(_device(model))).cpu()
        nxt = logits[rows, (length - 1).clamp(max=width - 1)].argmax(-1)
        live = ~done
        tokens[rows[live], length[live]] = nxt[live]
        length = length + live.long()
        done = done | (nxt == tok.eos_token_id) | (length >= tokens.shape[1])
    model.train(was_training)
    return [tok.decode(tokens[r, len(s) : int(length[r])]) for r, s in enumerate(seqs)]


def evaluate_organism(organism: Organism, n: int = 200, seed: int = 123, cot: bool = True) -> float:
    """Exact-match accuracy of greedy completions on ``n`` held-out (test split) problems: with
    ``cot`` the whole chain and answer must match, without it the answer after "A:"."""
    examples = organism.examples(n, seed, split="test")
    outs = generate_greedy(organism, [ex.prompt(cot) for ex in examples])
    return sum(out == ex.completion(cot) for out, ex in zip(outs, examples)) / max(1, n)


def evaluate_organism_items(
    organism: Organism, examples: Sequence[OrganismExample], *, cot: bool, batch_size: int = 64, progress: bool = True
) -> pd.DataFrame:
    """Greedy completions of ``examples`` and their scores, one row per problem (the columns of
    :func:`tokext.evaluation.evaluate.evaluate_reasoning`): id, task, level, cot, gold, extracted (the text
    after the last "A:"), correct (answer exact match), completion_correct (chain and answer
    exact), loss (teacher-forced mean NLL of the gold completion and EOS), n_new_tokens, raw.
    Run it inside :func:`tokext.interventions.intervene` to score an intervention.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    examples = list(examples)
    if not examples:
        raise InputError("no organism problems to evaluate")
    tok = organism.tokenizer
    rows = []
    with tqdm(total=len(examples), desc="organism", disable=not progress, leave=False) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            outs = generate_greedy(organism, [ex.prompt(cot) for ex in chunk])
            losses = _completion_losses(organism, chunk, cot)
            for i, (ex, out, loss) in enumerate(zip(chunk, outs, losses), start=start):
                extracted = out.rsplit("A:", 1)[1].strip() if "A:" in out else (out.strip() if not cot else "")
                rows.append(
                    {
                        "id": f"{i}:{ex.question}",
                        "task": "organism",
                        "level": None,
                        "cot": cot,
                        "gold": str(ex.answer),
                        "extracted": extracted,
                        "correct": extracted == str(ex.answer),
                        "completion_correct": out == ex.completion(cot),
                        "loss": loss,
                        "n_new_tokens": len(tok.encode(out, bos=False)),
                        "raw": out,
                    }
                )
            bar.update(len(chunk))
    return pd.DataFrame(rows)


@torch.no_grad()
def _completion_losses(organism: Organism, examples: Sequence[OrganismExample], cot: bool) -> list[float]:
    """Mean NLL of each gold completion (and EOS) after its prompt, in one padded forward pass."""
    tok, model = organism.tokenizer, organism.model
    seqs = [tok.encode(ex.text(cot), eos=True) for ex in examples]
    starts = [len(tok.encode(ex.prompt(cot))) for ex in examples]
    tokens, real = pad([torch.tensor(s) for s in seqs], tok.pad_token_id)
    logprobs = model(tokens.to(_device(model))).float().log_softmax(-1).cpu()
    out = []
    for row, (seq, first) in enumerate(zip(seqs, starts)):
        targets = torch.tensor(seq[first:])
        picked = logprobs[row, first - 1 : len(seq) - 1].gather(-1, targets[:, None])
        out.append(-float(picked.mean()))
    return out


def organism_prompts(organism: Organism, n: int, seed: int = 0, *, cot: bool = True) -> list[torch.Tensor]:
    """Token tensors (1-D, BOS first) of ``n`` complete held-out problems, for attention statistics."""
    return [torch.tensor(organism.tokenizer.encode(ex.text(cot))) for ex in organism.examples(n, seed)]


@torch.no_grad()
def sink_mass(organism: Organism, n: int = 200, seed: int = 0) -> torch.Tensor:
    """Mean attention to position 0 (BOS) from real queries at positions >= 1: [layer, head]."""
    model = organism.model
    tokens, real = pad(organism_prompts(organism, n, seed), organism.tokenizer.pad_token_id)
    queries = real.bool().clone()
    queries[:, 0] = False
    tokens, queries = tokens.to(_device(model)), queries.to(_device(model))
    sums = torch.zeros(int(model.cfg.n_layers), int(model.cfg.n_heads), device=queries.device)

    def reducer(layer: int):
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            sums[layer] += (pattern[..., 0] * queries[:, None, :].to(pattern.device)).sum((0, 2)).to(sums.device)

        return hook

    hooks = [(pattern_hook_name(layer), reducer(layer)) for layer in range(sums.shape[0])]
    with attached(model, hooks):
        model(tokens)
    return (sums / queries.sum()).cpu()


def _device(model: Any) -> torch.device:
    return input_device(model)
