"""Where a model's tensors live: the device its inputs go to, dtypes by name, and placements
checked before anything loads.

A model may span devices: accelerate's ``device_map`` puts layers on several GPUs (a 70B model
does not fit on one), or some on the CPU and some offloaded to disk. tokext never assumes one
device: token ids go to the device of the input embedding (:func:`input_device`), and every hook
works on the device of the tensor it is handed. A placement (``device``, ``device_map``,
``n_devices``, ``max_memory``) is checked by :func:`check_placement` before any weight loads, so a
map naming ``cuda:3`` on a machine with two GPUs fails at once and names the devices that exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tokext.errors import InputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
"""dtype names accepted by configs and command lines."""

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies: it fills the visible devices (GPUs first, then CPU, then disk)."""

OFFLOAD_TARGETS = ("cpu", "disk")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a name (``"bfloat16"``) or a dtype; anything else is an :class:`InputError`.

    >>> resolve_dtype("bfloat16")
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype {dtype} is not supported: choose one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: str | torch.dtype) -> str:
    """The name of a dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def available_devices() -> list[str]:
    """The devices this process can place tensors on, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: str | int | torch.device, where: str = "device") -> torch.device:
    """A device that exists here, as a ``torch.device`` (an int is a CUDA index, as in accelerate's maps).

    >>> check_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, bool):
        raise InputError(f"{where}: expected a device name, got {device!r}")
    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"{where}: {device!r} is not a device name (use 'cpu', 'cuda', 'cuda:N' or 'mps'); "
            f"devices here: {', '.join(available_devices())}"
        ) from None
    if parsed.type == "meta":
        raise InputError(
            f"{where}: 'meta' holds no weights, so a model cannot run there; "
            f"devices here: {', '.join(available_devices())}"
        )
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(
                f"{where}: {device!r} needs CUDA, and this machine has no CUDA device "
                f"(devices here: {', '.join(available_devices())})"
            )
        if parsed.index is not None and parsed.index >= count:
            raise InputError(
                f"{where}: {device!r} does not exist: this machine has {count} CUDA device(s) "
                f"({', '.join(available_devices())})"
            )
    elif parsed.type == "mps":
        if "mps" not in available_devices():
            raise InputError(f"{where}: {device!r} is not available here ({', '.join(available_devices())})")
    elif parsed.type != "cpu":
        raise InputError(f"{where}: tokext runs on cpu, cuda and mps, not {parsed.type!r}")
    return parsed


def _map_target(value: Any, where: str) -> str:
    """One value of a ``device_map`` dict, checked: a device that exists here, or ``"disk"``."""
    if isinstance(value, str) and value.strip().lower() == "disk":
        return "disk"
    return str(check_device(value, where))


def check_placement(
    device: str | torch.device | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    n_devices: int | None = None,
    max_memory: Mapping[Any, Any] | None = None,
) -> None:
    """Check a model placement against the devices of this machine, loading nothing.

    ``device``: one device for the whole model. ``device_map``: one of
    :data:`DEVICE_MAP_STRATEGIES`, or a dict from module names (``"model.layers.3"``) to devices
    (``"cuda:1"``, an int GPU index, ``"cpu"`` or ``"disk"``). ``n_devices``: split over this many
    GPUs (accelerate's balanced placement). ``max_memory``: a per-device budget for accelerate
    (``{0: "20GiB", "cpu": "64GiB"}``), with ``device_map`` or ``n_devices``. A map that mixes
    CPU/disk offload with a GPU is refused: TransformerLens 4 refuses it too.

    >>> check_placement(device_map={"model.embed_tokens": "cpu", "model.layers.0": "disk"})
    >>> check_placement(device_map={"model.layers.0": "cuda:99"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    tokext.errors.InputError: device_map['model.layers.0']: 'cuda:99' ...
    """
    if device is not None:
        check_device(device)
        if device_map is not None or (n_devices is not None and n_devices > 1):
            raise InputError(
                "pass either device (one device for the whole model) or device_map / n_devices "
                f"(a model across devices), not both: got device={str(device)!r} with "
                f"{'device_map' if device_map is not None else f'n_devices={n_devices}'}"
            )
    if n_devices is not None:
        if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
            raise InputError(f"n_devices must be a positive integer, got {n_devices!r}")
        if device_map is not None:
            raise InputError("pass either device_map or n_devices, not both")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_devices > 1 and count < n_devices:
            raise InputError(
                f"n_devices={n_devices} splits the model over {n_devices} GPUs, and this machine has "
                f"{count} (devices here: {', '.join(available_devices())})"
            )
    targets: list[str] = []
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise InputError(
                f"device_map {device_map!r} is neither a placement strategy "
                f"({', '.join(DEVICE_MAP_STRATEGIES)}) nor a dict of module name -> device"
            )
    elif device_map is not None:
        if not isinstance(device_map, Mapping) or not device_map:
            raise InputError(
                f"device_map must be a strategy name or a non-empty dict of module name -> device, got {device_map!r}"
            )
        for name, value in device_map.items():
            if not isinstance(name, str):
                raise InputError(f"device_map: module names must be strings, got {name!r}")
            targets.append(_map_target(value, f"device_map[{name!r}]"))
        if any(t in OFFLOAD_TARGETS for t in targets) and any(t.startswith(("cuda", "mps")) for t in targets):
            raise InputError(
                "device_map mixes CPU/disk offload with a GPU, which TransformerLens 4 does not "
                "support: put every module on GPUs, or every module on cpu/disk"
            )
    if max_memory is not None:
        if device_map is None and (n_devices is None or n_devices <= 1):
            raise InputError("max_memory budgets accelerate's placement: pass it with device_map or n_devices")
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise InputError(
                f"max_memory must be a dict of device -> budget ({{0: '20GiB', 'cpu': '64GiB'}}), got {max_memory!r}"
            )
        from accelerate.utils import convert_file_size_to_int

        for key, budget in max_memory.items():
            key = int(key) if isinstance(key, str) and key.isdigit() else key
            _map_target(key, f"max_memory[{key!r}]")
            try:
                convert_file_size_to_int(budget)
            except (ValueError, TypeError):
                raise InputError(
                    f"max_memory[{key!r}]: {budget!r} is not a size (an int of bytes or e.g. '20GiB')"
                ) from None


def normalized_max_memory(max_memory: Mapping[Any, Any] | None) -> dict[Any, Any] | None:
    """``max_memory`` with digit-string keys (as TOML and JSON write them) turned into GPU indices."""
    if max_memory is None:
        return None
    return {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in max_memory.items()}


def check_device_map_modules(device_map: Mapping[str, Any], skeleton: torch.nn.Module) -> None:
    """Every name of ``device_map`` is a module of ``skeleton`` and every parameter gets a device.

    ``skeleton`` is the model built on the ``meta`` device (no memory), so this runs before any
    weight is read.
    """
    modules = dict(skeleton.named_modules())
    unknown = [name for name in device_map if name and name not in modules]
    if unknown:
        tops = sorted(
            {
                n.split(".layers.")[0] + (".layers.N" if ".layers." in n else "")
                for n, _ in skeleton.named_modules()
                if n and n.count(".") <= 2
            }
        )
        raise InputError(
            f"device_map names modules this model does not have: {unknown}; its modules include {', '.join(tops[:12])}"
        )
    if "" in device_map:
        return
    uncovered = sorted(
        {
            name.rsplit(".", 1)[0]
            for name, _ in skeleton.named_parameters()
            if not any(name == m or name.startswith(m + ".") for m in device_map)
        }
    )
    if uncovered:
        raise InputError(
            f"device_map gives no device to the parameters of {uncovered[:6]}"
            f"{' ...' if len(uncovered) > 6 else ''}: map every module (or use device_map='auto')"
        )


def input_device(model: Any) -> torch.device:
    """The device a model's token ids must be on: the input embedding's, wherever the rest lives.

    With accelerate's disk/CPU offload some parameters sit on ``meta`` (materialised per call);
    those never decide. Falls back to ``model.cfg.device``, then to the first real parameter.
    """
    embed = getattr(model, "embed", None)
    params = embed.parameters() if isinstance(embed, torch.nn.Module) else iter(())
    for param in params:
        if param.device.type != "meta":
            return param.device
        break
    cfg_device = getattr(getattr(model, "cfg", None), "device", None)
    if cfg_device is not None and torch.device(cfg_device).type != "meta":
        return torch.device(cfg_device)
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")
