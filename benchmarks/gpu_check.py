"""The GPU check: does tokext work, and what does it cost, on one CUDA GPU? (`make gpu-check`)

Runs, each in its own process, and prints one table:

1. the device tests on ``cuda``: ``tests/test_devices.py`` (its CUDA tests: one GPU, and a model split
   over two GPUs where there are two) and ``tests/test_conformance.py`` where it exists, with
   ``TOKEXT_TEST_DEVICE=cuda``;
2. the attention-statistics and intervention benchmarks at T = 2,048 and 8,192 in bf16, as ratios
   to a forward pass of the same checkpoint with transformers' fused SDPA attention (the eager
   forward pass that tokext needs is in the table too), for the hook engine and the streaming
   engine (statistics, early-layer emulation, ACT);
3. a small sweep (``experiments/tiny.toml``, 2 items per cell) with ``--executor ray`` on a local
   cluster, two workers sharing the GPU (``num_gpus = 0.5``), and the same sweep serially on
   ``cuda``: the cells must agree.

Budget: under 10 minutes on one GPU with SmolLM2-135M (most of it is model loading, one process
per benchmark run). Exit status 0 when every check passed, 1 when one failed, and 3, with one line
and nothing run, when no CUDA GPU is present.

    python benchmarks/gpu_check.py                    # the whole check (needs CUDA)
    python benchmarks/gpu_check.py --device cpu --quick   # the same steps on the CPU at T = 64 (wiring only)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_GPU = 3
STATS_METHODS = "plain_forward,tokext"
INTERVENTION_METHODS = "plain_forward,EarlyLayerEmulation,SinkCalibration,SinkRebalance_first,AttentionTemperature"
STREAMING_METHODS = "sdpa_forward,streaming_engine,streaming_EarlyLayerEmulation,streaming_SinkCalibration"


def no_gpu_message() -> str | None:
    """One line saying why there is nothing to check, or None when a CUDA GPU is usable."""
    import torch

    if torch.cuda.is_available():
        return None
    build = torch.version.cuda or "none (a CPU build)"
    return (
        f"gpu-check: no CUDA GPU here (torch {torch.__version__}, CUDA build: {build}); nothing was run. "
        "Run it on a machine with a CUDA GPU and a CUDA build of torch."
    )


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {}))
        )
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        code, text = 124, f"timed out after {timeout:.0f} s\n{e.stdout or ''}"
    return code, text, time.perf_counter() - start


def pytest_summary(text: str) -> str:
    """pytest's closing counts (``12 passed, 1 skipped``), or the last line when there are none."""
    found = re.findall(
        r"(\d+ (?:passed|failed|skipped|errors?|xfailed|deselected))", text.splitlines()[-1] if text else ""
    )
    return ", ".join(found) if found else (text.strip().splitlines() or ["no output"])[-1][:120]


def ratio_rows(results: list[dict], baseline: str, what: str) -> list[dict]:
    """One table row per (T, method) of a benchmark's raw results: median s and the ratio to ``baseline``."""
    rows = []
    for t in sorted({r["seq_len"] for r in results}):
        at = [r for r in results if r["seq_len"] == t]
        base = [r for r in at if r["method"] == baseline and not r.get("failed")]
        for r in at:
            if r["method"] == baseline:
                continue
            if r.get("failed") or not base:
                rows.append(
                    {
                        "check": what,
                        "case": f"T={t} {r['method']}",
                        "ok": False,
                        "result": r.get("error", f"no {baseline} run"),
                        "seconds": None,
                    }
                )
                continue
            gpu = (
                f", peak {r['peak_gpu_mib']:.0f} MiB x{r['peak_gpu_mib'] / base[0]['peak_gpu_mib']:.2f}"
                if "peak_gpu_mib" in r
                else ""
            )
            rows.append(
                {
                    "check": what,
                    "case": f"T={t} {r['method']}",
                    "ok": True,
                    "result": f"{r['seconds']:.4f} s, x{r['seconds'] / base[0]['seconds']:.2f} {baseline}{gpu}",
                    "seconds": None,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    """The check's one table (Markdown): check, case, ok, result, seconds."""
    lines = ["| check | case | ok | result | s |", "|---|---|---|---|---|"]
    for r in rows:
        seconds = "" if r.get("seconds") is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['check']} | {r['case']} | {'yes' if r['ok'] else 'NO'} | {r['result']} | {seconds} |")
    return "\n".join(lines)


def check_tests(device: str) -> list[dict]:
    files = [f for f in ("tests/test_devices.py", "tests/test_conformance.py") if (ROOT / f).is_file()]
    code, text, seconds = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        600,
        env={"TOKEXT_TEST_DEVICE": device},
    )
    return [
        {
            "check": "tests",
            "case": f"{' '.join(files)} on {device}",
            "ok": code == 0,
            "result": pytest_summary(text),
            "seconds": seconds,
        }
    ]


def check_benchmark(script: str, methods: str, args: argparse.Namespace, what: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        lengths = (
            ["--lengths", args.seq_lens]
            if script == "streaming.py"
            else ["--seq-lens", args.seq_lens, "--baseline", "sdpa_forward"]
        )
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            "--model",
            args.model,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            *lengths,
            "--methods",
            methods,
            "--rounds",
            "1",
            "--repeats",
            str(args.repeats),
            "--out",
            str(raw),
        ]
        code, text, seconds = _run(cmd, 900)
        if code != 0 or not raw.is_file():
            return [
                {
                    "check": what,
                    "case": "run",
                    "ok": False,
                    "result": (text.strip().splitlines() or ["?"])[-1][:160],
                    "seconds": seconds,
                }
            ]
        rows = ratio_rows(json.loads(raw.read_text()), "sdpa_forward", what)
    rows.append(
        {
            "check": what,
            "case": "all",
            "ok": all(r["ok"] for r in rows),
            "result": f"{len(rows)} runs",
            "seconds": seconds,
        }
    )
    return rows


def check_ray_sweep(args: argparse.Namespace) -> list[dict]:
    """tiny.toml with --executor ray (two workers sharing the device), then serially; same cells."""
    import pandas as pd

    gpu = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gpu_check.toml"
        text = (ROOT / "experiments" / "tiny.toml").read_text()
        config.write_text(
            text.replace(
                "batch_size = 4",
                "batch_size = 4\n\n[resources]\nworkers = 2\n" + ("num_gpus = 0.5\n" if gpu else "num_gpus = 0\n"),
            )
        )
        base = [
            sys.executable,
            "-m",
            "tokext",
            "ablate",
            "--config",
            str(config),
            "--limit",
            str(args.sweep_items),
            "--quiet",
            "--model",
            args.model,
        ]
        code, text, ray_s = _run(
            base + ["--executor", "ray", "--out", f"{tmp}/ray"], 600, env={"RAY_USAGE_STATS_ENABLED": "0"}
        )
        rows = [
            {
                "check": "ray sweep",
                "case": "tiny.toml, 2 workers, --executor ray",
                "ok": code == 0,
                "result": "done" if code == 0 else (text.strip().splitlines() or ["?"])[-1][:160],
                "seconds": ray_s,
            }
        ]
        if code != 0:
            return rows
        code, text, serial_s = _run(base + ["--device", args.device, "--out", f"{tmp}/serial"], 600)
        if code != 0:
            rows.append(
                {
                    "check": "ray sweep",
                    "case": "serial",
                    "ok": False,
                    "result": (text.strip().splitlines() or ["?"])[-1][:160],
                    "seconds": serial_s,
                }
            )
            return rows
        a, b = (
            pd.read_csv(f"{tmp}/{d}/cells.csv", dtype={"cell_id": str}).set_index("cell_id").sort_index()
            for d in ("ray", "serial")
        )
        same_acc = a.index.equals(b.index) and (a["n_correct"] == b["n_correct"]).all()
        loss_gap = float((a["loss"] - b["loss"]).abs().max())
        rows.append(
            {
                "check": "ray sweep",
                "case": f"same {len(a)} cells as serial on {args.device}",
                "ok": bool(same_acc and loss_gap < 1e-2),
                "result": f"accuracy {'equal' if same_acc else 'DIFFERS'}, max |loss gap| {loss_gap:.2e}",
                "seconds": serial_s,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs the same steps to check the wiring")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--seq-lens", default="2048,8192")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep-items", type=int, default=2, help="items per cell of the Ray sweep")
    p.add_argument("--quick", action="store_true", help="T = 64, one timed run (for --device cpu)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        message = no_gpu_message()
        if message:
            print(message)
            return NO_GPU
    if args.quick:
        args.seq_lens, args.repeats = "64", 1
    start = time.perf_counter()
    rows = check_tests(args.device)
    rows += check_benchmark("attention_stats.py", STATS_METHODS, args, "attention stats")
    rows += check_benchmark("interventions.py", INTERVENTION_METHODS, args, "interventions")
    rows += check_benchmark("streaming.py", STREAMING_METHODS, args, "streaming engine")
    rows += check_ray_sweep(args)
    print(
        f"gpu-check: {args.model}, {args.dtype}, {args.device}, T = {args.seq_lens}; "
        f"{time.perf_counter() - start:.0f} s in all"
    )
    print(table(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
