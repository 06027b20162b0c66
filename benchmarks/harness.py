"""Shared benchmark harness: one subprocess per (method, configuration), runs interleaved.

Each worker process loads the model, runs one warm-up and ``repeats`` timed runs of a single
method, and prints one JSON line: median seconds, and peak resident memory (``ru_maxrss``) in
total and above what the process held before the first forward pass. Ratios are always taken
against the plain forward pass measured in the same invocation.
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
from pathlib import Path
from typing import Callable, Sequence


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_method(run: Callable[[], object], repeats: int) -> dict:
    """Warm up once, then time ``repeats`` runs; memory is measured around the warm-up as well."""
    before = rss_mib()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mib()
    return {"seconds": statistics.median(times), "times": times, "peak_rss_mib": peak,
            "peak_extra_mib": peak - before, "baseline_rss_mib": before}


def run_workers(script: str, jobs: Sequence[dict], rounds: int, *, memory_limit_gib: float | None = None,
                timeout: float = 1800) -> list[dict]:
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
            line = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode != 0 or not line:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                results.append({**job, "round": round_index, "failed": True,
                                "error": f"exit {proc.returncode}: {tail[0][:160]}"})
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
    grouped = ok.groupby(config_cols + ["method"], sort=False).agg(
        seconds=("seconds", "median"), peak_rss_mib=("peak_rss_mib", "median"),
        peak_extra_mib=("peak_extra_mib", "median")).reset_index()
    lines = ["| " + " | ".join(key[c] for c in config_cols) + " | method | median s | x plain | peak RSS MiB | x plain | peak extra MiB |",
             "|" + "---|" * (len(config_cols) + 6)]
    for config, group in grouped.groupby(config_cols, sort=False):
        config = config if isinstance(config, tuple) else (config,)
        base = group[group["method"] == baseline]
        if base.empty:
            continue
        base_s, base_m = float(base["seconds"].iloc[0]), float(base["peak_rss_mib"].iloc[0])
        for row in group.itertuples(index=False):
            lines.append("| " + " | ".join(str(v) for v in config) +
                         f" | {row.method} | {row.seconds:.3f} | {row.seconds / base_s:.2f} | {row.peak_rss_mib:.0f} | "
                         f"{row.peak_rss_mib / base_m:.2f} | {row.peak_extra_mib:.0f} |")
    failed = frame[frame["failed"].fillna(False).astype(bool)] if "failed" in frame else frame.iloc[0:0]
    for row in failed.to_dict("records"):
        lines.append("| " + " | ".join(str(row.get(c)) for c in config_cols) + f" | {row['method']} | failed: {row['error']} | | | | |")
    return "\n".join(lines)


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark script shares: --quick, --model, --rounds, --repeats, --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (used by the tests)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the raw results as JSON here")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the methods (plain_forward is always measured)")
    return p


def chosen_methods(args: argparse.Namespace, methods: Sequence[str]) -> list[str]:
    """``methods`` narrowed by ``--methods``; the plain forward pass always stays first."""
    if not args.methods:
        return list(methods)
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(methods))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {list(methods)}")
    return ["plain_forward"] + [m for m in methods if m in wanted and m != "plain_forward"]


def run_worker_if_asked(args: argparse.Namespace, worker: Callable[[dict], dict]) -> bool:
    """In a worker process (``--worker JOB``): run the job and print its JSON line."""
    if not args.worker:
        return False
    print(json.dumps(worker(json.loads(args.worker))))
    return True


def benchmark(script: str, title: str, args: argparse.Namespace, configs: Sequence[dict], methods: Sequence[str],
              rounds: int, repeats: int, memory_limit_gib: float | None = None) -> list[dict]:
    """Run every (configuration, method) job interleaved, print the ratio table, save raw JSON."""
    methods = chosen_methods(args, methods)
    jobs = [dict(model=args.model, method=m, repeats=repeats, **c) for c in configs for m in methods]
    results = run_workers(script, jobs, rounds, memory_limit_gib=memory_limit_gib)
    print(f"{title}: model {args.model}, fp32, CPU ({os.cpu_count()} cores), "
          f"{rounds} round(s) x {repeats} timed run(s) after a warm-up, one process per run")
    print(ratio_table(results, {"seq_len": "T", "batch_size": "batch", "n_seqs": "seqs"}))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results
