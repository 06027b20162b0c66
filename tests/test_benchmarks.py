"""The benchmark scripts run and print their ratio tables (timings are never asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["attention_stats.py", "interventions.py"])
def test_benchmark_quick_prints_ratio_table(script, smollm2):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| T | batch") and "x plain" in lines[0]
    body = lines[2:]
    assert any("| plain_forward |" in ln and "| 1.00 |" in ln for ln in body)
    assert len(body) >= 3 and not any("failed" in ln for ln in body), proc.stdout


@pytest.mark.slow
def test_streaming_benchmark_quick_table_and_figure(smollm2, tmp_path):
    raw, figure = tmp_path / "raw.json", tmp_path / "scaling.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "streaming.py"),
            "--quick",
            "--out",
            str(raw),
            "--methods",
            "sdpa_forward,eager_forward,hooks_engine,streaming_engine,streaming_SinkCalibration",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| T | method") and "x sdpa" in lines[0]
    body = lines[2:]
    assert any("| sdpa_forward |" in ln and "| 1.00 |" in ln for ln in body)
    assert len(body) == 5 and not any("failed" in ln for ln in body), proc.stdout
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "streaming.py"), "--figure", str(figure), "--results", str(raw)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert figure.is_file() and figure.with_suffix(".pdf").is_file()
