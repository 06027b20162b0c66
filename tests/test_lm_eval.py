"""The lm-evaluation-harness integration: the ``tokext`` model type, the ``tokext_mmlu`` tasks,
``tokext eval`` and ``tokext lm-eval``, on a tiny random Llama and small local fixtures.

Independent references: tokext's own letter scoring on the same items (agreement), lm-eval's
``HFLM`` on the plain transformers model and lm-eval's own (unmasked) ``_loglikelihood_tokens``
(scores), a token-by-token full recompute (generation), lm-eval's installed MMLU configs (the
subject map), and the fixture constants (data, paired counts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lm_eval  # the eval extra (make test installs it)
import numpy as np
import pytest
import torch

from tests.tiny_lm_eval import MMLU, save_tiny_bpe_llama, write_data

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm_eval")
    paths = write_data(base / "data")
    return SimpleNamespace(model=save_tiny_bpe_llama(base / "model"), data=base / "data", **paths)


@pytest.fixture(scope="module")
def bridge(fx):
    from tokext.models.loading import load_model

    return load_model(str(fx.model))


@pytest.fixture(scope="module")
def manager(fx):
    from tokext.evaluation.lm_eval_tasks import PATH_METADATA, task_manager

    return task_manager(include_path=fx.data, metadata={PATH_METADATA: str(fx.mmlu)})


def run(bridge, manager, tasks, intervention=None, batch_size=4, engine="hooks"):
    from tokext.evaluation.lm_eval_adapter import TokextLM

    lm = TokextLM(model=bridge, intervention=intervention, batch_size=batch_size, engine=engine)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, log_samples=True, task_manager=manager)


def loglikelihoods(out):
    """Every request's log-likelihood, by task, document and choice."""
    return {
        (task, s["doc_id"], j): r[0][0]
        for task, samples in sorted(out["samples"].items())
        for s in samples
        for j, r in enumerate(s["resps"])
    }


# ---------------------------------------------------------------------- agreement with tokext's scoring


def test_mmlu_acc_equals_tokext_letter_scoring(bridge, manager, fx):
    """tokext_mmlu through lm-eval == score_letters on the same items and prompt, with and without
    an intervention; the intervention moves the scores (so the hooks reach lm-eval's requests)."""
    from tokext.evaluation.evaluate import score_letters
    from tokext.evaluation.lm_eval_adapter import as_interventions
    from tokext.evaluation.mc import load_mmlu, mmlu_harness_prompt
    from tokext.interventions import intervene

    by_text = {(it.subject, it.question): it for it in load_mmlu(fx.mmlu)}
    scores = {}
    for intervention in (None, "SinkRebalance()"):
        out = run(bridge, manager, ["tokext_mmlu"], intervention)
        samples = [s for task in sorted(out["samples"]) for s in out["samples"][task]]
        assert len(samples) == len(MMLU)  # the junk header row is dropped
        items = [by_text[(s["doc"]["subject"], s["doc"]["question"])] for s in samples]
        with intervene(bridge, *as_interventions(intervention)):
            ours = score_letters(bridge, items, batch_size=3, progress=False, prompt_fn=mmlu_harness_prompt)
        for s, item, (_, row) in zip(samples, items, ours.iterrows()):
            assert s["arguments"][0][0] == mmlu_harness_prompt(item)
            lm_ll = np.array([r[0][0] for r in s["resps"]])
            tokext_ll = np.array([row[f"logp_{x}"] for x in "ABCD"])
            assert np.abs(lm_ll - tokext_ll).max() < 1e-5, f"{item.id}: max_diff={np.abs(lm_ll - tokext_ll).max()}"
            assert s["acc"] == float(row["correct"]), item.id
        assert out["results"]["tokext_mmlu"]["acc,none"] == pytest.approx(ours["correct"].mean())
        scores[intervention] = loglikelihoods(out)
    moved = max(abs(scores[None][k] - scores["SinkRebalance()"][k]) for k in scores[None])
    assert moved > 1e-3, f"SinkRebalance did not change lm-eval's scores (max change {moved})"


def test_scores_equal_lm_eval_hflm_on_the_transformers_model(bridge, manager):
    """No intervention: the tokext model type gives lm-eval's own HFLM scores on the plain HF model."""
    from lm_eval.models.huggingface import HFLM

    tasks = ["piqa_fixture", "siqa_fixture", "tokext_mmlu_stem"]
    ours = run(bridge, manager, tasks)
    hf = HFLM(pretrained=bridge.original_model, tokenizer=bridge.tokenizer, batch_size=4)
    theirs = lm_eval.simple_evaluate(model=hf, tasks=tasks, log_samples=True, task_manager=manager)
    a, b = loglikelihoods(ours), loglikelihoods(theirs)
    assert a.keys() == b.keys() and len(a) == 6 * 2 + 5 * 3 + 8 * 4  # PIQA, SIQA, MMLU STEM requests
    diff = max(abs(a[k] - b[k]) for k in a)
    assert diff < 1e-5, f"max_diff={diff}"
    for task in tasks:
        for metric in ("acc,none", "acc_norm,none"):
            if metric in theirs["results"][task]:
                assert ours["results"][task][metric] == theirs["results"][task][metric]


# ---------------------------------------------------------------------- padding


@pytest.mark.parametrize(
    "intervention",
    ["SinkCalibration(tau=0.05, beta=0.2)", "HeadAblation(heads=[(1, 0), (2, 3)], mode='mean')", "SinkRebalance()"],
)
def test_batch_size_one_equals_four(bridge, manager, intervention):
    """Padded batches of 4 give the scores of one-by-one runs (pad rows are invisible to the
    interventions, also to the ones that average over query rows or renormalise over keys)."""
    one = loglikelihoods(run(bridge, manager, ["piqa_fixture", "siqa_fixture"], intervention, batch_size=1))
    four = loglikelihoods(run(bridge, manager, ["piqa_fixture", "siqa_fixture"], intervention, batch_size=4))
    diff = max(abs(one[k] - four[k]) for k in one)
    assert diff < 1e-5, f"{intervention}: max_diff={diff}"


@pytest.mark.parametrize(
    "intervention",
    [
        "ResidualPatch(1, positions=(0, 2), dims=(3, 5), value=4.0)",
        "MassiveActivationAblation(1, dims=(0, 1, 2, 3, 4, 5, 6, 7), abs_threshold=0.0, ratio=1.5)",
        "HeadOutputAblation(heads=[(1, 0), (2, 3)])",
    ],
)
def test_output_level_interventions_move_the_scores_padding_exactly(bridge, manager, intervention):
    """Residual and head-output edits through the model type: one-by-one equals padded batches of 4,
    both engines agree, and the log-likelihoods moved."""
    tasks = ["piqa_fixture", "siqa_fixture"]
    base = loglikelihoods(run(bridge, manager, tasks))
    one = loglikelihoods(run(bridge, manager, tasks, intervention, batch_size=1))
    four = loglikelihoods(run(bridge, manager, tasks, intervention, batch_size=4))
    streamed = loglikelihoods(run(bridge, manager, tasks, intervention, batch_size=4, engine="streaming"))
    assert max(abs(one[k] - four[k]) for k in one) < 1e-5
    assert max(abs(streamed[k] - four[k]) for k in one) < 1e-5
    assert max(abs(base[k] - four[k]) for k in one) > 1e-3


def test_streaming_engine_gives_the_hook_engines_scores(bridge, manager):
    """``engine=streaming`` in the model arguments: the same log-likelihoods, under an intervention."""
    tasks = ["piqa_fixture", "siqa_fixture"]
    hooks = loglikelihoods(run(bridge, manager, tasks, "EarlyLayerEmulation(alpha=0.5)"))
    streamed = loglikelihoods(run(bridge, manager, tasks, "EarlyLayerEmulation(alpha=0.5)", engine="streaming"))
    diff = max(abs(hooks[k] - streamed[k]) for k in hooks)
    assert diff < 1e-5, f"max_diff={diff}"


def test_unmasked_padding_would_change_the_scores(bridge):
    """lm-eval's own HFLM scoring (right-padded, no attention mask) on the same requests: one by one
    it equals the tokext model type; in padded batches SinkCalibration counts the pad rows and the
    scores move: what the masked batches above avoid."""
    from lm_eval.models.huggingface import HFLM

    from tests.tiny_lm_eval import PIQA
    from tokext.evaluation.lm_eval_adapter import TokextLM

    lm = TokextLM(model=bridge, intervention="SinkCalibration(tau=0.05, beta=0.2)", batch_size=4)
    requests = [
        ((ctx, cont), *lm._encode_pair(ctx, cont))
        for r in PIQA
        for ctx, cont in (
            (f"Question: {r['goal']}\nAnswer:", f" {r['sol1']}"),
            (f"Question: {r['goal']}\nAnswer:", f" {r['sol2']}"),
        )
    ]
    with lm.intervening():
        ours = [ll for ll, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
        lm.batch_size_per_gpu = 1
        hflm_one = [ll for ll, _ in HFLM._loglikelihood_tokens(lm, requests, disable_tqdm=True)]
        lm.batch_size_per_gpu = 4
        hflm_padded = [ll for ll, _ in HFLM._loglikelihood_tokens(lm, requests, disable_tqdm=True)]
    assert np.abs(np.array(ours) - hflm_one).max() < 1e-5
    assert np.abs(np.array(ours) - hflm_padded).max() > 1e-3


# ---------------------------------------------------------------------- generation


def test_generate_until_is_greedy_recompute_cut_at_the_stop_strings(bridge, manager):
    """generate_until (batched, left-padded, KV-cached, stop strings) == a token-by-token full
    recompute of one prompt at a time, with and without an intervention; the intervention changes text."""
    from tokext.evaluation.lm_eval_adapter import as_interventions
    from tokext.interventions import intervene

    tok = bridge.tokenizer
    texts = {}
    for intervention in (None, "SinkRebalance()"):
        out = run(bridge, manager, ["gen_fixture"], intervention, batch_size=3)
        for s in out["samples"]["gen_fixture"]:
            ids, new = list(tok(s["arguments"][0][0]).input_ids), []
            with intervene(bridge, *as_interventions(intervention)), torch.inference_mode():
                while len(new) < 6 and (not new or new[-1] != tok.eos_token_id):
                    new.append(int(bridge(torch.tensor([ids + new]))[0, -1].argmax()))
            want = tok.decode(new, skip_special_tokens=True)
            for stop in ("\n", "."):
                want = want.split(stop)[0]
            assert s["resps"][0][0] == want
            texts[(intervention, s["doc_id"])] = want
    assert any(texts[(None, d)] != texts[("SinkRebalance()", d)] for _, d in texts)


def test_sampling_is_refused(bridge):
    from tokext.errors import InputError
    from tokext.evaluation.lm_eval_adapter import TokextLM

    lm = TokextLM(model=bridge)
    context = torch.tensor([bridge.tokenizer("Q: The sky is\nA:").input_ids])
    with pytest.raises(InputError, match="greedily"):
        lm._model_generate(context, context.shape[1] + 4, ["\n"], do_sample=True, temperature=0.7)
    with pytest.raises(InputError, match="num_beams"):
        lm._model_generate(context, context.shape[1] + 4, ["\n"], do_sample=False, num_beams=4)


# ---------------------------------------------------------------------- tasks


def test_tokext_subject_map_is_lm_evals():
    """Each MMLU subject's category in tokext equals the tag of lm-eval's mmlu_<subject>.yaml."""
    import yaml

    from tokext.evaluation.lm_eval_tasks import HARNESS_CATEGORIES
    from tokext.evaluation.mc import MMLU_CATEGORIES

    theirs = {}
    for path in (Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default").glob("mmlu_*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        theirs[cfg["dataset_name"]] = HARNESS_CATEGORIES[cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks")]
    ours = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects}
    assert len(theirs) == 57 and ours == theirs


def test_category_data_round_robin_over_subjects(fx):
    from tokext.evaluation.lm_eval_tasks import PATH_METADATA, mmlu_dataset

    stem = mmlu_dataset("stem", **{PATH_METADATA: str(fx.mmlu), "version": 1.0})["test"]
    # fixture: abstract_algebra 0-2, anatomy 3-5, astronomy 6-7 -> the i-th of every subject in turn
    want = [MMLU[i] for i in (0, 3, 6, 1, 4, 7, 2, 5)]
    assert [r["question"] for r in stem] == [q for _, q, _, _ in want]
    assert [r["answer"] for r in stem] == ["ABCD".index(a) for *_, a in want]
    assert [r["choices"] for r in stem] == [list(o) for _, _, o, _ in want]
    assert len(mmlu_dataset("humanities", **{PATH_METADATA: str(fx.mmlu)})["test"]) == 4


def test_unknown_task_lists_close_matches(manager):
    from tokext.errors import InputError
    from tokext.evaluation.lm_eval_tasks import resolve_tasks

    with pytest.raises(InputError, match="unknown lm-eval task 'tokext_mmlu_stme'.*Close matches: tokext_mmlu_stem"):
        resolve_tasks(["tokext_mmlu_stme"], manager)
    assert resolve_tasks(["tokext_mmlu", " piqa_fixture"], manager) == ["tokext_mmlu", "piqa_fixture"]


# ---------------------------------------------------------------------- model arguments


def test_model_arguments_are_checked_before_loading(bridge):
    from tokext.errors import InputError, InterventionSpecError
    from tokext.evaluation.lm_eval_adapter import TokextLM, engine_options

    assert engine_options("hooks") == {"engine": "hooks"}
    with pytest.raises(InputError, match="unknown engine 'fast'"):
        TokextLM(model="no/such/model", engine="fast")
    with pytest.raises(InterventionSpecError, match="Did you mean 'EarlyLayerEmulation'"):
        TokextLM(model=bridge, intervention="EarlyLayerEmulaton()")
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        TokextLM(model=bridge, batch_size="auto")
    with pytest.raises(InputError, match="unknown model argument.*peft"):
        TokextLM(model=bridge, peft="adapter")
    with pytest.raises(InputError, match="model=SPEC"):
        TokextLM(model=bridge, pretrained="gpt2")
    lm = TokextLM(model=bridge, intervention="[SinkRebalance(scale=0.5), EarlyLayerEmulation()]")
    assert [repr(iv) for iv in lm.interventions] == ["SinkRebalance(scale=0.5)", "EarlyLayerEmulation()"]
    assert lm.get_model_info()["tokext_interventions"] == ["SinkRebalance(scale=0.5)", "EarlyLayerEmulation()"]


def test_intervention_text_errors_are_one_line():
    from tokext.errors import InputError, InterventionSpecError
    from tokext.interventions import EarlyLayerEmulation, SinkCalibration, parse_interventions

    assert parse_interventions("SinkCalibration(tau=0.2, beta=0.5)") == (SinkCalibration(tau=0.2, beta=0.5),)
    assert parse_interventions(repr(EarlyLayerEmulation(alpha=0.3, uniform=True))) == (
        EarlyLayerEmulation(alpha=0.3, uniform=True),
    )
    bad = {
        "EarlyLayerEmulation(": "does not parse",
        "Nope()": "unknown intervention 'Nope'",
        "EarlyLayerEmulation(alfa=0.1)": "no parameter 'alfa'. Did you mean 'alpha'?",
        "EarlyLayerEmulation(alpha=__import__('os').getpid())": "is not a literal",
        "EarlyLayerEmulation(**{'alpha': 1})": "** arguments are not allowed",
        "SinkCalibration(beta=2.0)": "beta",
        "HeadAblation()": "heads",
        "[]": "empty list",
        "os.system('true')": "expected a call",
    }
    for text, message in bad.items():
        with pytest.raises(InterventionSpecError) as err:
            parse_interventions(text)
        assert message in str(err.value) and "\n" not in str(err.value), (text, str(err.value))
        assert isinstance(err.value, InputError)


# ---------------------------------------------------------------------- the command lines


def _env():
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_lm_eval_command_line_runs_model_type_tokext(fx, tmp_path):
    """`tokext lm-eval` is lm-eval's CLI with --model tokext registered (lm-eval 0.4 has no model plugins)."""
    cmd = [
        sys.executable,
        "-m",
        "tokext",
        "lm-eval",
        "--model",
        "tokext",
        "--model_args",
        f'model={fx.model},intervention="SinkCalibration(tau=0.05, beta=0.2)"',
        "--tasks",
        "piqa_fixture",
        "--include_path",
        str(fx.data),
        "--limit",
        "2",
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--output_path",
        str(tmp_path / "out"),
        "--log_samples",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["piqa_fixture"]["sample_len"] == 2
    assert results["config"]["tokext_interventions"] == ["SinkCalibration(tau=0.05, beta=0.2)"]
    assert list((tmp_path / "out").rglob("samples_piqa_fixture_*.jsonl"))


def test_python_equivalent_by_registered_name(fx, bridge, manager):
    """simple_evaluate(model="tokext", model_args="...") after importing the adapter: the same scores
    as a TokextLM built by hand (the intervention's own comma does not split the arguments)."""
    import tokext.evaluation.lm_eval_adapter  # noqa: F401  (registers "tokext")

    intervention = "SinkCalibration(tau=0.05, beta=0.2)"
    by_name = lm_eval.simple_evaluate(
        model="tokext",
        model_args=f"model={fx.model},intervention={intervention}",
        tasks=["siqa_fixture"],
        log_samples=True,
        task_manager=manager,
        batch_size=2,
    )
    assert by_name["config"]["tokext_interventions"] == [intervention]
    by_hand = run(bridge, manager, ["siqa_fixture"], intervention)
    a, b = loglikelihoods(by_name), loglikelihoods(by_hand)
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5


def test_tokext_eval_runs_pairs_and_resumes(fx, tmp_path, capsys):
    from tokext.cli.main import main
    from tokext.evaluation.lm_eval_tasks import PATH_METADATA

    out = tmp_path / "eval"
    argv = [
        "eval",
        "--model",
        str(fx.model),
        "--tasks",
        "tokext_mmlu,piqa_fixture",
        "--limit",
        "4",
        "--include-path",
        str(fx.data),
        "--metadata",
        json.dumps({PATH_METADATA: str(fx.mmlu)}),
        "--intervention",
        "SinkRebalance()",
        "--out",
        str(out),
        "--batch-size",
        "3",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "SinkRebalance()" in printed and "tokext_mmlu " in printed
    runs = {p.parent.name: p for p in out.glob("runs/*/results.json")}
    assert set(runs) == {"baseline", next(n for n in runs if n.startswith("SinkRebalance"))}
    results = json.loads(runs["baseline"].read_text())
    assert results["results"]["tokext_mmlu_stem"]["sample_len"] == 4
    assert results["results"]["tokext_mmlu_humanities"]["sample_len"] == 4

    def correct(label, task):
        lines = (out / "runs" / label / "samples" / f"{task}.jsonl").read_text().splitlines()
        return {json.loads(x)["doc_id"]: json.loads(x)["acc"] for x in lines}

    import pandas as pd

    table = pd.read_csv(out / "paired.csv")
    method = next(n for n in runs if n != "baseline")
    for task, leaves in (
        ("piqa_fixture", ["piqa_fixture"]),
        ("tokext_mmlu", [f"tokext_mmlu_{c}" for c in ("stem", "humanities", "social_sciences", "other")]),
    ):
        b = [v for leaf in leaves for _, v in sorted(correct("baseline", leaf).items())]
        m = [v for leaf in leaves for _, v in sorted(correct(method, leaf).items())]
        row = table[(table["task"] == task) & (table["metric"] == "acc")].iloc[0]
        assert row["n"] == len(b) == len(m)
        assert row["acc_baseline"] == pytest.approx(np.mean(b)) and row["acc_method"] == pytest.approx(np.mean(m))
        assert row["n01"] == sum(x < y for x, y in zip(b, m)) and row["n10"] == sum(x > y for x, y in zip(b, m))
        assert row["ci_lo"] <= row["diff"] <= row["ci_hi"]
    assert set(table.loc[table["task"] == "piqa_fixture", "metric"]) == {"acc", "acc_norm"}

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}
    assert main(argv) == 0  # same settings: both runs are reused, not redone
    assert "finished earlier" in capsys.readouterr().out
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}
    other = [a if a != "4" else "3" for a in argv]  # another limit into the same folder: refused, one line
    assert main(other) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings (limit differ)" in err and "\n" not in err


def test_tokext_eval_bad_input_is_one_line(tmp_path, capsys):
    from tokext.cli.main import main

    assert (
        main(["eval", "--tasks", "tokext_mmlu", "--intervention", "EarlyLayerEmulation(alpha=", "--out", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokext eval: error: intervention") and "does not parse" in err and "\n" not in err
    assert main(["eval", "--model", "./no-such-dir", "--tasks", "tokext_mmlu", "--out", str(tmp_path)]) == 2
    assert "no such .gguf file or model directory" in capsys.readouterr().err


def test_tokext_eval_never_overwrites_a_users_file(fx, tmp_path, capsys):
    from tokext.cli.main import main

    mine = tmp_path / "paired.csv"
    mine.write_text("my,own,table\n1,2,3\n")
    assert main(["eval", "--model", str(fx.model), "--tasks", "tokext_mmlu", "--out", str(tmp_path)]) == 2
    assert "is not a tokext eval table" in capsys.readouterr().err
    assert mine.read_text() == "my,own,table\n1,2,3\n"


def test_missing_extra_names_it():
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from tokext.cli.main import main\n"
        "raise SystemExit(main(['eval', '--tasks', 'tokext_mmlu']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "pip install 'tokext[eval]'" in done.stderr, done.stderr
