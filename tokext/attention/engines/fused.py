"""The streaming engine's fused CPU kernel, and the dispatch to it.

Why. The pure-torch engine materialises each block of probabilities and passes over it six to eight
times from memory (the matmul write, the mask, the softmax, the statistics, P @ V). The C++ kernel
in ``csrc/fused_attention.cpp`` does one layer in cache-sized work items (a KV head's stacked query
heads x a few rows x every key they see): one GEMM, then per row, while it is in cache, the mask,
softcap, max, exp, row sum, entropy term, normalisation and column sums, then one GEMM with V. Each
row is finished before its probabilities are used, so the column sums are exact.

What it runs. A layer call goes to the kernel when nothing edits it (no score or pattern stage)
and every observer can take its statistics already reduced (an observer with a ``fused``
attribute: ``request(n_rows, device) -> (row_weight, probe_col)`` and ``take(column_sum, row_sum,
plogp, probe, geometry)``); anything else (an edit, a plain observer, fp16, a GPU, a forward that
needs gradients) runs the pure-torch path. A layer with neither stages nor observers runs torch's
own SDPA when that is exact (causal without window, softcap, learned sink, padding or KV cache),
else the kernel without statistics.

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

from tokext.errors import InputError, TokextWarning

KERNEL_ENV = "TOKEXT_STREAMING_KERNEL"
CHOICES = ("auto", "fused", "torch")
SOURCE = Path(__file__).with_name("csrc") / "fused_attention.cpp"
BLOCK_ENTRIES = 1 << 22
"""At most this many scores per work item (16 MiB of fp32 per thread). An item stacks about 128
query rows of a KV head's query heads; measured on SmolLM2 (2 threads, one layer, against SDPA's
flash kernel): 2,048 keys, items of 2^17 to 2^21 scores 0.84-0.99x SDPA (best at 2^18-2^19, about
128 stacked rows); 8,192 keys, 2^17 1.66x, 2^18 1.30x, 2^19 1.14x, 2^20 (about 128 rows) 1.02x."""


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

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(capability_flags()).encode()).hexdigest()[:12]
    try:
        module = load(
            name=f"tokext_fused_attention_{digest}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-std=c++17", *capability_flags()],
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as err:  # the pure-torch path remains
        lines = str(err).strip().splitlines() or ["?"]
        first_error = next((ln for ln in lines if "error" in ln.lower()), lines[-1])
        return None, f"building {SOURCE.name} failed: {first_error.strip()[:200]}"
    return module, None


_NOTICED: list[str] = []
CALLS: collections.Counter[str] = collections.Counter()
"""Layer calls run by ``"kernel"`` (with statistics), ``"kernel_plain"`` and ``"sdpa"`` in this process (tests
read it to know the path they checked really ran)."""


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


def _plain(chain: Any) -> bool:
    """No stage edits the layer and nothing but observers and finish callbacks is attached (a field
    added to :class:`LayerChain` later disqualifies a layer until this module knows it)."""
    return all(not getattr(chain, f.name) for f in dataclasses.fields(chain) if f.name not in ("observers", "finish"))


def attend(
    engine: Any,
    layer: int,
    stored: Any,
    value: torch.Tensor,
    chain: Any,
    geometry: Any,
    block_entries: int | None = None,
) -> torch.Tensor | None:
    """One layer's attention ``[batch, head, query, d]`` through the kernel (or SDPA), feeding the
    observers; None when the pure-torch path must run it. ``geometry``: the whole layer's
    :class:`~tokext.attention.engines.streaming.BlockGeometry`; ``block_entries``: scores per work
    item (default :data:`BLOCK_ENTRIES`)."""
    block_entries = BLOCK_ENTRIES if block_entries is None else block_entries
    query, key = stored.query, stored.key
    if kernel_choice() == "torch" or not _plain(chain) or query.device.type != "cpu":
        return None
    if any(t.dtype != torch.float32 for t in (query, key, value)):
        return None
    reducers = [getattr(observe, "fused", None) for observe in chain.observers]
    if any(f is None for f in reducers) or len(reducers) > 1:
        return None
    fused = reducers[0] if reducers else None  # the one observer's reduced-statistics side, if any
    attention = engine.info.attention[layer]
    n_q, n_k = query.shape[2], key.shape[2]
    if fused is None and _sdpa_exact(attention, stored, n_q, n_k):
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
    weight, probe = fused.request(n_q, query.device) if fused is not None else (None, None)
    engine.on_block(geometry)
    CALLS["kernel" if fused is not None else "kernel_plain"] += 1
    results = module.fused_attention(
        query,
        key,
        value,
        stored.scaling,
        stored.softcap or 0.0,
        stored.sinks.detach().float() if stored.sinks is not None else None,
        attention.causal,
        -1 if attention.window is None else int(attention.window),
        stored.padding,
        weight,
        probe,
        fused is not None,
        block_entries,
    )
    if fused is not None:
        column_sum, row_sum, plogp, probe_p = results[1:]
        fused.take(column_sum, row_sum, plogp, probe_p if probe is not None else None, geometry)
    return results[0]


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
