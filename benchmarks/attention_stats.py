"""Attention statistics at the cost of a plain forward pass?

Compares, on the same token batches: a plain eager forward pass (no hooks), tokext's streaming
``collect_attention_stats``, TransformerLens ``run_with_cache(names_filter=hook_pattern)`` followed by
the same statistics, and transformers ``output_attentions=True`` followed by the same statistics.
Each method runs in its own process (one warm-up, then the median of several runs; peak RSS of
the process), interleaved, and the table gives ratios to the plain forward pass of this run.

    python benchmarks/attention_stats.py            # SmolLM2-135M, fp32, T = 512 and 2048
    python benchmarks/attention_stats.py --quick    # small and fast (used by the tests)
    python benchmarks/attention_stats.py --long     # T = 8192: tokext completes where caching cannot
    python benchmarks/attention_stats.py --device cuda --dtype bfloat16 --seq-lens 2048,8192 \
        --baseline sdpa_forward --methods tokext  # on a GPU, against transformers' fused attention
    python benchmarks/attention_stats.py --norms    # the cost of norms=True, T = 2048, both engines

``--norms`` times ``collect_attention_stats`` with and without ``norms=True`` on each engine (methods
``tokext``, ``tokext_norms``, ``tokext_streaming``, ``tokext_streaming_norms``) next to the plain
forward pass, and adds a table of each engine's norms=True time over its norms=False time, from the
same run. ``--norms --paired`` instead loads the model once and alternates the four collections in one
process (norms off, on, on, off, ... per engine), so a busy machine's drift hits both sides of each
ratio alike; it prints each pair's ratio and their median.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    benchmark,
    limit_memory_from_env,
    load_for_job,
    parser,
    run_worker_if_asked,
    sdpa_forward,  # noqa: E402
    seq_len_configs,
    time_method,
)

METHODS = ["plain_forward", "tokext", "tl_run_with_cache", "hf_output_attentions", "sdpa_forward"]
NORM_METHODS = ["plain_forward", "tokext", "tokext_norms", "tokext_streaming", "tokext_streaming_norms"]


def real_token_batches(model, seq_len: int, n_seqs: int, batch_size: int):
    """``n_seqs`` sequences of exactly ``seq_len`` real-text tokens (built-in prompts, concatenated)."""
    import torch

    from tokext.evaluation.prompts import builtin_prompts

    tokenizer = model.tokenizer
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        stream = torch.randint(0, model.cfg.d_vocab, (seq_len * n_seqs,), generator=gen)
    else:
        text = "\n\n".join(builtin_prompts())
        ids = tokenizer(text).input_ids
        reps = seq_len * n_seqs // len(ids) + 1
        stream = torch.tensor((ids * reps)[: seq_len * n_seqs])
    seqs = stream.view(n_seqs, seq_len)
    return [seqs[i : i + batch_size] for i in range(0, n_seqs, batch_size)]


def worker(job: dict) -> dict:
    import torch

    import tokext
    from tokext.attention.collect import batch_context, category_table
    from tokext.attention.stats import AttentionStats
    from tokext.models.hooks import pattern_hook_name

    limit_memory_from_env()
    device = job.get("device", "cpu")
    if job["method"] == "sdpa_forward":
        make = lambda m: real_token_batches(m, job["seq_len"], job["n_seqs"], job["batch_size"])  # noqa: E731
        return time_method(sdpa_forward(job, make), job["repeats"], device)
    model = load_for_job(job) if job["model"] != "native" else tokext.native_model(n_ctx=8192)
    batches = [b.to(device) for b in real_token_batches(model, job["seq_len"], job["n_seqs"], job["batch_size"])]
    table = category_table(model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    method = job["method"]

    def same_statistics(patterns_per_batch):
        stats = AttentionStats(layers=list(range(n_layers)), n_heads=n_heads)
        stats.start(torch.device(device))
        for tokens, patterns in patterns_per_batch:
            mask = torch.ones_like(tokens)
            stats.begin_batch(batch_context(tokens, mask, range(tokens.shape[0]), table))
            for layer, pattern in enumerate(patterns):
                stats.update(layer, pattern)
        return stats.finish()

    if method == "plain_forward":

        def run():
            with torch.inference_mode():
                for tokens in batches:
                    model(tokens, return_type=None)
    elif method in NORM_METHODS[1:]:
        all_tokens = torch.cat(batches)
        engine = "streaming" if "streaming" in method else "hooks"
        norms = method.endswith("_norms")

        def run():
            tokext.collect_attention_stats(
                model, all_tokens, batch_size=job["batch_size"], progress=False, engine=engine, norms=norms
            )
    elif method == "tl_run_with_cache":

        def run():
            out = []
            with torch.inference_mode():
                for tokens in batches:
                    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"))
                    out.append((tokens, [cache[pattern_hook_name(layer)] for layer in range(n_layers)]))
                    del cache
            same_statistics(out)
    elif method == "hf_output_attentions":
        from transformers import AutoModelForCausalLM

        from tokext.models.devices import resolve_dtype
        from tokext.models.loading import _smollm2_dir

        hf = (
            AutoModelForCausalLM.from_pretrained(
                _smollm2_dir(), attn_implementation="eager", dtype=resolve_dtype(job.get("dtype", "float32"))
            )
            .to(device)
            .eval()
        )
        del model

        def run():
            out = []
            with torch.inference_mode():
                for tokens in batches:
                    attentions = hf(tokens, output_attentions=True).attentions
                    out.append((tokens, list(attentions)))
            same_statistics(out)
    else:
        raise SystemExit(f"unknown method {method}")
    return time_method(run, job["repeats"], device)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--long", action="store_true", help="T=8192 on SmolLM2: streaming vs caching")
    p.add_argument("--norms", action="store_true", help="T=2048: the cost of norms=True on both engines")
    p.add_argument("--paired", action="store_true", help="with --norms: one process, runs alternated in pairs")
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        default=20.0,
        help="address-space cap per worker, so runs that cannot fit fail cleanly",
    )
    args = p.parse_args(argv)
    if run_worker_if_asked(args, worker):
        return 0
    if args.norms and args.paired:
        return paired_norms(args)
    if seq_len_configs(args):
        configs, rounds, repeats = seq_len_configs(args), args.rounds, args.repeats
    elif args.quick:
        configs, rounds, repeats = [dict(seq_len=64, n_seqs=4, batch_size=2)], 1, 1
    elif args.long:
        configs, rounds, repeats = [dict(seq_len=8192, n_seqs=1, batch_size=1)], 1, 1
    elif args.norms:
        configs, rounds, repeats = [dict(seq_len=2048, n_seqs=2, batch_size=1)], args.rounds, args.repeats
    else:
        configs = [dict(seq_len=512, n_seqs=8, batch_size=4), dict(seq_len=2048, n_seqs=2, batch_size=1)]
        rounds, repeats = args.rounds, args.repeats
    methods = METHODS if not args.long else ["plain_forward", "tokext", "tl_run_with_cache", "sdpa_forward"]
    if args.norms:
        methods = NORM_METHODS
    results = benchmark(
        __file__,
        "attention statistics vs a plain forward pass",
        args,
        configs,
        methods,
        rounds,
        repeats,
        memory_limit_gib=args.memory_limit_gib,
    )
    if args.norms:
        print(norms_table(results))
    return 0


def paired_norms(args) -> int:
    """One process: for each engine, ``repeats`` pairs of collections without and with norms, in
    alternating order (off-on, on-off, ...), after one warm-up of each; prints each pair's ratio."""
    import json
    import statistics
    import time

    import torch

    import tokext

    job = dict(model=args.model, device=args.device, dtype=args.dtype)
    seq_len = int(args.seq_lens) if args.seq_lens else 2048
    model = load_for_job(job)
    tokens = torch.cat(real_token_batches(model, seq_len, 1, 1)).to(args.device)

    def once(engine: str, norms: bool) -> float:
        start = time.perf_counter()
        tokext.collect_attention_stats(model, tokens, batch_size=1, progress=False, engine=engine, norms=norms)
        return time.perf_counter() - start

    out = {}
    for engine in ("hooks", "streaming"):
        once(engine, False), once(engine, True)  # warm-up
        ratios, plain, normed = [], [], []
        for i in range(args.repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            times = {norms: once(engine, norms) for norms in order}
            plain.append(times[False])
            normed.append(times[True])
            ratios.append(times[True] / times[False])
        out[engine] = {"norms_false": plain, "norms_true": normed, "ratios": ratios}
        print(
            f"{engine}: T={seq_len}, norms=False {statistics.median(plain):.2f} s, norms=True "
            f"{statistics.median(normed):.2f} s; pair ratios {[round(r, 3) for r in ratios]}, "
            f"median x{statistics.median(ratios):.3f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def norms_table(results: list[dict]) -> str:
    """Per configuration and engine: median seconds without and with norms=True, and their ratio."""
    import pandas as pd

    frame = pd.DataFrame([r for r in results if not r.get("failed")])
    medians = frame.groupby(["seq_len", "batch_size", "n_seqs", "method"])["seconds"].median()
    lines = [
        "| T | batch | seqs | engine | norms=False s | norms=True s | x norms=False |",
        "|---|---|---|---|---|---|---|",
    ]
    for (seq_len, batch, seqs), group in medians.groupby(level=[0, 1, 2]):
        times = group.droplevel([0, 1, 2])
        for engine, plain, normed in (
            ("hooks", "tokext", "tokext_norms"),
            ("streaming", "tokext_streaming", "tokext_streaming_norms"),
        ):
            if plain in times and normed in times:
                lines.append(
                    f"| {seq_len} | {batch} | {seqs} | {engine} | {times[plain]:.3f} | {times[normed]:.3f} | "
                    f"{times[normed] / times[plain]:.3f} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
