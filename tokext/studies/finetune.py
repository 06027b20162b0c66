r"""The fine-tuning diagnostic of arXiv 2403.14932 v3: does fine-tuning on a structured dataset make
non-semantic tokens (punctuation, newlines, digits) draw outlier attention?

Fine-tunes the last ``--train-layers`` decoder layers (plus the final norm; embeddings and the tied
unembedding stay frozen) of SmolLM2-135M in fp32 with AdamW on the worked ``cot_solution`` texts of
one task (tokext.evaluation.tasks), then compares attention statistics before and after on (a) held-out task
records ("<question>\n<cot_solution>" of problems not trained on) and (b) the built-in natural
prompts. Layers below the trained ones cannot change, by construction; full fine-tuning does not fit
in ~10 CPU minutes here. The frozen layers' output for the training texts is computed once, so a
step only runs the trained layers; the first step checks that this gives the full model's loss, and
the fine-tuned weights are copied into the TransformerLens bridge and checked against the trained
model's logits before the "after" statistics are collected.

Writes to ``--out`` (default ``results/finetune_sinks/``): ``stats_{before,after}_{task,natural}.npz``
(AttentionStats), ``profiles.csv`` (per phase, dataset and layer: first-token mass, entropy,
punctuation/whitespace(newline)/digit/other mass, sink rate, hidden sinks per sequence),
``changes.csv`` (after - before), ``hidden_sink_tokens.csv``, ``training_log.csv`` and
``provenance.json``. Weights are saved only with ``--save-dir`` (never inside the repository).

    python experiments/finetune_sinks.py                  # 200 steps: 8 CPU-min, 10-20 min here
    python experiments/finetune_sinks.py --quick --model /path/to/tiny/hf/dir --out /tmp/ft
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tokext.errors import InputError
from tokext.version import __version__

ROOT = Path(__file__).resolve().parents[2]  # the checkout: default output folder, --save-dir check

QUICK = dict(steps=3, n_train=8, n_eval=4, n_natural=4, train_layers=1, batch_size=2, log_every=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec for tokext.load_model (a HF-backed model)")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--level", type=int, default=1)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--train-layers", type=int, default=4, help="fine-tune the last N decoder layers")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--n-train", type=int, default=64, help="distinct training problems (cycled)")
    p.add_argument("--n-eval", type=int, default=24, help="held-out task records for the statistics")
    p.add_argument("--n-natural", type=int, default=40, help="built-in natural prompts for the statistics")
    p.add_argument("--max-len", type=int, default=64, help="statistics: first tokens of each text (Gu et al.)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "results" / "finetune_sinks"))
    p.add_argument("--save-dir", default=None, help="also save the fine-tuned HF model here (outside the repo)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def validate(args: argparse.Namespace) -> None:
    """Every setting, before anything slow: raises InputError naming the option."""
    from tokext.evaluation.tasks import LEVELS, get_task

    get_task(args.task)
    if args.level not in LEVELS:
        raise InputError(f"--level must be one of {LEVELS}, got {args.level}")
    for name in ("steps", "train_layers", "batch_size", "n_train", "n_eval", "n_natural", "max_len", "log_every"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0 or args.weight_decay < 0 or args.warmup < 0:
        raise InputError(
            f"need --lr > 0, --weight-decay >= 0, --warmup >= 0; got {args.lr}, {args.weight_decay}, {args.warmup}"
        )
    if args.save_dir and Path(args.save_dir).expanduser().resolve().is_relative_to(ROOT):
        raise InputError(f"--save-dir {args.save_dir} is inside the repository: use e.g. ~/.cache/tokext/finetuned")
    if args.model.startswith((".", "/", "~")) and not Path(args.model).expanduser().exists():
        raise InputError(f"--model: no such file or directory: {args.model}")


def task_texts(task: str, level: int, n_train: int, n_eval: int, seed: int) -> tuple[list[str], list[Any]]:
    """(training ``cot_solution`` texts, held-out examples: problems not among the training ones)."""
    from tokext.evaluation.tasks import get_task

    train = get_task(task).generate(n_train, seed, level)
    seen = {ex.question for ex in train}
    held = [ex for ex in get_task(task).generate(n_eval + n_train, seed + 1, level) if ex.question not in seen]
    return [ex.cot_solution for ex in train], held[:n_eval]


class _Stop(Exception):
    pass


class TailModel:
    """The last ``n`` decoder layers, final norm and unembedding of a Hugging Face Llama-style model,
    run on cached inputs of layer ``L - n`` (right-padded; pad positions never reach a real query)."""

    def __init__(self, hf: Any, n: int) -> None:
        layers = hf.model.layers
        if not 1 <= n <= len(layers):
            raise InputError(f"--train-layers must be in 1..{len(layers)} for this model, got {n}")
        self.hf, self.first, self.layers = hf, len(layers) - n, list(layers)[len(layers) - n :]
        for param in hf.parameters():
            param.requires_grad_(False)
        self.params = [q for m in (*self.layers, hf.model.norm) for q in m.parameters()]
        for param in self.params:
            param.requires_grad_(True)

    @torch.no_grad()
    def cache_inputs(self, ids: list[list[int]], batch_size: int = 16) -> list[torch.Tensor]:
        """Input of the first trained layer for each sequence ([len, d_model]), frozen layers run once."""
        from tokext.models.inputs import pad

        out: list[torch.Tensor] = []
        captured: dict[str, torch.Tensor] = {}

        def grab(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        handle = self.hf.model.layers[self.first].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for start in range(0, len(ids), batch_size):
                chunk = [torch.tensor(s) for s in ids[start : start + batch_size]]
                tokens, mask = pad(chunk, 0)
                try:
                    self.hf(input_ids=tokens, attention_mask=mask)
                except _Stop:
                    pass
                out += [captured["h"][row, : len(s)].clone() for row, s in enumerate(chunk)]
        finally:
            handle.remove()
        return out

    def loss(self, hidden: list[torch.Tensor], ids: list[list[int]]) -> torch.Tensor:
        """Mean next-token cross-entropy over every real position after the first."""
        length = max(len(s) for s in ids)
        h = torch.zeros(len(ids), length, hidden[0].shape[-1])
        labels = torch.full((len(ids), length), -100)
        real = torch.zeros(len(ids), length, dtype=torch.bool)
        for row, (x, s) in enumerate(zip(hidden, ids)):
            h[row, : len(s)], labels[row, : len(s)], real[row, : len(s)] = x, torch.tensor(s), True
        causal = torch.ones(length, length, dtype=torch.bool).tril()[None] & real[:, None, :]
        mask = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)[:, None]
        position_ids = torch.arange(length)[None].expand(len(ids), -1)
        rotary = self.hf.model.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
        h = self.hf.model.norm(h)
        keep = labels[:, 1:] != -100
        logits = self.hf.lm_head(h[:, :-1][keep])  # unembed only the scored positions
        return torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][keep])


def finetune(hf: Any, tokenizer: Any, texts: list[str], held: list[str], args: argparse.Namespace) -> list[dict]:
    """AdamW on the last layers (linear warm-up, cosine decay); returns the training log, whose
    ``heldout_loss`` is the loss on ``held`` (texts in the training format, of unseen problems)."""
    torch.manual_seed(args.seed)
    tail = TailModel(hf, args.train_layers)
    ids = [list(tokenizer(t).input_ids) for t in texts]
    held_ids = [list(tokenizer(t).input_ids)[: args.max_len] for t in held]
    start = time.perf_counter()
    cache, held_cache = tail.cache_inputs(ids), tail.cache_inputs(held_ids)
    cache_s = time.perf_counter() - start
    with torch.no_grad():  # the cached-input path must give the full model's loss
        probe = ids[: min(4, len(ids))]
        full = _full_loss(hf, probe)
        partial = float(tail.loss(cache[: len(probe)], probe))
    if abs(full - partial) > 1e-3 * max(1.0, abs(full)):
        raise RuntimeError(f"cached-input loss {partial:.5f} differs from the full model's {full:.5f}")
    opt = torch.optim.AdamW(tail.params, lr=args.lr, weight_decay=args.weight_decay)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / max(1, args.warmup)) * 0.5 * (1 + math.cos(math.pi * step / args.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(args.seed)).tolist()
    log = [
        {
            "step": 0,
            "train_loss": partial,
            "heldout_loss": _held_loss(tail, held_cache, held_ids),
            "lr": 0.0,
            "seconds": round(cache_s, 1),
        }
    ]
    print(f"cached frozen layers in {cache_s:.0f}s; step 0: held-out loss {log[0]['heldout_loss']:.4f}", flush=True)
    running, pos = [], 0
    for step in range(1, args.steps + 1):
        batch = [order[(pos + i) % len(order)] for i in range(args.batch_size)]
        pos += args.batch_size
        loss = tail.loss([cache[i] for i in batch], [ids[i] for i in batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tail.params, 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            row = {
                "step": step,
                "train_loss": sum(running) / len(running),
                "lr": float(sched.get_last_lr()[0]),
                "heldout_loss": _held_loss(tail, held_cache, held_ids)
                if step == args.steps or step % (10 * args.log_every) == 0
                else math.nan,
                "seconds": round(time.perf_counter() - start, 1),
            }
            log.append(row)
            running = []
            print(
                f"step {step:4d}  train loss {row['train_loss']:.4f}  held-out {row['heldout_loss']:.4f}  "
                f"[{row['seconds']:.0f}s]",
                flush=True,
            )
    for param in tail.params:
        param.requires_grad_(False)
    return log


@torch.no_grad()
def _held_loss(tail: TailModel, cache: list[torch.Tensor], ids: list[list[int]]) -> float:
    return float(tail.loss(cache, ids))


@torch.no_grad()
def _full_loss(hf: Any, ids: list[list[int]]) -> float:
    from tokext.models.inputs import pad

    tokens, mask = pad([torch.tensor(s) for s in ids], 0)
    logits = hf(input_ids=tokens, attention_mask=mask).logits[:, :-1]
    labels = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))


@torch.no_grad()
def copy_into_bridge(bridge: Any, hf: Any, names: list[str]) -> float:
    """Copy the trained parameters into the bridge's wrapped model; returns max |logit diff| after."""
    wrapped = {n.replace("._original_component", ""): p for n, p in bridge.original_model.named_parameters()}
    trained = dict(hf.named_parameters())
    missing = [n for n in names if n not in wrapped]
    if missing:
        raise RuntimeError(f"cannot find {missing[:3]} in the bridge's model")
    for name in names:
        wrapped[name].copy_(trained[name])
    probe = torch.tensor([list(bridge.tokenizer("1 + 2 = 3\nResponse: 3").input_ids)])
    return float((bridge(probe) - hf(input_ids=probe).logits).abs().max())


def profile(stats: Any, phase: str, dataset: str, tau: float = 0.1) -> pd.DataFrame:
    """Per-layer profile (means over heads) of one AttentionStats."""
    frame = stats.to_frame().drop(columns=["head"]).groupby("layer").mean().reset_index()
    summary = stats.layer_summary()[["layer", "sink_rate"]]
    hidden = stats.hidden_sinks(tau)
    per_layer = hidden.groupby("layer").size() / max(stats.n_sequences, 1)
    frame = frame.merge(summary, on="layer")
    frame["hidden_sinks_per_seq"] = frame["layer"].map(per_layer).fillna(0.0)
    frame.insert(0, "dataset", dataset)
    frame.insert(0, "phase", phase)
    return frame


def sink_tokens(stats: Any, phase: str, dataset: str, tau: float = 0.1) -> pd.DataFrame:
    hidden = stats.hidden_sinks(tau)
    table = hidden.groupby("token").agg(count=("alpha", "size"), mean_alpha=("alpha", "mean")).reset_index()
    table["per_seq"] = table["count"] / max(stats.n_sequences, 1)
    table.insert(0, "dataset", dataset)
    table.insert(0, "phase", phase)
    return table.sort_values("count", ascending=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        validate(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    from tokext.attention.collect import collect_attention_stats
    from tokext.evaluation.prompts import load_prompts
    from tokext.models.info import model_info
    from tokext.models.loading import load_model
    from tokext.studies.sweep import git_revision

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts, held_examples = task_texts(args.task, args.level, args.n_train, args.n_eval, args.seed)
    held = [f"{ex.question}\n{ex.cot_solution}" for ex in held_examples]
    natural = load_prompts(None, n=args.n_natural)
    bridge = load_model(args.model)
    info = model_info(bridge)
    datasets = {"task": held, "natural": natural}

    def collect(phase: str) -> dict[str, Any]:
        result = {}
        for name, data in datasets.items():
            stats = collect_attention_stats(
                bridge,
                data,
                batch_size=8,
                max_len=args.max_len,
                progress=False,
                dataset=f"{name}:{args.task}-L{args.level}" if name == "task" else name,
            )
            stats.save(out / f"stats_{phase}_{name}.npz")
            result[name] = stats
        return result

    before = collect("before")
    t_before = time.perf_counter() - t0
    hf = AutoModelForCausalLM.from_pretrained(
        bridge.original_model.config._name_or_path, dtype=torch.float32, attn_implementation="eager"
    )
    hf.eval()  # no dropout; gradients still flow
    log = finetune(hf, bridge.tokenizer, texts, [ex.cot_solution for ex in held_examples], args)
    t_train = time.perf_counter() - t0 - t_before
    names = [
        n
        for n, p in hf.named_parameters()
        if n.startswith("model.layers.")
        and int(n.split(".")[2]) >= info.n_layers - args.train_layers
        or n.startswith("model.norm.")
    ]
    landed = copy_into_bridge(bridge, hf, names)
    if landed > 1e-3:
        raise RuntimeError(f"the bridge's logits differ from the fine-tuned model's by {landed:.2e}")
    if args.save_dir:
        hf.save_pretrained(Path(args.save_dir).expanduser())
        bridge.tokenizer.save_pretrained(Path(args.save_dir).expanduser())
    after = collect("after")
    profiles = pd.concat(
        [
            profile(s, phase, name)
            for phase, stats in (("before", before), ("after", after))
            for name, s in stats.items()
        ],
        ignore_index=True,
    )
    profiles.to_csv(out / "profiles.csv", index=False, float_format="%.6g")
    metrics = [c for c in profiles.columns if c not in ("phase", "dataset", "layer")]
    keyed = profiles.set_index(["phase", "dataset", "layer"])[metrics]
    changes = (keyed.loc["after"] - keyed.loc["before"]).reset_index()
    changes.to_csv(out / "changes.csv", index=False, float_format="%.6g")
    pd.concat(
        [
            sink_tokens(s, phase, name)
            for phase, stats in (("before", before), ("after", after))
            for name, s in stats.items()
        ]
    ).to_csv(out / "hidden_sink_tokens.csv", index=False, float_format="%.6g")
    pd.DataFrame(log).to_csv(out / "training_log.csv", index=False, float_format="%.6g")
    total = time.perf_counter() - t0
    (out / "provenance.json").write_text(
        json.dumps(
            {
                "model": info.name,
                "model_source": info.source,
                "task": args.task,
                "level": args.level,
                "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
                "trained_parameters": names,
                "n_trained_parameters": int(sum(hf.get_parameter(n).numel() for n in names)),
                "train_texts": "tokext.evaluation.tasks cot_solution texts",
                "heldout_loss": "cot_solution texts of unseen problems",
                "task_stats": "question + newline + cot_solution of the same unseen problems",
                "natural": "tokext/data/prompts.txt (built-in)",
                "bridge_max_abs_logit_diff": landed,
                "seconds": {
                    "before_stats": round(t_before, 1),
                    "training": round(t_train, 1),
                    "total": round(total, 1),
                },
                "git_rev": git_revision(),
                "tokext": __version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            },
            indent=1,
        )
    )
    report(changes, profiles, args.train_layers, info.n_layers)
    tokens = pd.read_csv(out / "hidden_sink_tokens.csv", keep_default_na=False)
    for phase in ("before", "after"):
        top = tokens[(tokens.phase == phase) & (tokens.dataset == "task")].nlargest(6, "per_seq")
        print(
            f"task hidden sinks (alpha > 0.1, per sequence, all layers) {phase}: "
            + ", ".join(f"{t!r} {n:.1f}" for t, n in zip(top.token, top.per_seq))
        )
    print(f"written to {out} in {total:.0f}s (training {t_train:.0f}s)")
    return 0


def report(changes: pd.DataFrame, profiles: pd.DataFrame, n_trained: int, n_layers: int) -> None:
    """Print the per-layer before -> after values of the trained layers."""
    cols = ["first_token_mass", "entropy", "mass_punctuation", "mass_whitespace", "mass_digit", "hidden_sinks_per_seq"]
    for dataset in ("task", "natural"):
        rows = profiles[(profiles.dataset == dataset) & (profiles.layer >= n_layers - n_trained)]
        wide = rows.pivot(index="layer", columns="phase", values=cols)
        print(f"\n{dataset}: layer, before -> after")
        for layer, row in wide.iterrows():
            cells = (f"{c.replace('mass_', '')} {row[(c, 'before')]:.3f}->{row[(c, 'after')]:.3f}" for c in cols)
            print(f"  L{layer:<3d}" + "  ".join(cells))
    below = changes[changes.layer < n_layers - n_trained][["first_token_mass", "entropy"]].abs().to_numpy().max()
    print(f"\nlargest change in the untrained layers (should be ~0): {below:.2e}")
