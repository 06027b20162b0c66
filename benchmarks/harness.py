"""Shared benchmark harness: one subprocess per (method, configuration), runs interleaved.

Each worker process loads the model, runs one warm-up and ``repeats`` timed runs of a single
method, and prints one JSON line: median seconds, and peak resident memory (``ru_maxrss``) in
total and above what the process held before the first forward pass (on CUDA also the peak of
``torch.cuda.max_memory_allocated``). Ratios are always taken against the baseline method (the
plain eager forward pass unless ``--baseline`` says otherwise) measured in the same invocation.
``--device`` and ``--dtype`` choose where and in what precision the model runs; ``--seq-lens``
replaces the default sizes by one sequence of each length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_method(run: Callable[[], object], repeats: int, device: str = "cpu", warmup: bool = True) -> dict:
    """Warm up once (unless ``warmup=False``: long runs, where one untimed pass would double the
    cost), then time ``repeats`` runs; memory is measured around the warm-up as well.

    On CUDA each run is timed up to ``torch.cuda.synchronize()``, and the peak allocated GPU
    memory is reported as ``peak_gpu_mib``.
    """
    cuda = str(device).startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

        def timed():
            run()
            torch.cuda.synchronize()
    else:
        timed = run
    before = rss_mib()
    if warmup:
        timed()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        timed()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mib()
    out = {
        "seconds": statistics.median(times),
        "times": times,
        "peak_rss_mib": peak,
        "peak_extra_mib": peak - before,
        "baseline_rss_mib": before,
    }
    if cuda:
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_workers(
    script: str, jobs: Sequence[dict], rounds: int, *, memory_limit_gib: float | None = None, timeout: float = 1800
) -> list[dict]:
    """Run every job in its own process, ``rounds`` times, interleaving jobs within each round."""
    results = []
    for round_index in range(rounds):
        order = list(jobs) if round_index % 2 == 0 else list(reversed(jobs))
        for job in order:
            cmd = [sys.executable, script, "--worker", json.dumps(job)]
            env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
            if memory_limit_gib:
                env["TOKEXT_BENCH_MEMORY_LIMIT_GIB"] = str(memory_limit_gib)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not line:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                results.append(
                    {**job, "round": round_index, "failed": True, "error": f"exit {proc.returncode}: {tail[0][:160]}"}
                )
            else:
                results.append({**job, "round": round_index, **json.loads(line[-1])})
    return results


def limit_memory_from_env() -> None:
    """Cap the address space so a run that cannot fit fails with MemoryError instead of the OOM killer."""
    limit = os.environ.get("TOKEXT_BENCH_MEMORY_LIMIT_GIB")
    if limit:
        size = int(float(limit) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))


def ratio_table(results: list[dict], key: dict[str, str], baseline: str = "plain_forward") -> str:
    """Markdown table: per configuration and method, median time and peak memory, and ratios to baseline."""
    import pandas as pd

    frame = pd.DataFrame(results)
    config_cols = [c for c in key if c in frame.columns]
    ok = frame[~frame.get("failed", False).fillna(False).astype(bool)] if "failed" in frame else frame
    grouped = (
        ok.groupby(config_cols + ["method"], sort=False)
        .agg(
            seconds=("seconds", "median"),
            peak_rss_mib=("peak_rss_mib", "median"),
            peak_extra_mib=("peak_extra_mib", "median"),
        )
        .reset_index()
    )
    short = "plain" if baseline == "plain_forward" else baseline.removesuffix("_forward")
    gpu = "peak_gpu_mib" in ok.columns
    if gpu:
        gpu_peaks = ok.groupby(config_cols + ["method"], sort=False)["peak_gpu_mib"].median()
    lines = [
        "| " + " | ".join(key[c] for c in config_cols) + f" | method | median s | x {short} | peak RSS MiB | "
        f"x {short} | peak extra MiB |" + (f" peak GPU MiB | x {short} |" if gpu else ""),
        "|" + "---|" * (len(config_cols) + 6 + 2 * gpu),
    ]
    for config, group in grouped.groupby(config_cols, sort=False):
        config = config if isinstance(config, tuple) else (config,)
        base = group[group["method"] == baseline]
        if base.empty:
            continue
        base_s, base_m = float(base["seconds"].iloc[0]), float(base["peak_rss_mib"].iloc[0])
        for row in group.itertuples(index=False):
            line = (
                "| "
                + " | ".join(str(v) for v in config)
                + f" | {row.method} | {row.seconds:.3f} | {row.seconds / base_s:.2f} | {row.peak_rss_mib:.0f} | "
                f"{row.peak_rss_mib / base_m:.2f} | {row.peak_extra_mib:.0f} |"
            )
            if gpu:
                mine, theirs = gpu_peaks[(*config, row.method)], gpu_peaks[(*config, baseline)]
                line += f" {mine:.0f} | {mine / theirs:.2f} |"
            lines.append(line)
    failed = frame[frame["failed"].fillna(False).astype(bool)] if "failed" in frame else frame.iloc[0:0]
    for row in failed.to_dict("records"):
        lines.append(
            "| "
            + " | ".join(str(row.get(c)) for c in config_cols)
            + f" | {row['method']} | failed: {row['error']} | | | | |"
        )
    return "\n".join(lines)


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares: --quick, --model, --rounds, --repeats, --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (used by the tests)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="time the first run (for long runs, where a warm-up pass would double the cost)",
    )
    p.add_argument("--out", default=None, help="also write the raw results as JSON here")
    p.add_argument(
        "--methods", default=None, help="comma-separated subset of the methods (the baseline is always measured)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    p.add_argument("--seq-lens", default=None, help="comma-separated T values, one sequence each (e.g. 2048,8192)")
    p.add_argument(
        "--baseline",
        default="plain_forward",
        help="the method ratios are taken to: plain_forward (eager, hooks off) or sdpa_forward "
        "(transformers' fused attention)",
    )
    return p


def seq_len_configs(args: argparse.Namespace) -> list[dict] | None:
    """``--seq-lens``: one sequence of each length, batch 1 (None when not given)."""
    if not args.seq_lens:
        return None
    return [dict(seq_len=int(t), n_seqs=1, batch_size=1) for t in args.seq_lens.split(",") if t.strip()]


def load_for_job(job: dict):
    """The job's model on its device and dtype (threads limited on the CPU)."""
    import torch

    import tokext

    if job.get("device", "cpu") == "cpu":
        torch.set_num_threads(job.get("threads", 2))
    return tokext.load_model(job["model"], device=job.get("device", "cpu"), dtype=job.get("dtype", "float32"))


def sdpa_forward(job: dict, make_batches: Callable) -> Callable[[], None]:
    """A forward pass of the same checkpoint in transformers with fused (SDPA) attention, no hooks.

    ``make_batches(model)`` builds the job's token batches from anything with ``.tokenizer`` and
    ``.cfg.d_vocab`` (no TransformerLens model is loaded in this process, so memory is comparable).
    """
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokext.models.devices import resolve_dtype
    from tokext.models.loading import _resolve_spec

    if job.get("device", "cpu") == "cpu":
        torch.set_num_threads(job.get("threads", 2))
    hf_dir = _resolve_spec(job["model"])[0]
    hf = AutoModelForCausalLM.from_pretrained(
        hf_dir, attn_implementation="sdpa", dtype=resolve_dtype(job.get("dtype", "float32"))
    )
    hf = hf.to(job.get("device", "cpu")).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    batches = [
        b.to(job.get("device", "cpu"))
        for b in make_batches(SimpleNamespace(tokenizer=tokenizer, cfg=SimpleNamespace(d_vocab=hf.config.vocab_size)))
    ]

    def run():
        with torch.inference_mode():
            for tokens in batches:
                hf(tokens, use_cache=False)

    return run


def chosen_methods(args: argparse.Namespace, methods: Sequence[str]) -> list[str]:
    """``methods`` narrowed by ``--methods``; the baseline always stays first."""
    baseline = getattr(args, "baseline", "plain_forward")
    if baseline not in methods:
        raise SystemExit(f"unknown baseline {baseline!r}: choose from {list(methods)}")
    if not args.methods:
        return [baseline] + [m for m in methods if m != baseline]
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(methods))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {list(methods)}")
    return [baseline] + [m for m in methods if m in wanted and m != baseline]


def run_worker_if_asked(args: argparse.Namespace, worker: Callable[[dict], dict]) -> bool:
    """In a worker process (``--worker JOB``): run the job and print its JSON line."""
    if not args.worker:
        return False
    print(json.dumps(worker(json.loads(args.worker))))
    return True


def benchmark(
    script: str,
    title: str,
    args: argparse.Namespace,
    configs: Sequence[dict],
    methods: Sequence[str],
    rounds: int,
    repeats: int,
    memory_limit_gib: float | None = None,
) -> list[dict]:
    """Run every (configuration, method) job interleaved, print the ratio table, save raw JSON."""
    methods = chosen_methods(args, methods)
    device, dtype = getattr(args, "device", "cpu"), getattr(args, "dtype", "float32")
    jobs = [
        dict(model=args.model, method=m, repeats=repeats, device=device, dtype=dtype, **c)
        for c in configs
        for m in methods
    ]
    if device != "cpu":
        memory_limit_gib = None  # an address-space cap breaks CUDA's start-up
    results = run_workers(script, jobs, rounds, memory_limit_gib=memory_limit_gib)
    where = f"CPU ({os.cpu_count()} cores)" if device == "cpu" else device
    print(
        f"{title}: model {args.model}, {dtype}, {where}, "
        f"{rounds} round(s) x {repeats} timed run(s) after a warm-up, one process per run"
    )
    print(
        ratio_table(
            results,
            {"seq_len": "T", "batch_size": "batch", "n_seqs": "seqs"},
            baseline=getattr(args, "baseline", "plain_forward"),
        )
    )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results
