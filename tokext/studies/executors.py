"""Where a sweep's cells run: one after another in this process, or spread over a Ray cluster.

An executor takes the cells still to run and hands each finished one back to the driver
(:func:`tokext.studies.sweep.run_sweep`) as ``done(cell, items_frame, seconds)``; the driver is the
only writer of results (each cell's items file atomically, then its row of ``cells.csv``), so both
executors give the same results layout, and ``--summarize``, ``tokext figures`` and resuming work
the same whichever ran the cells.

- :class:`SerialExecutor` (the default): loads each model once in this process and runs its cells
  in order.
- :class:`RayExecutor`: ``workers`` Ray actors, each loading its model once and then serving many
  cells, with ``num_cpus`` / ``num_gpus`` per actor (``[resources]`` in the config). A cell whose
  worker dies (the process is killed, runs out of memory, or its node goes away) is handed to a
  restarted worker, at most ``max_retries`` times. Ray is the optional extra ``tokext[ray]``.

A worker returns a cell's per-item frame; nothing is written on the workers, so a cell is never
half-written and an interrupted driver loses only the cells in flight.

An executor is any object with ``name``, ``connect()`` (reach what it needs, before the sweep
writes anything), ``run(config, cells, items, done, *, loader, progress, log)`` and ``close()``;
:func:`make_executor` builds one by name.
"""

from __future__ import annotations

import collections
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tokext.errors import ClusterError, InputError, MissingExtraError, TokextError

if TYPE_CHECKING:
    import pandas as pd

    from tokext.studies.config import StudyConfig

Cell = Any
"""A :class:`tokext.studies.sweep.Cell` (not imported: the sweep module imports this one)."""
Done = Callable[[Cell, "pd.DataFrame", float], None]
Loader = Callable[[str], Any]
EXECUTORS = ("serial", "ray")
RAY_EXTRA = "pip install 'tokext[ray]'"


# ---------------------------------------------------------------------- one cell, wherever it runs


def check_interventions(model: Any, model_name: str, labelled: Sequence[tuple[str, Any]], source: str | None) -> None:
    """Bind every intervention to ``model`` once (no forward pass): a bad layer or head fails before a
    cell runs, with the config and the label in the message."""
    from tokext.interventions import intervene

    for label, intervention in labelled:
        try:
            with intervene(model, intervention):
                pass
        except TokextError as e:
            raise type(e)(f"{source}: intervention {label!r} on {model_name}: {e}") from None


def run_cell(
    model: Any, cell: Cell, items: Any, batch_size: int, progress: bool = False, engine: str = "hooks"
) -> tuple[pd.DataFrame, float]:
    """Evaluate one cell on a loaded model with attention run by ``engine``: its per-item frame
    (``cell_id`` first) and the seconds it took."""
    from tokext.evaluation.evaluate import evaluate

    start = time.perf_counter()
    interventions = [] if cell.intervention is None else [cell.intervention]
    frame = evaluate(
        model, cell.spec, interventions, batch_size=batch_size, progress=progress, items=items, engine=engine
    )
    seconds = time.perf_counter() - start
    frame.insert(0, "cell_id", cell.id)
    return frame, seconds


def model_interventions(cells: Sequence[Cell], model_name: str) -> list[tuple[str, Any]]:
    """``(label, intervention)`` of each distinct intervention among ``model_name``'s cells."""
    distinct = {
        c.intervention_repr: (c.label, c.intervention)
        for c in cells
        if c.model == model_name and c.intervention is not None
    }
    return list(distinct.values())


def default_loader(config: StudyConfig) -> Loader:
    """Model spec -> :func:`tokext.models.load_model` with the config's dtype and placement."""
    options = config.load_options()

    def load(spec: str) -> Any:
        from tokext.models.loading import load_model

        return load_model(spec, **options)

    return load


# ---------------------------------------------------------------------- serial


class SerialExecutor:
    """Every cell in this process, model by model, in config order (the default)."""

    name = "serial"

    def run(
        self,
        config: StudyConfig,
        cells: Sequence[Cell],
        items: dict,
        done: Done,
        *,
        loader: Loader | None = None,
        progress: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        """Run ``cells``; ``loader`` (default: :func:`default_loader`) loads each model once."""
        loader = loader or default_loader(config)
        for model_name in config.models:
            mine = [c for c in cells if c.model == model_name]
            if not mine:
                continue
            model = loader(model_name)
            check_interventions(model, model_name, model_interventions(mine, model_name), config.source)
            for cell in mine:
                frame, seconds = run_cell(model, cell, items[cell.spec], config.batch_size, progress, config.engine)
                done(cell, frame, seconds)
            del model

    def connect(self) -> None:
        """Nothing to reach."""

    def close(self) -> None:
        """Nothing to release."""


# ---------------------------------------------------------------------- Ray


def import_ray() -> Any:
    """The ``ray`` module, or :class:`MissingExtraError` naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError(f"--executor ray needs Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast when nothing listens at a ``host:port`` / ``ray://host:port`` address.

    ``ray.init`` itself keeps retrying an address that does not answer for minutes.
    """
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"--address {address!r} is not host:port (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(
            f"no Ray cluster at {address}: {host}:{port} does not answer ({e.strerror or e}); "
            "start one there with `ray start --head`, or leave out --address to start a local "
            "cluster"
        ) from None


class _Worker:
    """A Ray actor: loads one model at a time (on its first cell of that model) and serves cells."""

    def __init__(self, loader: Loader, threads: int):
        import torch
        from transformers.utils import logging as hf_logging

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        hf_logging.disable_progress_bar()  # workers' output reaches the driver's terminal
        torch.set_num_threads(max(1, threads))
        self.loader, self.model_name, self.model = loader, None, None

    def pid(self) -> int:
        return os.getpid()

    def run(
        self, cell: Cell, items: Any, batch_size: int, labelled: list, source: str | None, engine: str = "hooks"
    ) -> tuple:
        if cell.model != self.model_name:
            self.model, self.model_name = None, None  # one model per worker: free the old one first
            model = self.loader(cell.model)
            check_interventions(model, cell.model, labelled, source)
            self.model, self.model_name = model, cell.model
        frame, seconds = run_cell(self.model, cell, items, batch_size, engine=engine)
        return frame, seconds, os.getpid()


class RayExecutor:
    """Cells as tasks of Ray actors (one model each, many cells), with retries when a worker dies.

    ``address``: a running cluster (``host:port`` of ``ray start --head``, ``ray://host:10001``, or
    ``auto``); ``None`` starts a local cluster on this machine (or uses the one this process already
    joined), shut down again by :meth:`close`. ``workers`` overrides ``[resources] workers``.
    ``connect_timeout``: seconds before an address that does not answer is an error;
    ``recovery_timeout``: seconds a dead worker has to come back (Ray restarts it, on another node
    if its own is gone) before the sweep stops.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        *,
        connect_timeout: float = 30.0,
        recovery_timeout: float = 600.0,
    ):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InputError(f"workers must be a positive integer, got {workers!r}")
        self.address, self.workers, self.connect_timeout = address, workers, connect_timeout
        self.recovery_timeout = recovery_timeout
        self.ray = import_ray()
        self._started = False

    # ------------------------------------------------------------------ the cluster

    def connect(self) -> None:
        """Join (or start) the cluster, bounded by ``connect_timeout``."""
        ray = self.ray
        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
        if not self.address or self.address == "local":
            # a new local cluster starts in this (the main) thread: Ray ties its processes' lives
            # to the thread that started them (PR_SET_PDEATHSIG), so a helper thread would kill them
            try:
                ray.init(**kwargs)
            except Exception as e:  # noqa: BLE001 - one line for the user
                raise ClusterError(f"cannot start a local Ray cluster: {' '.join(str(e).split())[:300]}") from None
            self._started = True
            return
        _check_reachable(self.address, timeout=min(5.0, self.connect_timeout))
        kwargs["address"] = self.address
        failure: list[BaseException] = []  # joining only: bounded by a thread, since ray.init keeps retrying

        def init() -> None:
            try:
                ray.init(**kwargs)
            except BaseException as e:  # noqa: BLE001 - reported in the calling thread
                failure.append(e)

        thread = threading.Thread(target=init, daemon=True)
        thread.start()
        thread.join(self.connect_timeout)
        if thread.is_alive():
            raise ClusterError(f"no Ray cluster answered at {self.address} within {self.connect_timeout:.0f} s")
        if failure:
            raise ClusterError(
                f"cannot connect to the Ray cluster at {self.address}: {' '.join(str(failure[0]).split())[:300]}"
            ) from None

    def close(self) -> None:
        """Shut down the local cluster this executor started (a cluster it joined keeps running)."""
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False

    def _plan(self, config: StudyConfig, n_cells: int, log: Callable[[str], None]) -> tuple[int, float, float]:
        """(workers, CPUs and GPUs per worker), checked against what the cluster has."""
        res = config.resources
        total = self.ray.cluster_resources()
        cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
        num_gpus = res.num_gpus if res.num_gpus is not None else (1.0 if gpus > 0 else 0.0)
        num_cpus = res.num_cpus
        if num_gpus > 0 and gpus == 0:
            raise InputError(
                f"{config.source}: [resources] num_gpus = {num_gpus:g} per worker, and the Ray cluster "
                f"has no GPU ({cpus:g} CPUs): set num_gpus = 0 to run the workers on CPUs"
            )
        if num_gpus > gpus:
            raise InputError(
                f"{config.source}: [resources] num_gpus = {num_gpus:g} per worker, and the Ray cluster "
                f"has {gpus:g} GPU(s)"
            )
        if num_cpus > cpus:
            raise InputError(
                f"{config.source}: [resources] num_cpus = {num_cpus:g} per worker, and the Ray cluster "
                f"has {cpus:g} CPU(s)"
            )
        fit = math.floor(gpus / num_gpus + 1e-9) if num_gpus > 0 else math.floor(cpus / num_cpus + 1e-9)
        fit = min(fit, math.floor(cpus / num_cpus + 1e-9))
        wanted = self.workers or res.workers or fit
        workers = max(1, min(wanted, fit, n_cells))
        if wanted > fit:
            log(
                f"ray: {wanted} workers asked for, the cluster has room for {fit} "
                f"({cpus:g} CPUs, {gpus:g} GPUs; {num_cpus:g} CPU and {num_gpus:g} GPU each): running {workers}"
            )
        return workers, num_cpus, num_gpus

    def _loader(self, config: StudyConfig, num_gpus: float) -> Loader:
        """On a GPU worker the model goes to CUDA unless the config places it; 2+ GPUs split it."""
        res = config.resources
        if num_gpus > 0 and res.device is None and res.device_map is None and res.n_devices is None:
            extra = {"n_devices": int(num_gpus)} if num_gpus >= 2 else {"device": "cuda"}
            config = config.replace(resources=res.replace(**extra))
        return default_loader(config)

    # ------------------------------------------------------------------ running

    def run(
        self,
        config: StudyConfig,
        cells: Sequence[Cell],
        items: dict,
        done: Done,
        *,
        loader: Loader | None = None,
        progress: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        """Run ``cells`` on the cluster; ``done`` is called in this process as each one finishes.

        ``loader`` (default: :func:`tokext.models.load_model` with the config's dtype and placement)
        is shipped to every worker, so it must be picklable and must not hold a loaded model.
        """
        ray = self.ray
        if not cells:
            return
        self.connect()
        n_workers, num_cpus, num_gpus = self._plan(config, len(cells), log)
        loader = loader or self._loader(config, num_gpus)
        actor_cls = ray.remote(_Worker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0
        )
        threads = max(1, int(num_cpus))
        actors = [actor_cls.remote(loader, threads) for _ in range(n_workers)]
        log(f"ray: {n_workers} worker(s), {num_cpus:g} CPU and {num_gpus:g} GPU each, for {len(cells)} cells")
        try:
            self._serve(config, list(cells), items, done, actors, log)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)

    def _serve(
        self, config: StudyConfig, cells: list, items: dict, done: Done, actors: list, log: Callable[[str], None]
    ) -> None:
        """Hand out cells to idle workers until every cell is done.

        A worker whose process dies is restarted by Ray (``max_restarts``); its cell goes back to
        the front of the queue (at most ``max_retries`` times per cell), and the worker gets new
        cells once a probe call answers again.
        """
        ray = self.ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError, RayTaskError

        queue = collections.deque(cells)
        labelled = {m: model_interventions(cells, m) for m in {c.model for c in cells}}
        refs = {spec: ray.put(items[spec]) for spec in {c.spec for c in cells}}
        holds: list[str | None] = [None] * len(actors)  # the model each worker has loaded
        idle = list(range(len(actors)))
        cells_in_flight: dict[Any, tuple[int, Any]] = {}
        probes: dict[Any, tuple[int, float]] = {}  # probe ref -> (worker, when it died)
        later: list[tuple[float, int, float]] = []  # (when, worker, when it died): probes to send again
        failures: collections.Counter = collections.Counter()
        max_retries = config.resources.max_retries

        def submit(worker: int) -> None:
            # prefer a cell of the model this worker already holds: each worker loads a model once
            pick = next((c for c in queue if c.model == holds[worker]), queue[0])
            queue.remove(pick)
            ref = actors[worker].run.remote(
                pick, refs[pick.spec], config.batch_size, labelled[pick.model], config.source, config.engine
            )
            cells_in_flight[ref] = (worker, pick)

        def probe(worker: int, since: float) -> None:
            probes[actors[worker].pid.remote()] = (worker, since)

        while queue or cells_in_flight:
            now = time.monotonic()
            for entry in [e for e in later if e[0] <= now]:
                later.remove(entry)
                probe(entry[1], entry[2])
            while idle and queue:
                submit(idle.pop(0))
            waiting = list(cells_in_flight) + list(probes)
            if not waiting:
                time.sleep(0.2)
                continue
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5 if later else None)
            if not ready:
                continue
            ref = ready[0]
            if ref in probes:
                worker, since = probes.pop(ref)
                try:
                    ray.get(ref)
                except ActorUnavailableError:  # still restarting
                    if time.monotonic() - since > self.recovery_timeout:
                        raise ClusterError(
                            f"ray: worker {worker} did not come back within {self.recovery_timeout:.0f} s of dying"
                        ) from None
                    later.append((time.monotonic() + 0.5, worker, since))
                except ActorDiedError as e:  # gone for good (e.g. tokext does not import on its node)
                    raise ClusterError(
                        f"ray: worker {worker} cannot be restarted: {' '.join(str(e).split())[:300]}"
                    ) from None
                else:
                    idle.append(worker)
                continue
            worker, cell = cells_in_flight.pop(ref)
            try:
                frame, seconds, _pid = ray.get(ref)
            except RayTaskError as e:  # the cell itself raised: not retried
                if isinstance(e.cause, TokextError):
                    raise e.cause from None
                raise
            except RayError as e:  # the worker died (killed, out of memory, node lost)
                failures[cell.id] += 1
                holds[worker] = None
                reason = " ".join(str(e).split())[:200]
                if failures[cell.id] > max_retries:
                    raise ClusterError(
                        f"cell {cell.id} ({cell.spec.task} {cell.intervention_repr}): its worker died "
                        f"{failures[cell.id]} times (max_retries = {max_retries}); last: "
                        f"{type(e).__name__}: {reason}"
                    ) from None
                log(
                    f"ray: worker {worker} died during cell {cell.id} ({type(e).__name__}); retrying it "
                    f"({failures[cell.id]}/{max_retries})"
                )
                queue.appendleft(cell)
                probe(worker, time.monotonic())
                continue
            holds[worker] = cell.model
            idle.append(worker)
            done(cell, frame, seconds)


def make_executor(name: str | None = "serial", *, address: str | None = None, workers: int | None = None) -> Any:
    """An executor by name (``serial`` or ``ray``); ``address`` and ``workers`` are Ray's."""
    name = name or "serial"
    if name not in EXECUTORS:
        raise InputError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
    if name == "serial":
        if address is not None or workers is not None:
            raise InputError("--address and --workers are for --executor ray")
        return SerialExecutor()
    return RayExecutor(address=address, workers=workers)
