"""``tokext reproduce``: the whole study in one command, cached step by step.

On SmolLM2-135M-Instruct (and the trained model organism) it runs the attention analysis, the
intervention profiles, the core ablation study, MMLU by category, the computed-token study and the
fine-tuning diagnostic, the long-context study, the sink-anatomy study and the causal study (both with
Gemma 3 270M), then rebuilds every figure into ``figures/`` with ``figures/REPORT.md``.
Each step writes its results folder under ``results/reproduce/<mode>/`` and a ``provenance.json``
last; a step whose provenance exists is skipped (``--force`` empties the step folders and recomputes).
Sizes per mode:
``quick`` (a smoke run, < 3 min), ``default`` (< 20 min on 2 CPU cores), ``full`` (the complete
grids of ``experiments/*.toml``; hours on a CPU).

The default mode draws figure 9 from the committed long-context study
(``experiments/results/long_context/``, 512 to 32k tokens, hours on a CPU) rather than rerunning a
shorter one, so ``make demo`` on a fresh clone rewrites ``figures/`` with the bytes committed there;
``rerun_long_context=True`` (``--rerun-long-context``) runs the mode's own 512-8k study instead.
In the same way, on the default model, the sink-anatomy and causal steps copy their committed runs
(``experiments/results/anatomy/`` and ``causal/``, the sizes ``experiments/anatomy.py`` and
``experiments/causal.py`` ran) so that figures 10 and 11 come back as committed;
``rerun_studies=True`` (``--rerun-studies``) runs them at the mode's own sizes.
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tokext.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
LONG_CONTEXT_STUDY = ROOT / "experiments" / "results" / "long_context"
"""The committed full long-context study (``experiments/long_context.py``; absent from an installed wheel)."""
LONG_CONTEXT_FILES = ("layers.csv", "positions.csv", "hidden_sinks.csv", "runs.csv", "provenance.json")
COMMITTED_STUDIES = {
    "anatomy": ROOT / "experiments" / "results" / "anatomy",
    "causal": ROOT / "experiments" / "results" / "causal",
}
"""Committed runs of the sink-anatomy and causal studies, copied by the default mode on the default model."""


@dataclass(frozen=True)
class Sizes:
    """How big each step of a mode is."""

    analyze_prompts: int
    profile_prompts: int
    ablation_items: int | None  # items per cell (None: the config's n)
    mmlu_items: int | None
    computed_items: int
    computed_counts: tuple[int, ...]
    finetune_steps: int
    organism_steps: int
    organism_items: int | None  # problems per organism sweep cell (None: the config's n)
    long_lengths: tuple[int, ...] = (512, 2048)  # the long-context study's context lengths
    long_windows: tuple[int, ...] = (1,)  # its text windows per length (one count, or one per length)
    anatomy_sequences: int = 64  # natural-text rows of T = 64 tokens per model in the sink-anatomy study
    causal_chunks: tuple[int, int, int] = (32, 128, 16)  # the causal study: scored chunks, tokens, calibration


MODES = {
    "quick": Sizes(
        analyze_prompts=8,
        profile_prompts=4,
        ablation_items=2,
        mmlu_items=2,
        computed_items=4,
        computed_counts=(0, 8),
        finetune_steps=4,
        organism_steps=30,
        organism_items=8,
        long_lengths=(64, 256),
        long_windows=(1,),
        anatomy_sequences=4,
        causal_chunks=(4, 32, 2),
    ),
    "default": Sizes(
        analyze_prompts=64,
        profile_prompts=16,
        ablation_items=None,
        mmlu_items=None,
        computed_items=24,
        computed_counts=(0, 4, 16, 64),
        finetune_steps=60,
        organism_steps=1500,
        organism_items=None,
        long_lengths=(512, 1024, 2048, 4096, 8192),
        long_windows=(2, 2, 1, 1, 1),
        anatomy_sequences=64,
    ),
    "full": Sizes(
        analyze_prompts=80,
        profile_prompts=80,
        ablation_items=None,
        mmlu_items=None,
        computed_items=80,
        computed_counts=(0, 1, 2, 4, 8, 16, 32, 64),
        finetune_steps=300,
        organism_steps=3000,
        organism_items=None,
        long_lengths=(512, 1024, 2048, 4096, 8192, 16384, 32768),
        long_windows=(4, 4, 4, 2, 2, 1, 1),
        anatomy_sequences=100,
        causal_chunks=(64, 256, 32),
    ),
}


def write_provenance(folder: Path, **fields: Any) -> None:
    """Mark a step as done: its settings, the tokext version, git revision and date."""
    from tokext.studies.sweep import git_revision
    from tokext.version import __version__

    record = {
        **fields,
        "tokext": __version__,
        "git": git_revision(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (folder / "provenance.json").write_text(json.dumps(record, indent=1, default=str))


class Reproduction:
    """Runs the steps of one mode into ``results/reproduce/<mode>/``, reusing finished steps."""

    def __init__(
        self,
        mode: str = "default",
        *,
        results: str | Path = "results/reproduce",
        model: str = "smollm2-135m",
        force: bool = False,
        log: Callable[[str], None] = print,
        executor: Any = "serial",
        rerun_long_context: bool = False,
        long_context_study: str | Path = LONG_CONTEXT_STUDY,
        anatomy_models: Sequence[str] | None = None,
        rerun_studies: bool = False,
        committed_studies: dict[str, Path] | None = None,
    ):
        """``executor``: where the sweep steps' cells run (``"serial"``, ``"ray"`` or an executor of
        :mod:`tokext.studies.executors`); the other steps run in this process. In the default mode
        the long-context step copies the results in ``long_context_study`` (when they are there)
        unless ``rerun_long_context``; so do the anatomy and causal steps with ``committed_studies`` (default
        :data:`COMMITTED_STUDIES`) on the default model and anatomy models, unless ``rerun_studies``.
        ``anatomy_models``: the models of the sink-anatomy step
        (default: ``model`` and Gemma 3 270M), checked here."""
        from tokext.models.loading import DEFAULT_MODEL
        from tokext.studies.anatomy import check_plan
        from tokext.studies.executors import make_executor

        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}: choose one of {sorted(MODES)}")
        if anatomy_models is None:
            anatomy_models = list(dict.fromkeys([model, "gemma3-270m"]))
        self.anatomy_models = check_plan(anatomy_models, MODES[mode].anatomy_sequences)
        self.mode, self.sizes, self.model_spec, self.force, self.log = mode, MODES[mode], model, force, log
        self.root = Path(results) / mode
        self._model = None
        self.timings: dict[str, float] = {}
        study = Path(long_context_study)
        self.long_context_source = (
            study if mode == "default" and not rerun_long_context and (study / "provenance.json").is_file() else None
        )
        default_plan = model == DEFAULT_MODEL and list(self.anatomy_models) == [DEFAULT_MODEL, "gemma3-270m"]
        self.study_sources = {
            name: Path(path)
            for name, path in (COMMITTED_STUDIES if committed_studies is None else committed_studies).items()
            if mode == "default" and default_plan and not rerun_studies and _complete(name, Path(path))
        }
        self._owns_executor = isinstance(executor, str)
        self.executor = make_executor(executor) if self._owns_executor else executor

    @property
    def model(self) -> Any:
        if self._model is None:
            from tokext.models.loading import load_model

            self._model = load_model(self.model_spec)
        return self._model

    def step(self, name: str, run: Callable[[Path], None]) -> Path:
        folder = self.root / name
        if (folder / "provenance.json").is_file() and not self.force:
            self.log(f"[{name}] cached in {folder}/")
            return folder
        if folder.is_dir() and self.force:  # --force: this step's own cache folder starts empty
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.log(f"[{name}] running ...")
        start = time.perf_counter()
        run(folder)
        self.timings[name] = time.perf_counter() - start
        if not (folder / "provenance.json").is_file():  # e.g. a study script that writes into subfolders
            write_provenance(folder, step=name, mode=self.mode, seconds=round(self.timings[name], 1))
        self.log(f"[{name}] done in {self.timings[name]:.0f} s")
        return folder

    # ------------------------------------------------------------------ steps

    def analyze(self, folder: Path) -> None:
        from tokext.models.info import model_info
        from tokext.studies.analyze import analyze

        result = analyze(self.model, n=self.sizes.analyze_prompts, out=folder, progress=False)
        write_provenance(
            folder,
            model=model_info(self.model).name,
            data="built-in prompts",
            n_prompts=result.stats.n_sequences,
            seconds=result.seconds,
        )

    def patterns(self, folder: Path) -> None:
        """Full patterns of a few heads on one prompt (small: one prompt, a handful of heads)."""
        import torch

        from tokext.models.devices import input_device
        from tokext.models.hooks import attached, pattern_hook_name
        from tokext.models.info import model_info

        prompt = "The capital of France is Paris, and the capital of Germany is Berlin."
        info = model_info(self.model)
        layers = [0, 1, min(5, info.n_layers - 1), info.n_layers - 1]
        heads = [0, 0, 0, 0]
        tokens = self.model.tokenizer(prompt, return_tensors="pt").input_ids.to(input_device(self.model))
        kept: dict[int, np.ndarray] = {}

        def keep(layer: int):
            def hook(pattern, hook):
                kept[layer] = pattern[0, heads[layers.index(layer)]].float().cpu().numpy()

            return hook

        hooks = [(pattern_hook_name(layer), keep(layer)) for layer in layers]
        with attached(self.model, hooks), torch.inference_mode():
            self.model(tokens)
        texts = [self.model.tokenizer.decode([t]) for t in tokens[0].tolist()]
        np.savez_compressed(
            folder / "patterns.npz",
            patterns=np.stack([kept[layer] for layer in layers]),
            layers=np.array(layers),
            heads=np.array(heads),
            tokens=np.array(texts),
        )
        write_provenance(folder, model=info.name, prompt=prompt, layers=layers, heads=heads)

    def profiles(self, folder: Path) -> None:
        from tokext.evaluation.prompts import load_prompts
        from tokext.models.info import model_info
        from tokext.studies.profiles import default_interventions, intervention_profiles

        info = model_info(self.model)
        prompts = load_prompts(None, self.sizes.profile_prompts)
        summary, by_layer = intervention_profiles(
            self.model, prompts, default_interventions(info.n_layers, info.n_heads)
        )
        summary.to_csv(folder / "summary.csv", index=False, float_format="%.5g")
        by_layer.to_csv(folder / "by_layer.csv", index=False, float_format="%.5g")
        write_provenance(
            folder,
            model=info.name,
            data="built-in prompts",
            n_prompts=len(prompts),
            interventions=list(summary["intervention"]),
        )

    def _sweep(
        self,
        folder: Path,
        config_name: str | None,
        full_configs: list[str],
        limit: int | None,
        model: Any = None,
        model_spec: str | None = None,
    ) -> None:
        """Run the packaged ``config_name`` (``experiments/<full_configs>`` in full mode, or always
        when ``config_name`` is None) on ``model`` (default: the main model) and summarise it."""
        from tokext.models.info import model_info
        from tokext.studies.config import load_config
        from tokext.studies.sweep import run_sweep, summarize

        model = model if model is not None else self.model
        model_spec = model_spec or self.model_spec
        configs = (
            [ROOT / "experiments" / name for name in full_configs]
            if self.mode == "full" or not config_name
            else [resources.files("tokext").joinpath(f"data/{config_name}")]
        )
        for config_path in configs:
            if not Path(str(config_path)).is_file():
                raise InputError(f"{config_path} not found: `tokext reproduce` runs from a checkout of the repository")
            config = load_config(str(config_path))
            # serial: the model already loaded here; elsewhere each worker loads model_spec itself
            loader = (lambda spec: model) if self.executor.name == "serial" else None
            run_sweep(
                config,
                folder,
                limit=limit,
                models=[model_spec],
                progress=False,
                loader=loader,
                force=True,
                log=self.log,
                executor=self.executor,
            )
        summarize(folder)
        write_provenance(folder, model=model_info(model).name, config=[Path(str(c)).name for c in configs], limit=limit)

    def ablation(self, folder: Path) -> None:
        self._sweep(
            folder, "reproduce_ablation.toml", ["a_method.toml", "b_neighbours.toml"], self.sizes.ablation_items
        )

    def mmlu(self, folder: Path) -> None:
        self._sweep(folder, "reproduce_mmlu.toml", ["d_mmlu.toml"], self.sizes.mmlu_items)

    def organism(self, folder: Path) -> None:
        """Train the model organism, measure it, and keep its attention statistics and training log."""
        import pandas as pd

        from tokext.attention.collect import collect_attention_stats
        from tokext.evaluation.organism import evaluate_organism, organism_prompts
        from tokext.models.organism import save_organism
        from tokext.studies.organism import train_organism

        org = train_organism(steps=self.sizes.organism_steps, seed=0, progress=False)
        save_organism(org, folder / "model", overwrite=True)
        stats = collect_attention_stats(
            org.model,
            organism_prompts(org, 200, seed=0),
            tokenizer=org.tokenizer,
            progress=False,
            dataset="organism held-out CoT prompts",
        )
        stats.metadata["model"] = "organism (2-layer native, CoT arithmetic)"
        stats.save(folder / "stats.npz")
        pd.DataFrame(org.log).to_csv(folder / "training_log.csv", index=False)
        n_eval = 200 if self.mode != "quick" else 20
        accuracy = {
            "cot": evaluate_organism(org, n=n_eval, cot=True),
            "direct": evaluate_organism(org, n=n_eval, cot=False),
        }
        write_provenance(
            folder,
            model="organism",
            steps=self.sizes.organism_steps,
            seed=0,
            config=org.config,
            accuracy=accuracy,
            first_token_mass=stats.first_token_mass.tolist(),
        )

    def organism_ablation(self, folder: Path) -> None:
        """experiments/organism.toml on the organism trained by the ``organism`` step."""
        from tokext.models.loading import load_model

        trained = self.root / "organism" / "model"
        self._sweep(
            folder,
            None,
            ["organism.toml"],
            self.sizes.organism_items,
            model=load_model(str(trained)),
            model_spec=str(trained),
        )

    @staticmethod
    def _run_main(main: Callable[[list[str]], int], argv: list[str], what: str) -> None:
        """Run a study's command-line ``main(argv)``; a non-zero status is an error."""
        code = main(argv)
        if code:
            raise InputError(f"{what} exited with status {code}")

    def computed_tokens(self, folder: Path) -> None:
        from tokext.studies.computed_tokens_run import main

        counts = ",".join(str(c) for c in self.sizes.computed_counts)
        self._run_main(
            main,
            [
                "--model",
                self.model_spec,
                "--task",
                "arithmetic",
                "--level",
                "1",
                "--n",
                str(self.sizes.computed_items),
                "--counts",
                counts,
                "--out",
                str(folder),
                "--force",
            ],
            "the computed-token study",
        )

    def finetune(self, folder: Path) -> None:
        from tokext.studies.finetune import main

        argv = ["--model", self.model_spec, "--steps", str(self.sizes.finetune_steps), "--out", str(folder)]
        if self.mode == "quick":
            argv += ["--n-eval", "4", "--n-natural", "4", "--n-train", "8"]
        self._run_main(main, argv, "the fine-tuning diagnostic")

    def long_context(self, folder: Path) -> None:
        """Attention against context length and query position (the streaming engine; beyond the
        trained context with the n_ctx override, on a model loaded for it)."""
        from tokext.models.loading import load_model
        from tokext.studies.long_context import run_long_context

        if self.long_context_source is not None:  # the committed full study, copied as it is
            for name in LONG_CONTEXT_FILES:
                if (self.long_context_source / name).is_file():
                    shutil.copy2(self.long_context_source / name, folder / name)
            self.log(f"[long_context] copied from {self.long_context_source} (--rerun-long-context runs it)")
            return
        longest = max(self.sizes.long_lengths)
        model = self.model
        if longest > int(model.cfg.n_ctx):
            model = load_model(self.model_spec, n_ctx=longest)
        run_long_context(model, folder, lengths=self.sizes.long_lengths, windows=self.sizes.long_windows, log=self.log)

    def _copied(self, name: str, folder: Path) -> bool:
        """Copy the committed run of study ``name`` into its step folder when the plan says so."""
        source = self.study_sources.get(name)
        if source is None:
            return False
        shutil.copytree(source, folder, dirs_exist_ok=True)
        self.log(f"[{name}] copied from {source} (--rerun-studies runs it)")
        return True

    def anatomy(self, folder: Path) -> None:
        """The sink-anatomy study (:mod:`tokext.studies.anatomy`) on ``anatomy_models`` at T = 64; each
        model's run is saved as it finishes, so an interrupted step resumes with the models done."""
        if self._copied("anatomy", folder):
            return
        from tokext.models.loading import load_model
        from tokext.studies.anatomy import run_anatomy

        def loader(spec: str) -> Any:
            return self.model if spec == self.model_spec else load_model(spec)

        run_anatomy(folder, self.anatomy_models, n=self.sizes.anatomy_sequences, loader=loader, log=self.log)

    def causal(self, folder: Path) -> None:
        """The causal study (:mod:`tokext.studies.causal`) on the reproduction's model and, outside quick
        mode, on Gemma 3 270M (smaller sizes: its 262k-token unembedding dominates the cost on a CPU)."""
        if self._copied("causal", folder):
            return
        from tokext.models.loading import load_model
        from tokext.studies.causal import CausalSettings, run_causal

        n, length, calib = self.sizes.causal_chunks
        if self.mode == "quick":
            settings = CausalSettings(
                n_chunks=n, length=length, calib_chunks=calib, stats_chunks=n, shares=(0.1,), n_boot=200
            )
            run_causal(self.model, self.model_spec, folder, settings, log=self.log)
            return
        settings = CausalSettings(n_chunks=n, length=length, calib_chunks=calib, stats_chunks=min(n, 16), batch_size=4)
        run_causal(self.model, self.model_spec, folder, settings, log=self.log)
        if self.model_spec != "gemma3-270m":
            small = CausalSettings(
                n_chunks=n // 2,
                length=length,
                calib_chunks=calib // 2,
                stats_chunks=min(n // 2, 8),
                batch_size=4,
                shares=(0.05, 0.1, 0.2),
            )
            run_causal(load_model("gemma3-270m"), "gemma3-270m", folder, small, log=self.log)

    # ------------------------------------------------------------------ all

    def run(self, figures_dir: str | Path = "figures") -> Path:
        from tokext.viz.figures import build_all

        steps = [
            ("analyze", self.analyze),
            ("patterns", self.patterns),
            ("profiles", self.profiles),
            ("ablation", self.ablation),
            ("mmlu", self.mmlu),
            ("organism", self.organism),
            ("organism_ablation", self.organism_ablation),
            ("computed_tokens", self.computed_tokens),
            ("finetune", self.finetune),
            ("long_context", self.long_context),
            ("anatomy", self.anatomy),
            ("causal", self.causal),
        ]
        try:
            for name, run in steps:
                self.step(name, run)
        finally:
            if self._owns_executor:
                self.executor.close()
        figures = build_all(self.root, figures_dir, tables=report_tables(self.root))
        self.log(f"{len(figures)} figures and REPORT.md written to {figures_dir}/")
        return Path(figures_dir)


def report_tables(root: Path) -> str:
    """Markdown tables of the headline numbers (paired differences with 95% CIs)."""
    import pandas as pd

    parts = []
    for name, title in [
        ("ablation", "Ablation (reasoning task)"),
        ("mmlu", "MMLU by category (letter scoring)"),
        ("organism_ablation", "Model organism (its held-out arithmetic, greedy, exact answer)"),
    ]:
        path = root / name / "summary.csv"
        if not path.is_file():
            continue
        table = pd.read_csv(path)
        rows = [
            (
                "| task | level | prompt | intervention | n | accuracy | diff [95% CI] | McNemar p | loss | "
                "delta loss [95% CI] |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in table.itertuples(index=False):
            is_base = r.cell_id == r.baseline_id
            diff = "baseline" if is_base else f"{r.diff:+.3f} [{r.ci_lo:+.3f}, {r.ci_hi:+.3f}]"
            p = "" if is_base else f"{r.p_mcnemar:.3f}"
            dl = "" if is_base else f"{r.delta_loss:+.4f}"
            if not is_base and pd.notna(getattr(r, "dloss_lo", float("nan"))):
                dl += f" [{r.dloss_lo:+.4f}, {r.dloss_hi:+.4f}]"
            form = "CoT" if str(r.cot) == "True" else ("letter" if r.method == "letter" else "direct")
            rows.append(
                f"| {r.task} | {r.level} | {form} | {'none' if is_base else r.intervention} | {r.n_items} | "
                f"{r.accuracy:.3f} | {diff} | {p} | {r.loss:.4f} | {dl} |"
            )
        parts.append(f"## {title}\n\n" + "\n".join(rows))
    path = root / "profiles" / "summary.csv"
    if path.is_file():
        table = pd.read_csv(path)
        rows = [
            "| intervention | loss without | loss with | max abs delta logit | first-token mass without -> with |",
            "|---|---|---|---|---|",
        ]
        for r in table.itertuples(index=False):
            rows.append(
                f"| {r.intervention} | {r.loss_without:.4f} | {r.loss_with:.4f} | {r.max_abs_delta_logit:.2f} | "
                f"{r.first_mass_without:.3f} -> {r.first_mass_with:.3f} |"
            )
        parts.append(
            "## Interventions at default settings: next-token loss on the built-in prompts\n\n" + "\n".join(rows)
        )
    return "\n\n".join(parts)


def _complete(name: str, folder: Path) -> bool:
    """Whether ``folder`` holds a finished run of study ``name`` (its provenance, or a model's settings)."""
    if name == "causal":
        return any(folder.glob("*/settings.json"))
    return (folder / "provenance.json").is_file()
