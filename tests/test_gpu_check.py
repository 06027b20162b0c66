"""benchmarks/gpu_check.py: the no-GPU exit, and the table it prints from raw benchmark results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_without_a_gpu_it_says_so_in_one_line_and_exits_3():
    if torch.cuda.is_available():  # here the check would run for minutes: only the probe is checked
        assert gpu_check.no_gpu_message() is None
        return
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == gpu_check.NO_GPU == 3
    lines = proc.stdout.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU here (torch ") and "nothing was run" in lines[0]
    )


def test_ratio_rows_and_table():
    raw = [
        {"seq_len": 2048, "method": "sdpa_forward", "seconds": 0.010, "peak_gpu_mib": 400.0},
        {"seq_len": 2048, "method": "tokext", "seconds": 0.025, "peak_gpu_mib": 1000.0},
        {"seq_len": 8192, "method": "sdpa_forward", "seconds": 0.080, "peak_gpu_mib": 800.0},
        {"seq_len": 8192, "method": "tokext", "failed": True, "error": "exit 1: CUDA out of memory"},
    ]
    rows = gpu_check.ratio_rows(raw, "sdpa_forward", "attention stats")
    assert [r["case"] for r in rows] == ["T=2048 tokext", "T=8192 tokext"]
    assert rows[0]["ok"] and rows[0]["result"] == "0.0250 s, x2.50 sdpa_forward, peak 1000 MiB x2.50"
    assert not rows[1]["ok"] and rows[1]["result"] == "exit 1: CUDA out of memory"
    text = gpu_check.table(rows + [{"check": "tests", "case": "x", "ok": True, "result": "3 passed", "seconds": 12.4}])
    assert text.splitlines() == [
        "| check | case | ok | result | s |",
        "|---|---|---|---|---|",
        "| attention stats | T=2048 tokext | yes | 0.0250 s, x2.50 sdpa_forward, peak 1000 MiB x2.50 |  |",
        "| attention stats | T=8192 tokext | NO | exit 1: CUDA out of memory |  |",
        "| tests | x | yes | 3 passed | 12 |",
    ]


def test_pytest_summary():
    assert gpu_check.pytest_summary("....\n12 passed, 3 skipped in 5.01s") == "12 passed, 3 skipped"
    assert gpu_check.pytest_summary("F.\n1 failed, 1 passed in 2.0s") == "1 failed, 1 passed"
    assert gpu_check.pytest_summary("ImportError: no module") == "ImportError: no module"
