"""tokext.studies.config: strict parsing (errors name the file and field), grids, validation without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokext.errors import DataFileError, InputError
from tokext.evaluation.spec import EvalSpec
from tokext.studies.config import load_config, parse_config, validate

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
BASE = """
version = 1
name = "t"
[[tasks]]
name = "arithmetic"
levels = [1, 2]
cot = [false, true]
n = 5
"""


def write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(DataFileError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


@pytest.mark.parametrize("name", ["a_method", "b_neighbours", "c_cot", "d_mmlu", "tiny", "baselines"])
def test_shipped_configs_are_valid(name):
    config = load_config(EXPERIMENTS / f"{name}.toml")
    report = validate(config)
    assert report["cells"] > 0 and config.version == 1


def test_grid_expands_to_a_product(tmp_path):
    config = load_config(
        write(
            tmp_path,
            BASE
            + """
[[interventions]]
type = "EarlyLayerEmulation"
alpha = [0.1, 0.2, 0.5]
uniform = [false, true]
threshold = 0.02
[[interventions]]
type = "SinkRebalance"
label = "first-token"
targets = [0, 1]
layers = [1, 2]
""",
        )
    )
    ivs = config.expanded_interventions()
    assert len(ivs) == 3 * 2 + 1
    assert {iv.alpha for _, iv in ivs[:6]} == {0.1, 0.2, 0.5} and all(iv.threshold == 0.02 for _, iv in ivs[:6])
    label, rebalance = ivs[-1]
    assert label == "first-token" and rebalance.targets == (0, 1) and rebalance.layers == (1, 2)  # one value
    specs = config.eval_specs()
    assert [(s.level, s.cot) for s in specs] == [(1, False), (1, True), (2, False), (2, True)]


def test_zerotuning_factors_round_trip_through_a_config(tmp_path):
    """A list of scalar gammas is a grid; per-head (layer, head, gamma) triples are one value, as asdict writes them."""
    import dataclasses

    from tokext.interventions import ZeroTuning
    from tokext.studies.sweep import Cell

    config = load_config(
        write(
            tmp_path,
            BASE
            + """
[[interventions]]
type = "ZeroTuning"
gamma = [0.3, 2.0]
layers = [0, 1]
[[interventions]]
type = "ZeroTuning"
head_gammas = [[0, 1, 0.5], [1, 3, 4.0]]
""",
        )
    )
    ivs = [iv for _, iv in config.expanded_interventions()]
    assert ivs == [
        ZeroTuning(gamma=0.3, layers=(0, 1)),
        ZeroTuning(gamma=2.0, layers=(0, 1)),
        ZeroTuning(head_gammas=((0, 1, 0.5), (1, 3, 4.0))),
    ]
    tuned = ivs[-1]
    assert ZeroTuning(**json.loads(json.dumps(dataclasses.asdict(tuned)))) == tuned  # what cells.csv stores
    spec = config.eval_specs()[0]
    assert Cell("m", spec, "x", tuned).id == Cell("m", spec, "y", ZeroTuning(head_gammas=[[0, 1, 0.5], [1, 3, 4]])).id
    assert "ZeroTuning" in error_of(tmp_path, BASE + '[[interventions]]\ntype = "ZeroTuning"\nhead_gammas = [[0, 1]]\n')


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(write(tmp_path, BASE, "a.toml"))
    b = load_config(write(tmp_path, "# a comment\n" + BASE, "b.toml"))
    c = load_config(write(tmp_path, BASE.replace("n = 5", "n = 6"), "c.toml"))
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert json.loads(json.dumps(a.to_dict())) == a.to_dict()


@pytest.mark.parametrize(
    "text, expected",
    [
        (BASE.replace("version = 1", ""), "version: missing"),
        (BASE.replace("version = 1", "version = 7"), "config version 1, got 7"),
        ("seed = [1]\n" + BASE, "top level: unknown key 'seed'. Did you mean 'seeds'?"),
        (BASE.replace("levels", "level"), "tasks[0]: unknown key 'level'. Did you mean 'levels'?"),
        (
            BASE.replace('"arithmetic"', '"arithmetc"'),
            "tasks[0].name: unknown task 'arithmetc'. Did you mean 'arithmetic'?",
        ),
        (BASE.replace("levels = [1, 2]", "levels = [1, 5]"), "tasks[0].levels[1]: level must be one of"),
        (BASE.replace("cot = [false, true]", 'cot = "yes"'), "tasks[0].cot: expected true or false"),
        (BASE.replace("n = 5", "n = 0"), "tasks[0].n: expected an integer >= 1"),
        (
            BASE + '\n[[interventions]]\ntype = "EarlyLayerEmulaton"\n',
            "interventions[0].type: unknown intervention 'EarlyLayerEmulaton'. Did you mean 'EarlyLayerEmulation'?",
        ),
        (
            BASE + '\n[[interventions]]\ntype = "EarlyLayerEmulation"\nalpah = 0.2\n',
            "interventions[0] (EarlyLayerEmulation): unknown key 'alpah'. Did you mean 'alpha'?",
        ),
        (
            BASE + '\n[[interventions]]\ntype = "EarlyLayerEmulation"\nthreshold = [0.01, 2.0]\n',
            "interventions[0] (EarlyLayerEmulation): threshold must be < 1.0, got 2.0",
        ),
        (
            BASE + '\n[[interventions]]\ntype = "AttentionTemperature"\n',
            "interventions[0] (AttentionTemperature): missing 1 required positional argument: 'temperature'",
        ),
        (BASE + "\n[[interventions]]\nalpha = 0.2\n", "interventions[0]: each [[interventions]] table needs a `type`"),
        (
            'version = 1\n[[tasks]]\nname = "mmlu"\nlevels = [1]\n',
            (
                "unknown key 'levels'. Valid keys: name, n, max_new_tokens, method, path, labels_path, categories, "
                "subjects, limit_per_subject (for the multiple-choice task 'mmlu')"
            ),
        ),
        (
            'version = 1\n[[tasks]]\nname = "mmlu"\nmethod = "leter"\n',
            "tasks[0].method: unknown method 'leter'. Did you mean 'letter'?",
        ),
        (
            'version = 1\n[[tasks]]\nname = "mmlu"\ncategories = ["Stem"]\n',
            "unknown MMLU category 'Stem'. Did you mean 'STEM'?",
        ),
        ('version = 1\n[[tasks]]\nname = "piqa"\n', "tasks[0].path: task 'piqa' needs `path`"),
        ("version = 1\n", "tasks: at least one [[tasks]] table is required"),
        ("version = 1\n[[tasks]\n", "not valid TOML"),
    ],
)
def test_errors_name_the_file_and_field(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    assert str(tmp_path / "study.toml") in message
    assert expected in message, message


def test_valid_keys_are_listed(tmp_path):
    message = error_of(tmp_path, "model = 'x'\n" + BASE)
    valid = "version, name, description, models, seeds, batch_size, dtype, engine, resources, tasks, interventions"
    assert f"Valid keys: {valid}" in message


def test_missing_data_file_is_caught_by_validate(tmp_path):
    config = load_config(write(tmp_path, 'version = 1\n[[tasks]]\nname = "siqa"\npath = "nowhere/dev.jsonl"\n'))
    with pytest.raises(DataFileError, match=r"cannot read .*nowhere/dev.jsonl"):
        validate(config)


def test_missing_model_directory_is_caught_by_validate(tmp_path):
    config = load_config(write(tmp_path, BASE)).replace(models=("./no/such/model",))
    with pytest.raises(DataFileError, match="no such .gguf file or model directory"):
        validate(config)


def test_relative_data_paths_resolve_next_to_the_config(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(6)]
    (tmp_path / "data" / "piqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = load_config(
        write(
            tmp_path,
            'version = 1\n[[tasks]]\nname = "piqa"\npath = "data/piqa.jsonl"\n'
            'method = ["letter", "continuation"]\nn = 4\n',
        )
    )
    specs = config.eval_specs()
    assert [s.method for s in specs] == ["letter", "continuation"]
    items = specs[0].load()
    assert len(items) == 4 and items == specs[1].load()  # seeded subset, the same for both methods
    assert validate(config)["cells"] == 2


def test_eval_spec_loads_seeded_items():
    a = EvalSpec("verbal", level=2, n=5, seed=1).load()
    assert a == EvalSpec("verbal", level=2, n=5, seed=1).load() != EvalSpec("verbal", level=2, n=5, seed=2).load()
    mmlu = EvalSpec("mmlu", method="letter", category="Humanities", n=6).load()
    assert len(mmlu) == 6 and {it.category for it in mmlu} == {"Humanities"}


def test_parse_config_rejects_non_tables():
    with pytest.raises(InputError, match="expected a table"):
        parse_config({"version": 1, "tasks": ["arithmetic"]})


def test_resources_and_dtype(tmp_path):
    from tokext.studies.config import with_overrides
    from tokext.studies.sweep import expand

    plain = load_config(write(tmp_path, BASE, "plain.toml"))
    placed = load_config(
        write(
            tmp_path,
            BASE
            + """
[resources]
workers = 4
num_cpus = 2
num_gpus = 0.25
max_retries = 5
device_map = { "model.layers.0" = 0, "lm_head" = "cpu" }
max_memory = { "0" = "20GiB", cpu = "64GiB" }
""",
            "placed.toml",
        )
    )
    r = placed.resources
    assert (r.workers, r.num_cpus, r.num_gpus, r.max_retries) == (4, 2.0, 0.25, 5)
    assert placed.load_options() == {
        "dtype": "float32",
        "device_map": {"model.layers.0": 0, "lm_head": "cpu"},
        "max_memory": {"0": "20GiB", "cpu": "64GiB"},
    }
    # where cells run changes neither the config hash nor a cell id
    assert placed.config_hash() == plain.config_hash()
    assert [c.id for c in expand(placed)] == [c.id for c in expand(plain)]
    half = load_config(write(tmp_path, BASE.replace('name = "t"', 'name = "t"\ndtype = "bfloat16"'), "half.toml"))
    assert half.dtype == "bfloat16" and half.load_options() == {"dtype": "bfloat16"}
    assert half.config_hash() != plain.config_hash()
    assert not {c.id for c in expand(half)} & {c.id for c in expand(plain)}  # other numbers, other cells
    assert with_overrides(plain, dtype="bfloat16").config_hash() == half.config_hash()
    moved = with_overrides(placed, device="cuda", workers=None)
    assert moved.resources.device == "cuda" and moved.resources.workers == 4


@pytest.mark.parametrize(
    "table, expected",
    [
        ("[resources]\nworker = 2\n", "resources: unknown key 'worker'. Did you mean 'workers'?"),
        ("[resources]\nnum_gpus = 1.5\n", "resources.num_gpus: a worker takes a fraction of one GPU or a whole number"),
        ("[resources]\nnum_cpus = 0\n", "resources.num_cpus: expected a number > 0.0"),
        ("[resources]\nmax_retries = -1\n", "resources.max_retries: expected an integer >= 0"),
        ('[resources]\ndevice_map = "fastest"\n', "resources.device_map: expected one of auto"),
        (
            '[resources]\ndevice_map = { "model.layers.0" = true }\n',
            "resources.device_map.model.layers.0: expected a device",
        ),
    ],
)
def test_bad_resources_name_the_field(tmp_path, table, expected):
    assert expected in error_of(tmp_path, BASE + table)


def test_bad_dtype_names_the_choices(tmp_path):
    message = error_of(tmp_path, BASE.replace('name = "t"', 'name = "t"\ndtype = "fp8"'))
    assert "dtype: expected one of float32, float16, bfloat16, float64, got 'fp8'" in message
