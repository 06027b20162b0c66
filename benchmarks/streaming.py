"""Attention statistics and interventions at long context, against a plain transformers SDPA forward pass.

Every method runs in its own process on the same one sequence of T natural-text tokens (MMLU test
questions, concatenated), and is timed after a warm-up; ratios are to ``sdpa_forward`` measured in
the same invocation, the pass a user runs otherwise. Every method computes the logits of the last
position only (``logits_to_keep=1``): the full logits (T x 49,152 for SmolLM2) would cost more
memory than all the attention. Methods:

- ``sdpa_forward``: ``AutoModelForCausalLM(attn_implementation="sdpa")`` on the same weights;
- ``eager_forward``: the same with eager attention (what TransformerLens runs);
- ``tl_forward``: the TransformerLens bridge, no hooks;
- ``tl_run_with_cache``: ``run_with_cache`` of every ``hook_pattern``, then the statistics;
- ``hf_output_attentions``: eager transformers with ``output_attentions``, then the statistics;
- ``hooks_engine`` / ``streaming_engine``: ``tokext.collect_attention_stats(engine=...)``;
- ``streaming_<Intervention>``: a forward pass under ``tokext.intervene(..., engine="streaming")``.

    python benchmarks/streaming.py                    # T = 2048 and 8192: statistics and interventions
    python benchmarks/streaming.py --lengths 512,2048,8192,16384,32768 --methods sdpa_forward,streaming_engine
    python benchmarks/streaming.py --figure figures/streaming_scaling.png --results runs/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import limit_memory_from_env, parser, ratio_table, run_workers, time_method  # noqa: E402

STATS = [
    "sdpa_forward",
    "eager_forward",
    "tl_forward",
    "tl_run_with_cache",
    "hf_output_attentions",
    "hooks_engine",
    "streaming_engine",
]
INTERVENTIONS = [
    "EarlyLayerEmulation",
    "SinkCalibration",
    "SinkRebalance",
    "AttentionTemperature",
    "PatternPatch",
    "HeadAblation",
]
METHODS = STATS + [f"streaming_{name}" for name in INTERVENTIONS]
EAGER = {"eager_forward", "tl_forward", "tl_run_with_cache", "hf_output_attentions", "hooks_engine"}


def _intervention(name: str, n_layers: int, n_heads: int):
    from tokext import interventions as ivs

    mid = n_layers // 2
    return {
        "EarlyLayerEmulation": ivs.EarlyLayerEmulation(),
        "SinkCalibration": ivs.SinkCalibration(),
        "SinkRebalance": ivs.SinkRebalance(),
        "AttentionTemperature": ivs.AttentionTemperature(2.0),
        "PatternPatch": ivs.PatternPatch(0, (1,)),
        "HeadAblation": ivs.HeadAblation([(mid, h) for h in range(n_heads)], "mean"),
    }[name]


def worker(job: dict) -> dict:
    import torch

    import tokext
    from tokext.attention.collect import batch_context, category_table
    from tokext.attention.stats import AttentionStats
    from tokext.evaluation.prompts import long_token_sequences
    from tokext.models.hooks import pattern_hook_name

    limit_memory_from_env()
    torch.set_num_threads(job.get("threads", 2))
    length, method = job["seq_len"], job["method"]
    device, dtype = job.get("device", "cpu"), getattr(torch, job.get("dtype", "float32"))
    model = tokext.load_model(job["model"], n_ctx=max(length, 8192), device=device, dtype=dtype)
    tokens = torch.tensor(long_token_sequences(model, length), device=device)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)

    categories = category_table(model)  # before the bridge is dropped for a plain transformers model

    def statistics_of(patterns):
        stats = AttentionStats(layers=list(range(n_layers)), n_heads=n_heads)
        stats.start(torch.device(device))
        stats.begin_batch(batch_context(tokens, torch.ones_like(tokens), [0], categories))
        for layer, pattern in enumerate(patterns):
            stats.update(layer, pattern)
        return stats.finish()

    if method in ("sdpa_forward", "eager_forward", "hf_output_attentions"):
        from transformers import AutoModelForCausalLM

        directory = model.original_model.config._name_or_path
        del model
        hf = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation="sdpa" if method == "sdpa_forward" else "eager"
        )
        hf = hf.to(device).eval()

        def run():
            with torch.inference_mode():
                out = hf(tokens, logits_to_keep=1, output_attentions=method == "hf_output_attentions")
                if method == "hf_output_attentions":
                    statistics_of(out.attentions)
    elif method == "tl_forward":

        def run():
            with torch.inference_mode():
                model(tokens, return_type=None, logits_to_keep=1)
    elif method == "tl_run_with_cache":

        def run():
            with torch.inference_mode():
                _, cache = model.run_with_cache(
                    tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"), logits_to_keep=1
                )
                statistics_of([cache[pattern_hook_name(layer)] for layer in range(n_layers)])
    elif method in ("hooks_engine", "streaming_engine"):
        engine = method.split("_")[0]

        def run():
            tokext.collect_attention_stats(model, tokens, batch_size=1, progress=False, engine=engine)
    elif method.startswith("streaming_"):
        intervention = _intervention(method.removeprefix("streaming_"), n_layers, n_heads)

        def run():
            with torch.inference_mode(), tokext.intervene(model, intervention, engine="streaming"):
                model(tokens, return_type=None, logits_to_keep=1)
    else:
        raise SystemExit(f"unknown method {method}")
    return time_method(run, job["repeats"], device=device, warmup=job.get("warmup", True))


def figure(results: list[dict], path: Path) -> None:
    """Time and peak memory against T, one line per method (log-log), from raw results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from tokext.viz import plots

    frame = pd.DataFrame(results)
    ok = frame[~frame.get("failed", pd.Series(False, index=frame.index)).fillna(False).astype(bool)]
    ok = ok.groupby(["method", "seq_len"], as_index=False)[["seconds", "peak_rss_mib"]].median()
    shown = ["sdpa_forward", "eager_forward", "tl_run_with_cache", "hooks_engine", "streaming_engine"]
    labels = {
        "sdpa_forward": "transformers SDPA",
        "eager_forward": "transformers eager",
        "tl_run_with_cache": "TL run_with_cache",
        "hooks_engine": "tokext, hook engine",
        "streaming_engine": "tokext, streaming engine",
    }
    plots.style()
    fig, axes = plt.subplots(1, 2, figsize=(plots.FULL_WIDTH, 2.8))
    for method in shown:
        rows = ok[ok["method"] == method].sort_values("seq_len")
        if rows.empty:
            continue
        for ax, column in zip(axes, ["seconds", "peak_rss_mib"]):
            ax.plot(
                rows["seq_len"],
                rows[column] / (1024 if column == "peak_rss_mib" else 1),
                marker="o",
                ms=3,
                label=labels[method],
            )
    failed = frame[frame.get("failed", pd.Series(False, index=frame.index)).fillna(False).astype(bool)]
    for row in failed.itertuples():
        if row.method in shown:
            axes[1].annotate("x", (row.seq_len, axes[1].get_ylim()[1]), color="0.4", ha="center", fontsize=6)
    for ax, label in zip(axes, ["seconds (one forward pass)", "peak RSS (GiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length T (tokens)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=6, frameon=False)
    model = frame["model"].iloc[0]
    note = (
        f"model {model} (fp32) | data: MMLU question texts, one sequence of T tokens | CPU, 2 threads | "
        "statistics of every layer and head; x: failed (out of memory) | benchmarks/streaming.py"
    )
    plots.save(fig, path.parent, path.stem, note)


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--lengths", default="2048,8192", help="comma-separated T")
    p.add_argument(
        "--memory-limit-gib",
        type=float,
        default=20.0,
        help="address-space cap per worker, so runs that cannot fit fail cleanly",
    )
    p.add_argument("--eager-up-to", type=int, default=8192, help="methods that hold [T, T] patterns run up to this T")
    p.add_argument("--figure", default=None, help="write the scaling figure (PNG + PDF) here")
    p.add_argument("--results", nargs="*", default=None, help="draw --figure from these saved results only")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.results:
        results = [r for path in args.results for r in json.loads(Path(path).read_text())]
    else:
        lengths = [64] if args.quick else [int(x) for x in args.lengths.split(",")]
        methods = (
            [m.strip() for m in args.methods.split(",")]
            if args.methods
            else (
                ["sdpa_forward", "hooks_engine", "streaming_engine", "streaming_SinkCalibration"]
                if args.quick
                else METHODS
            )
        )
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}: choose from {METHODS}")
        if "sdpa_forward" not in methods:
            methods = ["sdpa_forward", *methods]
        jobs = [
            dict(
                model=args.model,
                method=m,
                seq_len=t,
                repeats=1 if args.quick else args.repeats,
                warmup=not args.no_warmup,
                device=args.device,
                dtype=args.dtype,
            )
            for t in lengths
            for m in methods
            if not (m in EAGER and t > args.eager_up_to)
        ]
        rounds = 1 if args.quick else args.rounds
        results = run_workers(__file__, jobs, rounds, memory_limit_gib=args.memory_limit_gib, timeout=6 * 3600)
        import os

        where = f"CPU ({os.cpu_count()} cores, 2 threads)" if args.device == "cpu" else args.device
        print(
            f"streaming engine vs a transformers SDPA forward pass: model {args.model}, {args.dtype}, {where}, "
            f"{rounds} round(s) x {jobs[0]['repeats']} timed run(s) {'without' if args.no_warmup else 'after a'} "
            "warm-up, one process per run, one sequence of T tokens"
        )
        print(ratio_table(results, {"seq_len": "T"}, baseline="sdpa_forward").replace("x plain", "x SDPA"))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    if args.figure:
        figure(results, Path(args.figure))
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
