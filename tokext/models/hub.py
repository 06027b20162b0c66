"""Fail fast when a hub id cannot be fetched: offline mode, or no route to the hub.

Without a network, ``from_pretrained("<hub id>")`` retries for about 30 s before its error. Before
anything loads, :func:`check_hub_access` answers at once: a model already in the local hub cache
loads from there (``local_files_only``); otherwise, when ``HF_HUB_OFFLINE`` (or
``TRANSFORMERS_OFFLINE``) is set or a short TCP connection to the hub endpoint (``HF_ENDPOINT``,
or the proxy that requests would use) fails, it raises :class:`~tokext.errors.UnknownModelError`
naming the models that work offline.
"""

from __future__ import annotations

import difflib
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping

from tokext.errors import UnknownModelError

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 3.0
"""How long the reachability check waits (name lookup and TCP connection together)."""

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Whether offline mode is on: ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` in the environment, or
    the hub client's own flag (read from the environment when it was imported)."""
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return True
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    """The hub's base URL: ``HF_ENDPOINT`` when set, else ``https://huggingface.co``."""
    return os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT


def hub_cached(repo_id: str) -> bool:
    """Whether the local hub cache holds ``repo_id``'s ``config.json`` (so it may load offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id: nothing cached under it
        return False


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or the proxy for its scheme) opens within ``timeout`` s.

    The name lookup has no timeout of its own, so the whole attempt runs in a daemon thread that is
    given up on after ``timeout``.
    """
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


def check_hub_access(repo_id: str, offline_models: Mapping[str, str]) -> bool:
    """Check that ``repo_id`` can be loaded before anything loads; True when it must come from the cache.

    Raises :class:`~tokext.errors.UnknownModelError` at once when the model is not cached and the
    hub is off (offline mode) or out of reach, naming ``offline_models`` (name -> description).
    """
    offline, cached = hub_offline(), hub_cached(repo_id)
    if offline and cached:
        return True
    if not offline and reachable(hub_endpoint()):
        return False
    if cached:  # no route to the hub, but the cache has it: load without retries
        return True
    why = (
        "HF_HUB_OFFLINE is set"
        if offline
        else f"the hub ({hub_endpoint()}) cannot be reached within {CONNECT_TIMEOUT_S:g} s"
    )
    choices = "; ".join(f"{name!r}: {text}" for name, text in sorted(offline_models.items()))
    hint = difflib.get_close_matches(repo_id.lower(), list(offline_models), n=1, cutoff=0.5)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    raise UnknownModelError(
        f"cannot load hub id {repo_id!r}: {why} and the local hub cache does not hold it.{did_you_mean} "
        f"Models that load offline: {choices}; or a local directory (a Hugging Face model: config.json, "
        "weights, tokenizer), a .gguf file, or a saved model organism"
    )
