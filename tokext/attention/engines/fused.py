"""The streaming engine's fused CPU kernel, and the dispatch to it.

Why. The pure-torch engine materialises each block of probabilities and passes over it six to eight
times from memory (the matmul write, the mask, the softmax, the statistics, P @ V). The C++ kernel
in ``csrc/fused_attention.cpp`` does one layer in cache-sized work items (a KV head's stacked query
heads x a few rows x every key they see): one GEMM, then per row, while it is in cache, the mask,
softcap, max, exp, row sum, entropy term, normalisation and column sums, then one GEMM with V. Each
row is finished before its probabilities are used, so the column sums are exact.

What it runs. A layer call goes to the kernel when every stage attached to it describes its edit
for the kernel (at most one score edit and one pattern edit: a temperature, a rebalance, ACT's
calibration, early-layer emulation's boost or its source layer's record; see
:mod:`tokext.attention.engines.edits`) and every observer can take its statistics already reduced
(an observer with a ``fused`` attribute: ``request(n_rows, device) -> (row_weight, probe_col)`` and
``take(column_sum, row_sum, plogp, probe, geometry)``; statistics only where no pattern edit
precedes them). Anything else (another stage or observer, an output stage, fp16, a GPU, a forward
that needs gradients, a KV cache under ACT or emulation) runs the pure-torch path. A layer with
neither stages nor observers runs torch's own SDPA when that is exact (causal without window,
softcap, learned sink, padding or KV cache), else the kernel without statistics.

Which path. ``TOKEXT_STREAMING_KERNEL``: ``auto`` (default: the kernel when it builds, else the
pure-torch path with a one-line :class:`~tokext.errors.TokextWarning`), ``fused`` (the kernel or an
error) or ``torch`` (never the kernel, nor the SDPA shortcut: the engine exactly as it was written
in torch). The kernel is compiled on first use with ``torch.utils.cpp_extension`` (ninja and a C++
compiler; ``make install`` builds it) into torch's extension cache, under a name that carries a hash
of its source. There is no GPU kernel: CUDA tensors take the pure-torch path.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import torch

from tokext.attention.engines.edits import KEY_MODES, FusedEdit, LayerCall
from tokext.attention.engines.one_pass_calibration import calibrated_output
from tokext.errors import InputError, TokextWarning

KERNEL_ENV = "TOKEXT_STREAMING_KERNEL"
CHOICES = ("auto", "fused", "torch")
SOURCE = Path(__file__).with_name("csrc") / "fused_attention.cpp"
BLOCK_ENTRIES = 1 << 22
"""At most this many scores per work item (16 MiB of fp32 per thread). An item stacks about 128
query rows of a KV head's query heads; measured on SmolLM2 (2 threads, one layer, against SDPA's
flash kernel): 2,048 keys, items of 2^17 to 2^21 scores 0.84-0.99x SDPA (best at 2^18-2^19, about
128 stacked rows); 8,192 keys, 2^17 1.66x, 2^18 1.30x, 2^19 1.14x, 2^20 (about 128 rows) 1.02x."""


BUILD_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]
"""``-fopenmp`` is not optional: ATen's ``at::parallel_for`` is an inline ``#pragma omp parallel`` in the
headers (torch's CPU wheels use the OpenMP backend), so without it the kernel compiles and runs on one
thread. Linked with ``-fopenmp``, the extension resolves ``libgomp.so.1`` to the copy torch has already
loaded (same soname), so there is one OpenMP runtime and one thread pool."""


class KernelUnavailableError(InputError):
    """The fused kernel was asked for (``TOKEXT_STREAMING_KERNEL=fused``) and cannot be built."""


def kernel_choice() -> str:
    """The path ``TOKEXT_STREAMING_KERNEL`` asks for (``auto`` when unset)."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise InputError(f"{KERNEL_ENV}={choice!r}: choose from {', '.join(CHOICES)}")
    return choice


def capability_flags(cpu_flags: set[str] | None = None) -> list[str]:
    """Compiler flags for ATen's vectorised code on this CPU (AVX-512, AVX2, or the generic code)."""
    if cpu_flags is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
            line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
            cpu_flags = set(line.split(":", 1)[-1].split())
        except OSError:
            cpu_flags = set()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= cpu_flags:
        return [
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
        ]
    if {"avx2", "fma", "f16c"} <= cpu_flags:
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return []


def missing_tools() -> str | None:
    """Why the kernel cannot be compiled here (no C++ compiler, no ninja), or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; `make install` installs g++ where it can)"
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    return None


@functools.cache
def _build() -> tuple[Any, None] | tuple[None, str]:
    """(the compiled module, None) or (None, why not); built once per process."""
    reason = missing_tools()
    if reason is not None:
        return None, reason
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(BUILD_FLAGS + capability_flags()).encode()).hexdigest()[:12]
    try:
        module = load(
            name=f"tokext_fused_attention_{digest}",
            sources=[str(SOURCE)],
            extra_cflags=[*BUILD_FLAGS, *capability_flags()],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:  # the pure-torch path remains
        lines = str(err).strip().splitlines() or ["?"]
        first_error = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
        return None, f"building {SOURCE.name} failed: {first_error.strip()[:200]}"
    return module, None


_NOTICED: list[str] = []
CALLS: collections.Counter[str] = collections.Counter()
"""Layer calls run by ``"kernel"`` (with statistics), ``"kernel_plain"`` (without), each with ``"_edited"``
appended when stages' edits ran in the kernel, and ``"sdpa"``, in this process (tests read it to know
the path they checked really ran)."""


def kernel() -> Any:
    """The compiled kernel module, or None (``torch`` chosen, or ``auto`` and it cannot be built: then
    one :class:`TokextWarning` per process says so). ``fused`` and no kernel: an error."""
    choice = kernel_choice()
    if choice == "torch":
        return None
    module, reason = _build()
    if reason is not None:  # (None, why not): the kernel cannot be built
        if choice == "fused":
            raise KernelUnavailableError(f"{KERNEL_ENV}=fused, but the fused kernel is unavailable: {reason}")
        if reason not in _NOTICED:
            _NOTICED.append(reason)
            warnings.warn(
                f"tokext streaming engine: pure-torch path, as the fused CPU kernel is unavailable: {reason}",
                TokextWarning,
                stacklevel=3,
            )
    return module


def _fusable(chain: Any) -> bool:
    """Only score and pattern stages, observers and finish callbacks are attached, and every stage
    describes its edit for the kernel (a field added to :class:`LayerChain` later disqualifies a
    layer until this module knows it)."""
    known = ("scores", "pattern", "observers", "finish")
    if any(getattr(chain, f.name) for f in dataclasses.fields(chain) if f.name not in known):
        return False
    return len(chain.scores) <= 1 and len(chain.pattern) <= 1 and all(s.fused for s in chain.scores + chain.pattern)


def attend(
    engine: Any,
    layer: int,
    stored: Any,
    value: torch.Tensor,
    chain: Any,
    geometry: Any,
    block_entries: int | None = None,
) -> torch.Tensor | None:
    """One layer's attention ``[batch, head, query, d]`` through the kernel (or SDPA), with its stages'
    edits and feeding the observers; None when the pure-torch path must run it. ``geometry``: the
    whole layer's :class:`~tokext.attention.engines.streaming.BlockGeometry`; ``block_entries``: scores
    per work item (default :data:`BLOCK_ENTRIES`)."""
    query, key = stored.query, stored.key
    if kernel_choice() == "torch" or not _fusable(chain) or query.device.type != "cpu":
        return None
    if any(t.dtype != torch.float32 for t in (query, key, value)):
        return None
    reducers = [getattr(observe, "fused", None) for observe in chain.observers]
    if any(f is None for f in reducers) or len(reducers) > 1:
        return None
    reduced = reducers[0] if reducers else None  # the one observer's reduced-statistics side, if any
    attention = engine.info.attention[layer]
    n_q, n_k = query.shape[2], key.shape[2]
    stages = chain.scores + chain.pattern
    if not stages and reduced is None and _sdpa_exact(attention, stored, n_q, n_k):
        engine.on_block(geometry)
        CALLS["sdpa"] += 1
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=stored.scaling, enable_gqa=key.shape[1] != query.shape[1]
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None  # the kernel has no backward: a differentiated forward keeps the torch blocks
    module = kernel()
    if module is None:
        return None
    engine.on_block(geometry)  # the stages' run context reads the whole layer's geometry
    entries = BLOCK_ENTRIES if block_entries is None else block_entries
    first: dict[str, Any] = {"arguments": dict(_NO_EDIT, block_entries=entries)}  # the first pass, once run
    call = LayerCall(
        layer,
        query.shape[0],
        query.shape[1],
        n_q,
        n_k,
        query.device,
        lambda: _first_pass(module, attention, stored, value, first),
    )
    edits = [stage.fused(call) for stage in stages]
    if any(edit is None for edit in edits):
        return None
    edits = [  # a boost reads the record of the stage the engine paired it with
        dataclasses.replace(e, boost_source=stage.reads()) if e is not None and e.boost_source is not None else e
        for stage, e in zip(stages, edits)
    ]
    edit = _combined([e for e in edits if e is not None])
    if reduced is not None and edit.edits_pattern:
        return None  # the kernel's statistics are those of the softmax, before a pattern edit
    if edit.key_mode == "calibrate" and callable(edit.key_mask):  # ACT: one pass and its sink columns
        first["arguments"].update(score_scale=edit.score_scale, score_shift=edit.score_shift)
        sinks = edit.key_mask()  # runs the first pass, with the output
        out, row_sum, row_lse = (first["results"][i] for i in (0, 2, 7))
        scores = (edit.score_scale, edit.score_shift)
        calibrated = calibrated_output(attention, stored, value, out, row_sum, row_lse, sinks, edit.key_param, *scores)
        if calibrated is not None:
            CALLS["kernel_plain_edited"] += 1
            return calibrated
        edit = dataclasses.replace(edit, key_mask=sinks)  # many sinks: the edited second pass
    arguments = _edit_arguments(engine, edit, stored, call, block_entries)
    if arguments is None:
        return None
    weight, probe = reduced.request(n_q, query.device) if reduced is not None else (None, None)
    CALLS[("kernel" if reduced is not None else "kernel_plain") + ("_edited" if stages else "")] += 1
    results = _run(module, attention, stored, value, weight, probe, reduced is not None, arguments)
    if reduced is not None:
        column_sum, row_sum, plogp, probe_p = results[1:5]
        reduced.take(column_sum, row_sum, plogp, probe_p if probe is not None else None, geometry)
    if edit.record is not None:
        stored.records[id(next(s.fn for s in chain.pattern))] = (results[5], results[6])
    return results[0]


def _combined(edits: list[FusedEdit]) -> FusedEdit:
    """The one score edit and the one pattern edit of a layer (at most one of each) as one."""
    scores = next((e for e in edits if e.edits_scores), None)
    pattern = next((e for e in edits if not e.edits_scores), FusedEdit())
    if scores is None:
        return pattern
    return dataclasses.replace(pattern, score_scale=scores.score_scale, score_shift=scores.score_shift)


def _edit_arguments(
    engine: Any, edit: FusedEdit, stored: Any, call: LayerCall, block_entries: int | None
) -> dict[str, Any] | None:
    """The kernel's edit arguments for ``edit`` (None: this call cannot be fused)."""
    n_heads = call.heads
    args: dict[str, Any] = dict(_NO_EDIT, block_entries=BLOCK_ENTRIES if block_entries is None else block_entries)
    if edit.score_scale is not None:
        args["score_scale"] = edit.score_scale.to(torch.float32).reshape(n_heads)
    if edit.score_shift is not None:
        args["score_shift"] = edit.score_shift.to(torch.float32).reshape(n_heads)
    if edit.record is not None:
        threshold, exclude_self = edit.record
        cap = min(call.n_keys, int(1.0 / threshold) + 1) if threshold > 0 else call.n_keys
        if not call.plain or cap * call.batch * n_heads * call.n_queries * 4 > RECORD_BYTES:
            return None
        args.update(record_threshold=float(threshold), record_exclude_self=bool(exclude_self), record_cap=cap)
    if edit.boost_source is not None:
        record = engine.record_of(*edit.boost_source, like=stored)
        if record is None or edit.boost_gain is None:
            return None
        args.update(
            boost_idx=record[0],
            boost_n=record[1],
            boost_gain=edit.boost_gain.to(torch.float32).reshape(n_heads),
            boost_renormalize=edit.boost_renormalize,
        )
    if edit.key_mode is not None:
        mask = edit.key_mask() if callable(edit.key_mask) else edit.key_mask
        if mask is None:
            return None
        args.update(
            key_mask=mask.to(torch.float32).expand(call.batch, n_heads, call.n_keys).contiguous(),
            key_mode=KEY_MODES[edit.key_mode],
            key_param=float(edit.key_param),
            sink_scale=float(edit.sink_scale),
        )
    return args


_NO_EDIT: dict[str, Any] = dict(
    score_scale=None,
    score_shift=None,
    key_mask=None,
    key_mode=0,
    key_param=1.0,
    sink_scale=1.0,
    boost_idx=None,
    boost_n=None,
    boost_gain=None,
    boost_renormalize=False,
    record_threshold=0.0,
    record_exclude_self=False,
    record_cap=0,
    output=True,
)
RECORD_BYTES = 1 << 30
"""At most this much memory for a source layer's record of keys above the threshold (int32 per entry,
``min(keys, 1 / threshold + 1)`` entries per row); a larger one runs the pure-torch path."""


def _run(
    module: Any,
    attention: Any,
    stored: Any,
    value: torch.Tensor,
    weight: torch.Tensor | None,
    probe: torch.Tensor | None,
    stats: bool,
    arguments: dict[str, Any],
) -> list[torch.Tensor]:
    """Call the kernel on a stored layer call (the arguments in the order of ``fused_attention.cpp``)."""
    a = arguments
    return module.fused_attention(
        stored.query,
        stored.key,
        value,
        stored.scaling,
        stored.softcap or 0.0,
        stored.sinks.detach().float() if stored.sinks is not None else None,
        attention.causal,
        -1 if attention.window is None else int(attention.window),
        stored.padding,
        weight,
        probe,
        stats,
        a["block_entries"],
        a["score_scale"],
        a["score_shift"],
        a["key_mask"],
        a["key_mode"],
        a["key_param"],
        a["sink_scale"],
        a["boost_idx"],
        a["boost_n"],
        a["boost_gain"],
        a["boost_renormalize"],
        a["record_threshold"],
        a["record_exclude_self"],
        a["record_cap"],
        a["output"],
    )


def _first_pass(module: Any, attention: Any, stored: Any, value: torch.Tensor, first: dict[str, Any]) -> torch.Tensor:
    """Column sums ``[batch, head, key]`` of a layer call's probabilities (after its score edit, in
    ``first["arguments"]``) over its real query rows: ACT's first pass. The pass also computes the
    output, row sums and log-sum-exps, kept in ``first["results"]``."""
    n_q = stored.query.shape[2]
    weight = torch.ones(stored.query.shape[0], n_q)
    if stored.padding is not None:
        weight = stored.padding[:, -n_q:].to(torch.float32)
    first["results"] = _run(module, attention, stored, value, weight, None, True, first["arguments"])
    return first["results"][1]


def record(module: Any, attention: Any, stored: Any, threshold: float, exclude_self: bool) -> tuple[Any, Any] | None:
    """A source layer's record (key positions above ``threshold`` per row, and their counts) computed
    again from its stored queries and keys, for a boost whose source layer ran the pure-torch path."""
    n_q, n_k = stored.query.shape[2], stored.key.shape[2]
    cap = min(n_k, int(1.0 / threshold) + 1) if threshold > 0 else n_k
    if n_q != n_k or cap * stored.query.shape[0] * stored.query.shape[1] * n_q * 4 > RECORD_BYTES:
        return None
    arguments = dict(
        _NO_EDIT,
        block_entries=BLOCK_ENTRIES,
        output=False,
        record_threshold=float(threshold),
        record_exclude_self=bool(exclude_self),
        record_cap=cap,
    )
    results = _run(module, attention, stored, stored.key[:, :, :0], None, None, False, arguments)
    return results[5], results[6]


def _sdpa_exact(attention: Any, stored: Any, n_q: int, n_k: int) -> bool:
    """Whether torch's SDPA computes this layer exactly as the engine would (its ``is_causal`` aligns
    the rows to the first keys, so only without a KV cache)."""
    return (
        attention.causal
        and attention.window is None
        and stored.softcap is None
        and stored.sinks is None
        and stored.padding is None
        and n_q == n_k
    )


if __name__ == "__main__":  # `python -m tokext.attention.engines.fused`: build it now (make install)
    module, why = _build()
    print("tokext fused streaming kernel: " + ("built" if module is not None else f"unavailable ({why})"))
