"""Extra computed tokens: filler tokens before the answer (count and position) and CoT length, on a task.

For each condition (see ``tokext.studies.computed_tokens.run_computed_tokens_study``) it measures greedy
accuracy, the teacher-forced answer loss and the attention on the filler span (mass from later
queries, received attention alpha_k of filler vs. other keys, share of heads where a filler is a
sink). Writes under ``--out/<model spec name>/<task>-L<level>/``:

- ``summary.csv``: one row per condition (appended as each finishes);
- ``items.csv``: one row per (condition, item): extracted answer, correctness, loss, raw text;
- ``span_by_head.csv``: one row per (condition, layer, head): the filler-span statistics;
- ``provenance.json``: model, task, level, n, seed, counts, positions, git rev, date, timings.

An interrupted run resumes: finished conditions (rows of ``summary.csv``) are kept and skipped when
the settings other than the conditions (counts, positions, CoT lengths) are the same, so a study can
also be extended; other settings need ``--force``. Every setting is checked before the model loads.

    python experiments/computed_tokens.py --quick                 # smoke test, about 1 min here
    python experiments/computed_tokens.py --n 16 --counts 0,1,4,16,64 --accuracy greedy-match  # ~7 min here
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path

import pandas as pd

from tokext.errors import InputError
from tokext.studies.computed_tokens import DEFAULT_COUNTS, FULL_COT, POSITIONS, study_cells
from tokext.version import __version__

ROOT = Path(__file__).resolve().parents[2]  # the checkout: default output folder

QUICK = dict(n=4, counts=(0, 4, 16), positions=("before_answer",), cot_lengths=())
FILES = ("summary.csv", "items.csv", "span_by_head.csv")


def _ints(text: str, name: str, full_ok: bool = False) -> tuple[int, ...]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if full_ok and part == "full":
            out.append(FULL_COT)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise InputError(f"--{name}: {part!r} is not an integer" + (" or 'full'" if full_ok else "")) from None
    return tuple(out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model spec for tokext.load_model")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument("--n", type=int, default=24, help="items per condition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--counts", default=",".join(map(str, DEFAULT_COUNTS)), help="filler counts, e.g. 0,1,4")
    parser.add_argument("--positions", default="before_answer", help=f"comma list from {', '.join(POSITIONS)}")
    parser.add_argument("--cot-lengths", default="", help="CoT demo steps, e.g. 0,1,full ('' for none)")
    parser.add_argument("--filler", default=" .")
    parser.add_argument(
        "--accuracy",
        choices=("generate", "greedy-match"),
        default="generate",
        help="direct answers: greedy generation + extraction (evaluate's path), or greedy-match "
        "from the scoring pass (same answer when the model answers at once; no decoding cost)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "results" / "computed_tokens"))
    parser.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    parser.add_argument("--force", action="store_true", help="discard earlier results with other settings")
    args = parser.parse_args(argv)
    args.counts = _ints(args.counts, "counts")
    args.positions = tuple(p.strip() for p in args.positions.split(",") if p.strip())
    args.cot_lengths = _ints(args.cot_lengths, "cot-lengths", full_ok=True)
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
    for name in ("n", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.shots < 0:
        raise InputError(f"--shots must be >= 0, got {args.shots}")
    study_cells(args.counts, args.positions, args.cot_lengths)
    model = Path(args.model).expanduser()
    if args.model.startswith((".", "/", "~")) and not model.exists():
        raise InputError(f"--model: no such file or directory: {model}")


def settings(args: argparse.Namespace) -> dict:
    keys = ("model", "task", "level", "n", "seed", "shots", "counts", "positions", "cot_lengths", "filler", "accuracy")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k in keys}


def prepare(out: Path, config: dict, force: bool) -> set[str]:
    """Finished condition keys in ``out`` (same settings), after dropping partial rows of unfinished ones."""
    prov = out / "provenance.json"
    if not (out / "summary.csv").is_file():  # nothing finished: rows of a cell cut short are stale
        for name in FILES[1:]:
            (out / name).unlink(missing_ok=True)
        return set()
    cells = ("counts", "positions", "cot_lengths")  # conditions may be added; the rest must match
    old = json.loads(prov.read_text()).get("settings") if prov.is_file() else None
    if old is None or {k: v for k, v in old.items() if k not in cells} != {
        k: v for k, v in config.items() if k not in cells
    }:
        if not force:
            raise InputError(
                f"{out} holds results of other settings ({old}); pass --force to replace them, or choose another --out"
            )
        for name in FILES:
            (out / name).unlink(missing_ok=True)
        return set()
    summary = pd.read_csv(out / "summary.csv")
    done = set(summary["cell"])
    for name in FILES[1:]:  # a row of summary.csv is written last, so drop rows of cells it lacks
        path = out / name
        if path.is_file():
            frame = pd.read_csv(path, keep_default_na=False)
            frame[frame["cell"].isin(done)].to_csv(path, index=False)
    return done


def append(path: Path, frame: pd.DataFrame) -> None:
    frame.to_csv(path, mode="a", header=not path.is_file(), index=False, float_format="%.6g")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        validate(args)
        slug = Path(args.model.rstrip("/")).name or args.model
        out = Path(args.out) / slug / f"{args.task}-L{args.level}{'-quick' if args.quick else ''}"
        config = settings(args)
        done = prepare(out, config, args.force)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    from tokext.models.info import model_info
    from tokext.models.loading import load_model
    from tokext.studies.computed_tokens import run_computed_tokens_study
    from tokext.studies.sweep import git_revision

    start = time.perf_counter()
    model = load_model(args.model)
    info = model_info(model)
    out.mkdir(parents=True, exist_ok=True)
    load_s = time.perf_counter() - start
    provenance = {
        "settings": config,
        "model_name": info.name,
        "model_source": info.source,
        "n_layers": info.n_layers,
        "n_heads": info.n_heads,
        "git_rev": git_revision(),
        "tokext": __version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config_hash": hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12],
        "notes": "sink: alpha_k > 0.3 (Gu et al.); alpha over the prompt only (rows after the prompt excluded); "
        "filler_sink_share = % of (prompt, layer, head) with >= 1 filler sink; cot_steps -1 = full chain",
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1))
    timings: dict[str, float] = {}
    tick = [time.perf_counter()]

    def on_cell(cell, summary, items, span):
        seconds = time.perf_counter() - tick[0]
        tick[0] = time.perf_counter()
        timings[cell.key] = round(seconds, 1)
        for frame in (items, span):
            frame.insert(0, "cell", cell.key)
        append(out / "items.csv", items)
        append(out / "span_by_head.csv", span)
        append(out / "summary.csv", pd.DataFrame([{"cell": cell.key, **summary, "seconds": round(seconds, 1)}]))
        print(
            f"{cell.key:28s} acc {summary['accuracy']:.3f} (greedy-match {summary['greedy_match']:.3f})  "
            f"loss {summary['answer_loss']:.3f}  "
            f"span mass {summary['span_mass']:.3f}  alpha filler {summary['alpha_filler']:.3f} "
            f"(content {summary['alpha_content']:.3f})  filler sinks {summary['filler_sink_share']:.1f}%  "
            f"[{seconds:.0f}s]",
            flush=True,
        )

    run_computed_tokens_study(
        model,
        args.task,
        args.level,
        counts=args.counts,
        positions=args.positions,
        n=args.n,
        seed=args.seed,
        cot_lengths=args.cot_lengths,
        shots=args.shots,
        filler=args.filler,
        batch_size=args.batch_size,
        generate=args.accuracy == "generate",
        skip=done,
        on_cell=on_cell,
    )
    provenance.update(
        load_seconds=round(load_s, 1),
        cell_seconds=timings,
        resumed_cells=sorted(done),
        total_seconds=round(time.perf_counter() - start, 1),
    )
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1))
    print(f"written to {out} in {provenance['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
