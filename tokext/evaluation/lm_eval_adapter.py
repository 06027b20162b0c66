"""The lm-evaluation-harness model type ``tokext``: lm-eval's requests scored by a tokext model with
interventions active.

:class:`TokextLM` subclasses lm-eval's ``HFLM`` (its tokenisation, request handling, chat templates
and ``generate_until`` bookkeeping are lm-eval's own) around a TransformerBridge from
:func:`tokext.load_model`. Every forward pass goes through the bridge inside
``tokext.intervene(bridge, *interventions)``, so tokext's hooks fire in loglikelihood,
loglikelihood_rolling and generate_until requests alike:

- **loglikelihood**: HFLM right-pads its batches and calls the model without an attention mask, so
  a hook cannot tell pad rows from real ones (interventions that average over queries, such as
  ``SinkCalibration``, would count pad rows). :meth:`TokextLM._loglikelihood_tokens` therefore runs
  tokext's own padded batches (:func:`tokext.evaluation.evaluate.forward_batches`), which pass the
  mask; requests sharing a model input share one forward pass (lm-eval's logits cache). The
  scores are lm-eval's: the summed log-probability of the continuation and whether it is greedy.
- **generate_until**: greedy decoding by :func:`tokext.evaluation.generation.greedy_generate` (left
  padding with the mask, KV cache) with lm-eval's stop strings; sampling is refused.

Registered as ``tokext`` in lm-eval's model registry when this module is imported. lm-eval 0.4
discovers no model plugins, so ``lm_eval --model tokext`` needs the registration first:
``tokext lm-eval ...`` (:func:`run_lm_eval_cli`) is lm-eval's own command line with the model type
registered and ``tokext_mmlu`` on the task path. Model arguments: ``model`` (a tokext model spec,
or a loaded bridge from Python), ``intervention`` (text such as ``"EarlyLayerEmulation(alpha=0.2)"``,
a list of such calls, or Intervention objects), ``engine`` (``hooks``, ``streaming`` or ``auto``), ``batch_size``,
``max_length``, ``device``, ``dtype``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tokext.attention.engines.choose import check_engine
from tokext.errors import InputError
from tokext.evaluation.lm_eval_tasks import require_lm_eval

require_lm_eval()

import torch  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

MODEL_TYPE = "tokext"

_HFLM_OPTIONS = (
    "add_bos_token",
    "prefix_token_id",
    "truncation",
    "think_end_token",
    "enable_thinking",
    "chat_template_args",
    "max_batch_size",
)
_DTYPES = {"auto": torch.float32, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_log = logging.getLogger(__name__)


def engine_options(engine: str) -> dict[str, str]:
    """The keyword arguments that select ``engine`` in :func:`tokext.intervene` (``"hooks"``,
    ``"streaming"`` or ``"auto"``, checked here so a bad name fails before the model loads)."""
    return {"engine": check_engine(engine)}


def as_interventions(value: Any) -> tuple[Any, ...]:
    """Interventions from ``None``, text (:func:`tokext.interventions.parse_interventions`), an
    Intervention, or a sequence of those (applied in order)."""
    from tokext.interventions import Intervention, parse_interventions

    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return parse_interventions(value)
    if isinstance(value, Intervention):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(iv for v in value for iv in as_interventions(v))
    raise InputError(
        f"intervention must be text such as 'EarlyLayerEmulation(alpha=0.2)' or Intervention objects, "
        f"got {type(value).__name__} {value!r}"
    )


@register_model(MODEL_TYPE)
class TokextLM(HFLM):
    """lm-eval model type ``tokext`` (see the module docstring for the arguments).

    ``TokextLM(model=bridge, intervention="SinkRebalance()")`` can be passed to
    ``lm_eval.simple_evaluate(model=...)``; ``model="tokext"`` with ``model_args`` works once this
    module is imported.
    """

    def __init__(
        self,
        model: Any = "smollm2-135m",
        intervention: Any = None,
        engine: str = "hooks",
        batch_size: int | str = 1,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **options: Any,
    ) -> None:
        from tokext.interventions.base import validate
        from tokext.models.info import model_info

        for key in ("pretrained", "tokenizer", "backend"):
            if key in options:
                raise InputError(
                    f"the {MODEL_TYPE} model type takes model=SPEC (a tokext model spec: a name, a model "
                    f"directory or a .gguf file), not {key}="
                )
        unknown = sorted(set(options) - set(_HFLM_OPTIONS))
        if unknown:
            raise InputError(
                f"unknown model argument(s) {', '.join(unknown)} for the {MODEL_TYPE} model type; it takes "
                f"model, intervention, engine, batch_size, max_length, device, dtype, {', '.join(_HFLM_OPTIONS)}"
            )
        if isinstance(batch_size, str) and not batch_size.strip().isdigit():
            raise InputError(
                f"batch_size must be a positive integer for the {MODEL_TYPE} model type, got {batch_size!r}"
            )
        if int(batch_size) < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.engine = engine
        self._engine_options = engine_options(engine)
        self.interventions = as_interventions(intervention)
        bridge = _load(model, device, dtype)
        validate(bridge, self.interventions, f"the {MODEL_TYPE} lm-eval model")
        self.bridge = bridge
        self.spec = model if isinstance(model, str) else model_info(bridge).name
        # HFLM warns that arguments of a pre-built model may be ignored: here none is (see _HFLM_OPTIONS)
        with drop_log_messages(
            "lm_eval.models.huggingface",
            "`pretrained` model kwarg is not of type `str`",
            "Passed an already-initialized model",
        ):
            super().__init__(
                pretrained=bridge.original_model,
                tokenizer=bridge.tokenizer,
                backend="causal",
                batch_size=int(batch_size),
                max_length=max_length or model_info(bridge).n_ctx,
                **options,
            )
        bridge.eval()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TokextLM:
        """As lm-eval's, but a comma inside brackets or quotes does not split the arguments, so
        ``"model=smollm2-135m,intervention=SinkCalibration(tau=0.1, beta=0.5)"`` works from Python
        as it does on lm-eval's command line (which splits the same way)."""
        from lm_eval._cli.utils import key_val_to_dict

        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**key_val_to_dict(arg_string or ""), **extra)

    # ------------------------------------------------------------------ interventions on every request

    @contextmanager
    def intervening(self) -> Iterator[Any]:
        """``tokext.intervene(bridge, *interventions)`` with this model's engine."""
        from tokext.interventions import intervene

        with intervene(self.bridge, *self.interventions, engine=self._engine_options["engine"]) as run:
            yield run

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's log-likelihood requests, scored with the interventions active."""
        with self.intervening():
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling (perplexity) requests, scored with the interventions active."""
        with self.intervening():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """lm-eval's generation requests, generated with the interventions active."""
        with self.intervening():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    # ------------------------------------------------------------------ forward passes through the bridge

    def _loglikelihood_tokens(
        self,
        requests: Sequence[tuple[Any, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), continuation is greedy)`` per request, in order.

        Each model input is ``(context + continuation)[:-1]``, cut from the left to ``max_length``
        as HFLM does; requests with the same input share one forward pass. Batches are tokext's
        right-padded ones with their attention mask.
        """
        from tokext.evaluation.evaluate import forward_batches

        inputs: dict[tuple[int, ...], int] = {}
        users: list[list[int]] = []  # input index -> requests scored from its logits
        for r, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise InputError(
                    f"request {r}: context and continuation must be non-empty and the continuation at "
                    f"most {self.max_length} tokens, got {len(context)} and {len(continuation)}"
                )
            whole = list(context) + list(continuation)
            if len(whole) > self.max_length + 1:
                _log.warning(
                    "context of %d + continuation of %d tokens exceeds max_length %d: cut from the left",
                    len(context),
                    len(continuation),
                    self.max_length,
                )
            key = tuple(whole[-(self.max_length + 1) :][:-1])
            if key not in inputs:
                inputs[key] = len(users)
                users.append([])
            users[inputs[key]].append(r)
        results: list[tuple[float, bool] | None] = [None] * len(requests)

        def take(logits: torch.Tensor, length: int, index: int) -> None:
            for r in users[index]:
                _, _, continuation = requests[r]
                n = len(continuation)
                rows = logits[length - n : length].float().log_softmax(-1)
                target = torch.tensor(continuation, device=rows.device)
                score = float(rows.gather(-1, target[:, None]).sum())
                answer = (score, bool((rows.argmax(-1) == target).all()))
                results[r] = answer
                if requests[r][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[r][0], answer)

        forward_batches(
            self.bridge,
            [list(k) for k in inputs],
            override_bs or self.batch_size,
            take,
            progress=not disable_tqdm and self.rank == 0,
            desc="loglikelihood",
        )
        return results  # type: ignore[return-value]

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of unpadded inputs through the bridge (HFLM's hook for other callers; scoring uses
        :meth:`_loglikelihood_tokens`)."""
        if labels is not None:
            raise InputError(f"the {MODEL_TYPE} model type evaluates decoder-only models")
        with torch.inference_mode():
            return self.bridge(inps, attention_mask=attn_mask)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        """Greedy continuation of the left-padded ``context`` rows up to ``max_length`` tokens in all,
        as ``[batch, context + new]`` (rows that stop early are filled with the pad id)."""
        from tokext.evaluation.generation import greedy_generate

        mask = generation_kwargs.pop("attention_mask", None)
        _require_greedy(generation_kwargs)
        if mask is None:
            mask = torch.ones_like(context)
        prompts = [row[m.bool()].tolist() for row, m in zip(context, mask)]
        new = greedy_generate(
            self.bridge, prompts, max_length - context.shape[1], batch_size=len(prompts), stop_strings=list(stop)
        )
        width = max((len(ids) for ids in new), default=0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        tail = torch.full((len(new), width), pad, dtype=context.dtype, device=context.device)
        for i, ids in enumerate(new):
            tail[i, : len(ids)] = torch.tensor(ids, dtype=context.dtype)
        return torch.cat([context, tail], dim=1)

    def get_model_info(self) -> dict[str, Any]:
        """What made the numbers, for lm-eval's results ``config``."""
        from tokext.models.info import model_info
        from tokext.version import __version__

        info = model_info(self.bridge)
        return {
            "model_num_parameters": sum(p.numel() for p in self.bridge.parameters()),
            "model_dtype": str(next(self.bridge.parameters()).dtype),
            "tokext_model": self.spec,
            "tokext_model_name": info.name,
            "tokext_interventions": [repr(iv) for iv in self.interventions],
            "tokext_engine": self.engine,
            "tokext_version": __version__,
        }


def _load(model: Any, device: str | None, dtype: str | None) -> Any:
    """A TransformerBridge with a tokenizer and its Hugging Face model, from a spec or as given."""
    if isinstance(model, str):
        from tokext.models.loading import load_model

        if dtype is not None and str(dtype) not in _DTYPES:
            raise InputError(f"unknown dtype {dtype!r}: choose from {', '.join(_DTYPES)}")
        return _checked(load_model(model, device=default_device(device), dtype=_DTYPES[str(dtype or "auto")]))
    return _checked(model)


def _checked(bridge: Any) -> Any:
    if getattr(bridge, "organism", None) is not None:
        raise InputError("the model organism has a character vocabulary: lm-eval tasks cannot be scored on it")
    if getattr(bridge, "tokenizer", None) is None or getattr(bridge, "original_model", None) is None:
        raise InputError(
            f"the {MODEL_TYPE} model type needs a TransformerBridge with a tokenizer "
            f"(tokext.load_model(spec)), got {type(bridge).__name__}"
        )
    return bridge


def default_device(device: str | None) -> str:
    """``device``, or the CPU when CUDA was asked for (lm-eval's default is cuda:0) but there is none."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _require_greedy(kwargs: dict[str, Any]) -> None:
    """Check lm-eval's generation kwargs describe greedy decoding (the only kind tokext runs)."""
    if kwargs.pop("do_sample", False):
        raise InputError(f"the {MODEL_TYPE} model type decodes greedily; this task asks for sampling (do_sample=True)")
    for key in ("temperature", "top_p", "top_k"):  # no effect without sampling
        kwargs.pop(key, None)
    if kwargs:
        raise InputError(
            f"generation option(s) {', '.join(sorted(kwargs))} are not supported by the {MODEL_TYPE} "
            "model type (greedy decoding with stop strings only)"
        )


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


@contextmanager
def drop_log_messages(logger: str, *fragments: str) -> Iterator[None]:
    """Inside the block, drop the records of ``logger`` whose message contains one of ``fragments``."""
    target = logging.getLogger(logger)
    drop = _DropMessages(fragments)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def run_lm_eval_cli(argv: Sequence[str]) -> None:
    """lm-eval's own command line (``lm_eval ARGS``) with the ``tokext`` model type registered and the
    ``tokext_mmlu`` tasks on the task path, next to any ``--include_path`` given."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from tokext.evaluation.lm_eval_tasks import task_dir

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()
        if hasattr(args, "include_path"):
            args.include_path = [str(task_dir())] + ([args.include_path] if args.include_path else [])
        parser.execute(args)
    finally:
        sys.argv = saved
