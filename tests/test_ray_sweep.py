"""The Ray executor on a local 2-CPU cluster this module starts: same results as the serial
executor, a worker killed in the middle of a cell, a driver interrupted with SIGINT, bad input.

The model is a tiny random Llama saved to a directory, so Ray workers load it by path themselves.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.test_evaluate import tiny_eval_model_dir

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments" / "tiny.toml"
VALUES = [
    "cell_id",
    "baseline_id",
    "config_hash",
    "model",
    "task",
    "method",
    "level",
    "cot",
    "seed",
    "label",
    "intervention",
    "params",
    "n_items",
    "accuracy",
    "acc_norm",
    "loss",
    "n_correct",
    "spec",
]
"""cells.csv columns that a cell's result fixes (not its timing, date or revision)."""


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: 2 CPUs, no dashboard, no usage statistics."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_eval_model_dir(str(tmp_path_factory.mktemp("ray_tiny"))))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """The serial reference runs on one thread, as each 1-CPU Ray worker does (same float sums)."""


def _sweep(out, model_dir, config=TINY, **kw):
    from tokext.studies.sweep import run_sweep

    kw.setdefault("log", lambda m: None)
    return run_sweep(config, out, models=[model_dir], limit=3, progress=False, **kw)


@pytest.fixture(scope="module")
def serial(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "tiny"
    return out, _sweep(out, model_dir)


def _same_results(out, reference):
    """Every cell of ``reference`` is in ``out`` once, with the same values and byte-identical items."""
    ref_dir, ref_table = reference
    rows = pd.read_csv(out / "cells.csv", dtype=str, keep_default_na=False)
    assert rows["cell_id"].is_unique and set(rows["cell_id"]) == set(ref_table["cell_id"])
    ref_rows = pd.read_csv(ref_dir / "cells.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(
        rows.set_index("cell_id").loc[ref_rows["cell_id"], VALUES[1:]].reset_index(drop=True), ref_rows[VALUES[1:]]
    )
    for cid in ref_table["cell_id"]:
        assert (out / "items" / f"{cid}.csv").read_bytes() == (ref_dir / "items" / f"{cid}.csv").read_bytes(), cid
    assert not list(out.rglob("*.partial"))


def test_ray_gives_the_serial_results(cluster, model_dir, serial, tmp_path):
    from tokext.studies.sweep import summarize

    out = tmp_path / "ray"
    messages: list[str] = []
    table = _sweep(out, model_dir, executor="ray", log=messages.append)
    assert len(table) == 12
    assert any(m.startswith("ray: 2 worker(s)") for m in messages)
    _same_results(out, serial)
    stats = ["cell_id", "diff", "ci_lo", "ci_hi", "p_mcnemar", "n01", "n10", "delta_loss"]
    ours, theirs = (
        summarize(d, n_boot=200, write=False)[stats].sort_values("cell_id").reset_index(drop=True)
        for d in (out, serial[0])
    )  # rows in the order cells finished: Ray's differs
    pd.testing.assert_frame_equal(ours, theirs)


def _dies_once(marker: str, spec: str):
    """A loader whose model kills its own worker process (SIGKILL) in the middle of its first forward
    pass after loading, once per ``marker`` file: the file records the pid that died."""
    from tokext.models.loading import load_model

    model = load_model(spec)

    def kill(module, args):
        if not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    model.blocks[1].register_forward_pre_hook(kill)
    return model


def _always_dies(spec: str):
    os.kill(os.getpid(), signal.SIGKILL)


def test_worker_killed_mid_cell_is_retried(cluster, model_dir, serial, tmp_path):
    import ray

    marker = tmp_path / "killed.pid"
    out = tmp_path / "fault"
    messages: list[str] = []
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests
    _sweep(out, model_dir, executor="ray", loader=functools.partial(_dies_once, str(marker)), log=messages.append)
    dead = int(marker.read_text())
    with pytest.raises(ProcessLookupError):  # the worker process really is gone
        os.kill(dead, 0)
    retries = [m for m in messages if "died during cell" in m]
    assert len(retries) == 1 and "retrying it (1/3)" in retries[0], messages
    _same_results(out, serial)


def test_worker_that_always_dies_stops_after_max_retries(cluster, model_dir, tmp_path):
    import ray

    from tokext.errors import ClusterError
    from tokext.studies.config import load_config
    from tokext.studies.executors import RayExecutor

    config = load_config(TINY)
    config = config.replace(tasks=config.tasks[1:], interventions=(), resources=config.resources.replace(max_retries=1))
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    messages: list[str] = []
    with pytest.raises(ClusterError, match=r"worker died 2 times \(max_retries = 1\)"):
        _sweep(
            tmp_path / "doomed",
            model_dir,
            config,
            executor=RayExecutor(workers=1),
            loader=_always_dies,
            log=messages.append,
        )
    assert sum("died during cell" in m for m in messages) == 1
    assert len(pd.read_csv(tmp_path / "doomed" / "cells.csv")) == 0  # nothing half-written


def _many_cells_config(tmp_path, model_dir) -> Path:
    """tiny.toml on four seeds (48 cells), long enough to interrupt in the middle."""
    text = TINY.read_text().replace('models = ["smollm2-135m"]', f"models = [{model_dir!r}]")
    text = text.replace("seeds = [0]", "seeds = [0, 1, 2, 3]")
    path = tmp_path / "many.toml"
    path.write_text(text)
    return path


def test_sigint_to_the_driver_then_rerun_loses_and_duplicates_nothing(cluster, model_dir, tmp_path):
    config = _many_cells_config(tmp_path, model_dir)
    out = tmp_path / "interrupted"
    cells_csv = out / "cells.csv"
    cmd = [
        sys.executable,
        "-m",
        "tokext",
        "ablate",
        "--config",
        str(config),
        "--out",
        str(out),
        "--limit",
        "3",
        "--quiet",
        "--executor",
        "ray",
        "--address",
        cluster,
    ]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONWARNINGS="ignore")
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None:
        if cells_csv.exists() and len(cells_csv.read_text().splitlines()) >= 3:  # header + 2 finished cells
            break
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 130, stderr
    assert "interrupted" in stderr
    first = pd.read_csv(cells_csv, dtype=str, keep_default_na=False)
    assert 2 <= len(first) < 48 and first["cell_id"].is_unique

    from tokext.studies.sweep import run_sweep

    # the rerun, without --address, starts (and stops) a local cluster of its own
    rerun = subprocess.run(cmd[:-2], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"48 cells; results in {out}/" in rerun.stdout
    rows = pd.read_csv(cells_csv, dtype=str, keep_default_na=False)
    assert len(rows) == 48 and rows["cell_id"].is_unique
    pd.testing.assert_frame_equal(rows.iloc[: len(first)].reset_index(drop=True), first)  # finished rows untouched
    serial = tmp_path / "serial"
    run_sweep(config, serial, limit=3, progress=False, log=lambda m: None)
    _same_results(out, (serial, pd.read_csv(serial / "cells.csv", dtype={"cell_id": str})))


def test_gpus_asked_for_where_the_cluster_has_none(cluster, model_dir, tmp_path):
    from tokext.errors import InputError
    from tokext.studies.config import load_config

    config = load_config(TINY)
    config = config.replace(resources=config.resources.replace(num_gpus=1.0))
    with pytest.raises(InputError, match="num_gpus = 1 per worker, and the Ray cluster has no GPU"):
        _sweep(tmp_path / "gpu", model_dir, config, executor="ray")


def test_address_pointing_nowhere_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokext",
            "ablate",
            "--config",
            str(TINY),
            "--out",
            str(tmp_path / "x"),
            "--executor",
            "ray",
            "--address",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"tokext ablate: error: no Ray cluster at 127.0.0.1:{port}: 127.0.0.1:{port} does not answer "
        "(Connection refused); start one there with `ray start --head`, or leave out --address to "
        "start a local cluster"
    ], proc.stderr
    assert time.monotonic() - start < 60


def test_missing_ray_names_the_extra(monkeypatch, capsys):
    from tokext.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert main(["ablate", "--config", str(TINY), "--executor", "ray"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tokext ablate: error: --executor ray needs Ray, which is not installed: pip install 'tokext[ray]'"
    )


def test_reproduce_sweep_step_on_ray(cluster, model_dir, tmp_path):
    """`tokext reproduce --executor ray`: a sweep step's cells load the model in the workers and
    give the serial step's results."""
    from tokext.models.loading import load_model
    from tokext.studies.executors import RayExecutor
    from tokext.studies.reproduce import Reproduction

    model = load_model(model_dir)
    folders = {}
    for name, executor in (("serial", "serial"), ("ray", RayExecutor())):
        rep = Reproduction("quick", results=tmp_path / name, executor=executor, log=lambda m: None)
        folders[name] = tmp_path / name / "mmlu"
        folders[name].mkdir(parents=True)
        rep._sweep(folders[name], "reproduce_mmlu.toml", [], 2, model=model, model_spec=model_dir)
        assert (folders[name] / "summary.csv").is_file() and (folders[name] / "provenance.json").is_file()
    serial = pd.read_csv(folders["serial"] / "cells.csv", dtype={"cell_id": str})
    assert len(serial) == 12
    _same_results(folders["ray"], (folders["serial"], serial))
