r"""Sweep configs: TOML files read into frozen dataclasses, checked completely before any model loads.

A config (``experiments/*.toml``)::

    version = 1                      # required
    name = "a_method"
    models = ["smollm2-135m"]        # names, local directories, .gguf files or hub ids
    seeds = [0]
    batch_size = 8

    [[tasks]]                        # a reasoning task: levels x cot
    name = "arithmetic"
    levels = [1, 2]
    cot = [false, true]
    n = 40                           # items per cell
    shots = 3
    max_new_tokens = "auto"          # or an int; auto: 1.25 x the longest gold target + 4

    [[tasks]]                        # multiple choice: mmlu, piqa, siqa
    name = "mmlu"
    method = "letter"                # letter | continuation | cot (a list: one cell each)
    categories = ["STEM", "Humanities", "Social", "Other"]   # one cell each
    n = 80                           # or "all"; MMLU also takes subjects, limit_per_subject

    [[tasks]]                        # next-token loss on the shipped natural text (MMLU questions
    name = "perplexity"              # in file order), n chunks of `length` tokens; loss per chunk,
    n = 32                           # perplexity = exp(mean loss); no accuracy
    length = 128

    [[interventions]]
    type = "EarlyLayerEmulation"     # a class in tokext.interventions
    label = "paper"                  # optional; default: the type
    alpha = [0.05, 0.2]              # a list over a scalar parameter is a grid axis
    uniform = [false, true]          # several axes: their product

A baseline (no intervention) always runs. Lists expand only for scalar parameters; parameters that
are themselves lists (``layers``, ``heads``, ``target_layers``, positional ``targets``) take the
list as one value: write one ``[[interventions]]`` entry per value to compare several. Unknown
keys, names and values are errors (:class:`tokext.errors.DataFileError`) naming the file and field.

Numerics, attention engine and placement (all optional)::

    dtype = "bfloat16"               # float32 (default) | bfloat16 | float16 | float64: part of the
                                     # config hash and of every cell id (it changes the numbers)
    engine = "streaming"             # hooks (default) | streaming | auto: how attention runs in every
                                     # cell (tokext.attention.engines); the engines give the same
                                     # numbers to 1e-5, so it is not in the hash or a cell id

    [resources]                      # where cells run; changes no result, the config hash or a cell id
    workers = 4                      # Ray executor: model workers (actors), each loads its model once;
                                     # default: the cluster's GPUs / num_gpus, else its CPUs / num_cpus
    num_cpus = 1                     # CPUs per worker (also its torch threads)
    num_gpus = 1                     # GPUs per worker: default 1 where the cluster has GPUs, else 0;
                                     # a fraction (0.25) packs small models 4 to a GPU; 2+ spreads one
                                     # model over that many GPUs (n_devices)
    max_retries = 3                  # a cell whose worker dies (process or node lost) is rerun this often
    device = "cuda"                  # the model's device: default cpu (serial), cuda on a GPU worker (Ray)
    device_map = "auto"              # or a table: { "model.embed_tokens" = 0, "model.layers.0" = 0, ... }
    n_devices = 2                    # split each model over this many GPUs
    max_memory = { "0" = "20GiB", cpu = "64GiB" }   # accelerate's per-device budget
    offload_folder = "/scratch/offload"             # where "disk" entries of a device_map live

``dtype`` and the placement keys are passed to :func:`tokext.models.load_model`, ``engine`` to
:func:`tokext.evaluation.evaluate.evaluate`; the Ray keys are read by
:class:`tokext.studies.executors.RayExecutor` (the serial executor ignores them).
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokext.errors import DataFileError, TokextError
from tokext.evaluation.spec import MC_METHODS, MC_TASKS, ORGANISM_TASK, PERPLEXITY_TASK, EvalSpec

CONFIG_VERSION = 1
_TOP_KEYS = (
    "version",
    "name",
    "description",
    "models",
    "seeds",
    "batch_size",
    "dtype",
    "engine",
    "resources",
    "tasks",
    "interventions",
)
_RESOURCE_KEYS = (
    "workers",
    "num_cpus",
    "num_gpus",
    "max_retries",
    "device",
    "device_map",
    "n_devices",
    "max_memory",
    "offload_folder",
)
DEFAULT_DTYPE = "float32"
DEFAULT_ENGINE = "hooks"
_COMMON_TASK_KEYS = ("name", "n", "max_new_tokens")
_REASONING_KEYS = ("levels", "cot", "shots")
_MC_KEYS = ("method", "path", "labels_path")
_MMLU_KEYS = ("categories", "subjects", "limit_per_subject")


@dataclass(frozen=True)
class TaskEntry:
    """One ``[[tasks]]`` table; :meth:`specs` expands it (levels x cot, or methods x categories)."""

    name: str
    n: int | None = 40
    max_new_tokens: int | None = None
    levels: tuple[int | None, ...] = (1,)  # (None,) for the organism task
    cot: tuple[bool, ...] = (False,)
    shots: int = 3
    methods: tuple[str, ...] = ("letter",)
    categories: tuple[str | None, ...] = (None,)
    subjects: tuple[str, ...] | None = None
    limit_per_subject: int | None = None
    path: str | None = None
    labels_path: str | None = None
    length: int | None = None  # task 'perplexity': tokens per chunk

    def specs(self, seed: int) -> list[EvalSpec]:
        if self.name == PERPLEXITY_TASK:
            return [EvalSpec(self.name, "perplexity", n=self.n, seed=seed, shots=0, length=self.length)]
        if self.name not in MC_TASKS:
            return [
                EvalSpec(
                    self.name,
                    "generate",
                    level=lv,
                    cot=c,
                    n=self.n,
                    seed=seed,
                    shots=self.shots,
                    max_new_tokens=self.max_new_tokens,
                )
                for lv in self.levels
                for c in self.cot
            ]
        return [
            EvalSpec(
                self.name,
                m,
                cot=(m == "cot"),
                category=cat,
                subjects=self.subjects,
                n=self.n,
                seed=seed,
                shots=0,
                max_new_tokens=self.max_new_tokens if m == "cot" else None,
                path=self.path,
                labels_path=self.labels_path,
                limit_per_subject=self.limit_per_subject,
            )
            for m in self.methods
            for cat in self.categories
        ]


@dataclass(frozen=True)
class InterventionEntry:
    """One ``[[interventions]]`` table: a type, an optional label, and parameters (some grids)."""

    type: str
    label: str
    params: tuple[tuple[str, Any], ...]
    grid: tuple[str, ...] = ()

    def expand(self) -> list[Any]:
        """The intervention objects of the grid (the product of its list-valued scalar parameters)."""
        cls = intervention_classes()[self.type]
        fixed = {k: v for k, v in self.params if k not in self.grid}
        axes = [[(k, v) for v in dict(self.params)[k]] for k in self.grid]
        return [cls(**fixed, **dict(combo)) for combo in itertools.product(*axes)]


@dataclass(frozen=True)
class Resources:
    """The ``[resources]`` table: how and where cells run. Nothing here changes a result.

    ``None`` means "decide from the machine": see the module docstring for each default.
    """

    workers: int | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None
    max_retries: int = 3
    device: str | None = None
    device_map: str | tuple[tuple[str, Any], ...] | None = None  # a dict map as sorted pairs (hashable)
    n_devices: int | None = None
    max_memory: tuple[tuple[Any, Any], ...] | None = None
    offload_folder: str | None = None

    def placement(self) -> dict[str, Any]:
        """The placement keywords of :func:`tokext.models.load_model` that are set."""
        out = {
            "device": self.device,
            "n_devices": self.n_devices,
            "offload_folder": self.offload_folder,
            "device_map": dict(self.device_map) if isinstance(self.device_map, tuple) else self.device_map,
            "max_memory": dict(self.max_memory) if self.max_memory is not None else None,
        }
        return {k: v for k, v in out.items() if v is not None}

    def replace(self, **changes: Any) -> Resources:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class StudyConfig:
    """A whole sweep config. ``source`` is the file it was read from; it, ``engine`` and ``resources``
    are not part of the hash, nor is ``dtype`` when it is the default float32 (so older configs keep
    theirs)."""

    version: int
    name: str
    description: str
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    batch_size: int
    tasks: tuple[TaskEntry, ...]
    interventions: tuple[InterventionEntry, ...]
    dtype: str = DEFAULT_DTYPE
    engine: str = dataclasses.field(default=DEFAULT_ENGINE, compare=False)
    resources: Resources = dataclasses.field(default_factory=Resources, compare=False)
    source: str | None = dataclasses.field(default=None, compare=False)

    def load_options(self) -> dict[str, Any]:
        """Keywords for :func:`tokext.models.load_model`: the dtype and the placement that is set."""
        return {"dtype": self.dtype, **self.resources.placement()}

    def eval_specs(self) -> list[EvalSpec]:
        return [spec for seed in self.seeds for task in self.tasks for spec in task.specs(seed)]

    def expanded_interventions(self) -> list[tuple[str, Any]]:
        """``(label, intervention)`` for every grid point of every entry, in config order."""
        return [(entry.label, iv) for entry in self.interventions for iv in entry.expand()]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists, not tuples); what :meth:`config_hash` hashes."""
        out = dataclasses.asdict(self)
        out.pop("source")
        out.pop("engine")
        out.pop("resources")
        if out["dtype"] == DEFAULT_DTYPE:
            out.pop("dtype")
        for task in out["tasks"]:
            if task["length"] is None:  # only task 'perplexity' has one: other configs keep their hash
                task.pop("length")
        return json.loads(canonical_json(out))

    def config_hash(self) -> str:
        """12 hex digits of SHA-1 over the canonical JSON of :meth:`to_dict`."""
        return hashlib.sha1(canonical_json(self.to_dict()).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> StudyConfig:
        return dataclasses.replace(self, **changes)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr)


# ---------------------------------------------------------------------- registry and names


def intervention_classes() -> dict[str, type]:
    """Intervention class name -> class (:func:`tokext.interventions.parse.intervention_classes`, imported lazily)."""
    from tokext.interventions.parse import intervention_classes as classes

    return classes()


def _did_you_mean(value: Any, choices: list[str]) -> str:
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lower), n=1, cutoff=0.5)
    return f" Did you mean {lower[close[0]]!r}?" if close else ""


# ---------------------------------------------------------------------- parsing


class _Reader:
    """Type checks that name the file and the field in their errors."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, message: str) -> DataFileError:
        return DataFileError(f"{self.source}: {where}: {message}")

    def keys(self, table: Any, valid: tuple[str, ...], where: str, hint: str = "") -> dict[str, Any]:
        if not isinstance(table, dict):
            raise self.fail(where, f"expected a table, got {type(table).__name__}")
        for key in table:
            if key not in valid:
                raise self.fail(
                    where, f"unknown key {key!r}.{_did_you_mean(key, list(valid))} Valid keys: {', '.join(valid)}{hint}"
                )
        return table

    def int(self, value: Any, where: str, *, low: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise self.fail(where, f"expected an integer{f' >= {low}' if low is not None else ''}, got {value!r}")
        return value

    def str(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a non-empty string, got {value!r}")
        return value

    def many(self, value: Any, where: builtins.str, check) -> tuple:
        values = value if isinstance(value, list) else [value]
        if not values:
            raise self.fail(where, "empty list")
        return tuple(check(v, f"{where}[{i}]" if isinstance(value, list) else where) for i, v in enumerate(values))

    def bool(self, value: Any, where: builtins.str) -> builtins.bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {value!r}")
        return value


def load_config(path: str | Path) -> StudyConfig:
    """Read and fully validate a sweep config (no model is loaded; data files are opened)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataFileError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DataFileError(f"{path}: not valid TOML ({e})") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "<config>") -> StudyConfig:
    """Build a :class:`StudyConfig` from a parsed TOML dict, checking every key, name and value."""
    r = _Reader(source)
    r.keys(raw, _TOP_KEYS, "top level")
    if "version" not in raw:
        raise r.fail("version", f"missing: every config needs `version = {CONFIG_VERSION}`")
    version = r.int(raw["version"], "version")
    if version != CONFIG_VERSION:
        raise r.fail("version", f"this tokext reads config version {CONFIG_VERSION}, got {version}")
    name = r.str(raw.get("name", Path(source).stem), "name")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise r.fail("description", f"expected a string, got {description!r}")
    models = r.many(raw.get("models", ["smollm2-135m"]), "models", r.str)
    seeds = r.many(raw.get("seeds", [0]), "seeds", lambda v, w: r.int(v, w, low=0))
    batch_size = r.int(raw.get("batch_size", 8), "batch_size", low=1)
    raw_tasks = raw.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise r.fail("tasks", "at least one [[tasks]] table is required")
    tasks = tuple(_task(r, t, f"tasks[{i}]") for i, t in enumerate(raw_tasks))
    raw_ivs = raw.get("interventions", [])
    if not isinstance(raw_ivs, list):
        raise r.fail("interventions", "expected [[interventions]] tables")
    interventions = tuple(_intervention(r, t, f"interventions[{i}]") for i, t in enumerate(raw_ivs))
    for i, entry in enumerate(interventions):
        try:
            entry.expand()
        except (TokextError, TypeError, ValueError) as e:
            message = str(e).replace(f"{entry.type}.__init__() ", "")
            raise r.fail(f"interventions[{i}] ({entry.type})", message) from None
    dtype = raw.get("dtype", DEFAULT_DTYPE)
    if not isinstance(dtype, str) or dtype not in _dtype_names():
        raise r.fail("dtype", f"expected one of {', '.join(_dtype_names())}, got {dtype!r}")
    engine = _engine(r, raw.get("engine", DEFAULT_ENGINE), "engine")
    resources = _resources(r, raw.get("resources", {}))
    return StudyConfig(
        version,
        name,
        description,
        models,
        seeds,
        batch_size,
        tasks,
        interventions,
        dtype=dtype,
        engine=engine,
        resources=resources,
        source=source,
    )


def with_overrides(
    config: StudyConfig, *, dtype: str | None = None, engine: str | None = None, **resources: Any
) -> StudyConfig:
    """``config`` with a new ``dtype``, ``engine`` and ``[resources]`` keys (command-line flags), checked
    as the file's are.

    ``None`` values leave a key as the config has it.
    """
    r = _Reader("command line")
    if dtype is not None and dtype not in _dtype_names():
        raise r.fail("--dtype", f"expected one of {', '.join(_dtype_names())}, got {dtype!r}")
    table = {k: v for k, v in dataclasses.asdict(config.resources).items() if v is not None}
    for key in ("device_map", "max_memory"):
        if isinstance(table.get(key), (tuple, list)):
            table[key] = dict(table[key])
    table.update({k: v for k, v in resources.items() if v is not None})
    engine = _engine(r, engine, "--engine") if engine is not None else config.engine
    return config.replace(dtype=dtype or config.dtype, engine=engine, resources=_resources(r, table))


def _engine(r: _Reader, value: Any, where: str) -> str:
    """An attention engine name (:data:`tokext.attention.engines.choose.ENGINES`)."""
    from tokext.attention.engines.choose import ENGINES

    if not isinstance(value, str) or value not in ENGINES:
        raise r.fail(
            where, f"expected one of {', '.join(ENGINES)}, got {value!r}.{_did_you_mean(value, list(ENGINES))}"
        )
    return value


def _dtype_names() -> list[str]:
    from tokext.models.devices import DTYPES

    return list(DTYPES)


def _resources(r: _Reader, table: Any) -> Resources:
    """The ``[resources]`` table, type-checked (devices are checked where the model loads)."""
    from tokext.models.devices import DEVICE_MAP_STRATEGIES

    r.keys(table, _RESOURCE_KEYS, "resources")

    def number(key: str, *, low: float, low_open: bool) -> float | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (low_open and value == low):
            raise r.fail(f"resources.{key}", f"expected a number {'>' if low_open else '>='} {low}, got {value!r}")
        return float(value)

    workers = r.int(table["workers"], "resources.workers", low=1) if "workers" in table else None
    num_cpus = number("num_cpus", low=0.0, low_open=True)
    num_gpus = number("num_gpus", low=0.0, low_open=False)
    if num_gpus is not None and num_gpus > 1 and not num_gpus.is_integer():
        raise r.fail(
            "resources.num_gpus", f"a worker takes a fraction of one GPU or a whole number of GPUs, got {num_gpus}"
        )
    max_retries = r.int(table.get("max_retries", 3), "resources.max_retries", low=0)
    device = r.str(table["device"], "resources.device") if "device" in table else None
    device_map = table.get("device_map")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise r.fail(
                "resources.device_map",
                f"expected one of {', '.join(DEVICE_MAP_STRATEGIES)} or a table "
                f"of module name -> device, got {device_map!r}",
            )
    elif isinstance(device_map, dict):
        if not device_map:
            raise r.fail("resources.device_map", "empty table")
        for key, value in device_map.items():
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise r.fail(
                    f"resources.device_map.{key}", f'expected a device ("cuda:0", 0, "cpu", "disk"), got {value!r}'
                )
        device_map = tuple(sorted(device_map.items()))
    elif device_map is not None:
        raise r.fail("resources.device_map", f"expected a strategy name or a table, got {device_map!r}")
    n_devices = r.int(table["n_devices"], "resources.n_devices", low=1) if "n_devices" in table else None
    max_memory = table.get("max_memory")
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not max_memory:
            raise r.fail("resources.max_memory", f"expected a table of device -> size, got {max_memory!r}")
        max_memory = tuple(sorted(max_memory.items()))
    folder = r.str(table["offload_folder"], "resources.offload_folder") if "offload_folder" in table else None
    return Resources(
        workers=workers,
        num_cpus=num_cpus if num_cpus is not None else 1.0,
        num_gpus=num_gpus,
        max_retries=max_retries,
        device=device,
        device_map=device_map,
        n_devices=n_devices,
        max_memory=max_memory,
        offload_folder=folder,
    )


def _task(r: _Reader, table: Any, where: str) -> TaskEntry:
    if not isinstance(table, dict):
        raise r.fail(where, f"expected a table, got {type(table).__name__} {table!r}")
    if "name" not in table:
        raise r.fail(where, "each [[tasks]] table needs a `name`")
    from tokext.evaluation.tasks import LEVELS, list_tasks

    name = r.str(table["name"], f"{where}.name")
    known = list_tasks() + list(MC_TASKS) + [ORGANISM_TASK, PERPLEXITY_TASK]
    if name not in known:
        raise r.fail(
            f"{where}.name", f"unknown task {name!r}.{_did_you_mean(name, known)} Available: {', '.join(known)}"
        )
    if name == PERPLEXITY_TASK:
        r.keys(table, ("name", "n", "length"), where, hint=" (for the task 'perplexity')")
        return TaskEntry(
            name,
            n=r.int(table.get("n", 32), f"{where}.n", low=1),
            length=r.int(table.get("length", 128), f"{where}.length", low=2),
        )
    is_mc = name in MC_TASKS
    valid = _COMMON_TASK_KEYS + (_MC_KEYS + (_MMLU_KEYS if name == "mmlu" else ()) if is_mc else _REASONING_KEYS)
    kind = "multiple-choice" if is_mc else "reasoning"
    r.keys(table, valid, where, hint=f" (for the {kind} task {name!r})")
    n = table.get("n", 40)
    n = None if n == "all" and is_mc else r.int(n, f"{where}.n", low=1)
    mnt = table.get("max_new_tokens", "auto")
    mnt = None if mnt == "auto" else r.int(mnt, f"{where}.max_new_tokens", low=1)
    if name == ORGANISM_TASK:
        r.keys(table, _COMMON_TASK_KEYS + ("cot",), where, hint=" (for the task 'organism')")
        return TaskEntry(
            name,
            n=r.int(table.get("n", 200), f"{where}.n", low=1),
            levels=(None,),
            cot=r.many(table.get("cot", True), f"{where}.cot", r.bool),
            shots=0,
        )
    if not is_mc:

        def level(v: Any, w: str) -> int:
            if r.int(v, w) not in LEVELS:
                raise r.fail(w, f"level must be one of {list(LEVELS)}, got {v}")
            return v

        return TaskEntry(
            name,
            n=n,
            max_new_tokens=mnt,
            levels=r.many(table.get("levels", [1]), f"{where}.levels", level),
            cot=r.many(table.get("cot", False), f"{where}.cot", r.bool),
            shots=r.int(table.get("shots", 3), f"{where}.shots", low=0),
        )

    def method(v: Any, w: str) -> str:
        if v not in MC_METHODS:
            raise r.fail(
                w, f"unknown method {v!r}.{_did_you_mean(v, list(MC_METHODS))} Choose from {', '.join(MC_METHODS)}"
            )
        return v

    methods = r.many(table.get("method", "letter"), f"{where}.method", method)
    path = table.get("path")
    if path is not None:
        path = r.str(path, f"{where}.path")
        path = _data_path(path, r.source)
    elif name != "mmlu":
        raise r.fail(f"{where}.path", f"task {name!r} needs `path` to its jsonl file")
    labels = table.get("labels_path")
    labels = None if labels is None else r.str(labels, f"{where}.labels_path")
    categories: tuple = (None,)
    subjects, limit = None, None
    if name == "mmlu":
        from tokext.evaluation.mc import MMLU_CATEGORIES

        def category(v: Any, w: str) -> str | None:
            if v == "all":
                return None
            if v not in MMLU_CATEGORIES:
                cats = list(MMLU_CATEGORIES)
                raise r.fail(
                    w, f"unknown MMLU category {v!r}.{_did_you_mean(v, cats)} Choose from {', '.join(cats)}, all"
                )
            return v

        categories = r.many(table.get("categories", "all"), f"{where}.categories", category)
        if "subjects" in table:
            subjects = r.many(table["subjects"], f"{where}.subjects", r.str)
        if "limit_per_subject" in table:
            limit = r.int(table["limit_per_subject"], f"{where}.limit_per_subject", low=1)
    return TaskEntry(
        name,
        n=n,
        max_new_tokens=mnt,
        methods=methods,
        categories=categories,
        subjects=subjects,
        limit_per_subject=limit,
        path=path,
        labels_path=labels,
    )


def _data_path(path: str, source: str) -> str:
    """A relative data path is read from the working directory, else next to the config file."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or source == "<config>":
        return str(p)
    beside = Path(source).parent / p
    return str(beside if beside.exists() else p)


def _is_scalar_field(annotation: Any) -> bool:
    text = str(annotation)
    return not any(word in text for word in ("tuple", "Any", "list", "Sequence"))


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _intervention(r: _Reader, table: Any, where: str) -> InterventionEntry:
    if not isinstance(table, dict):
        raise r.fail(where, f"expected a table, got {type(table).__name__} {table!r}")
    if "type" not in table:
        raise r.fail(where, 'each [[interventions]] table needs a `type` (e.g. "EarlyLayerEmulation")')
    classes = intervention_classes()
    kind = table["type"]
    if kind not in classes:
        raise r.fail(
            f"{where}.type",
            f"unknown intervention {kind!r}.{_did_you_mean(kind, list(classes))} "
            f"Available: {', '.join(sorted(classes))}",
        )
    fields = {f.name: f for f in dataclasses.fields(classes[kind])}
    r.keys(table, ("type", "label", *fields), f"{where} ({kind})")
    label = r.str(table.get("label", kind), f"{where}.label")
    params, grid = [], []
    for key, value in table.items():
        if key in ("type", "label"):
            continue
        if isinstance(value, list) and _is_scalar_field(fields[key].type):
            if not value:
                raise r.fail(f"{where}.{key}", "empty grid")
            grid.append(key)
        params.append((key, _tupled(value)))
    return InterventionEntry(kind, label, tuple(params), tuple(grid))


# ---------------------------------------------------------------------- checks without a model


def check_model_spec(spec: str) -> str:
    """Check a model spec without loading it: a known name, an existing directory/.gguf, or a hub id."""
    from tokext.models.loading import KNOWN_MODELS

    key = spec.strip()
    if key.lower() in KNOWN_MODELS:
        return "known"
    path = Path(key).expanduser()
    if (path / "organism.json").is_file():
        return "organism"
    if key.endswith(".gguf") or key.startswith((".", "/", "~")):
        if key.endswith(".gguf") and path.is_file():
            return "gguf"
        if path.is_dir() and (path / "config.json").is_file():
            return "directory"
        raise DataFileError(f"model {spec!r}: no such .gguf file or model directory (config.json + weights)")
    if path.is_dir():
        return "directory"
    return "hub id (not checked offline)"


def _check_organism_pairs(config: StudyConfig, models: dict[str, str], specs: list[EvalSpec]) -> None:
    """The organism answers only its own task, and only an organism answers that task."""
    organism_tasks = any(spec.task == ORGANISM_TASK for spec in specs)
    other_tasks = sorted({spec.task for spec in specs if spec.task != ORGANISM_TASK})
    for model, kind in models.items():
        if kind == "organism" and other_tasks:
            raise DataFileError(
                f"{config.source}: models: {model!r} is a model organism (character vocabulary); "
                f"it answers only the task 'organism', not {other_tasks}"
            )
        if kind != "organism" and organism_tasks:
            raise DataFileError(
                f"{config.source}: models: task 'organism' needs a trained organism directory "
                f"(with organism.json), and {model!r} is not one: run "
                f"`tokext train-organism --out {model}` first, or list it in a separate config"
            )


def validate(config: StudyConfig) -> dict[str, Any]:
    """Check everything a sweep needs short of loading a model; return a summary of what would run.

    Model specs, task names and levels, data files (opened and parsed) and every intervention of
    every grid (constructed) are checked; errors name the file and field.
    """
    models = {m: check_model_spec(m) for m in config.models}
    specs = config.eval_specs()
    _check_organism_pairs(config, models, specs)
    items = {}
    for spec in specs:
        try:
            items[spec] = len(spec.load())
        except TokextError as e:
            raise type(e)(f"{config.source}: task {spec.task!r} ({spec.level_label}): {e}") from None
    ivs = config.expanded_interventions()
    n_cells = len(config.models) * len(specs) * (1 + len(ivs))
    return {
        "config": config.source,
        "config_hash": config.config_hash(),
        "models": models,
        "task_cells": len(specs),
        "interventions": [repr(iv) for _, iv in ivs],
        "cells": n_cells,
        "items": sum(items.values()) * len(config.models) * (1 + len(ivs)),
    }
