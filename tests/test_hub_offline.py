"""``load_model("<hub id>")`` fails at once without a hub, and loads a cached hub model offline.

Each load runs in a fresh interpreter, so the hub client reads the environment of the case
(``HF_HUB_OFFLINE``, ``HF_ENDPOINT``, an empty ``HF_HOME``) when it is imported; only the
``load_model`` call is timed (importing transformers takes longer than the check).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_hf import save_tiny_model
from tokext.models.hub import reachable

REPO = Path(__file__).resolve().parent.parent

LOAD = """
import json, sys, time
import transformers, transformer_lens  # imported before the clock starts
from tokext import load_model
from tokext.errors import UnknownModelError
started = time.perf_counter()
try:
    model = load_model(sys.argv[1])
    outcome = {"loaded": type(model).__name__, "n_layers": int(model.cfg.n_layers)}
except UnknownModelError as err:
    outcome = {"error": str(err)}
outcome["seconds"] = time.perf_counter() - started
print("RESULT " + json.dumps(outcome))
"""


def _load_in_fresh_process(spec: str, tmp_path: Path, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    base.update(
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_CACHE=str(tmp_path / "hf-home" / "hub"),
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        **env,
    )
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, spec], capture_output=True, text=True, timeout=240, env=base, cwd=tmp_path
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def test_offline_mode_fails_at_once_naming_the_offline_models(tmp_path):
    out = _load_in_fresh_process("some-org/some-model", tmp_path, HF_HUB_OFFLINE="1")
    assert "error" in out, out
    assert out["seconds"] < 3.0, out
    assert "HF_HUB_OFFLINE is set" in out["error"]
    assert "'smollm2-135m'" in out["error"] and "local directory" in out["error"]


def test_unreachable_endpoint_fails_at_once(tmp_path):
    # port 9 (discard) on the loopback: nothing listens there, the connection is refused at once
    out = _load_in_fresh_process("some-org/some-model", tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    assert "error" in out, out
    assert out["seconds"] < 5.0, out
    assert "http://127.0.0.1:9" in out["error"] and "cannot be reached" in out["error"]
    assert "'smollm2-135m'" in out["error"]


def test_a_cached_hub_model_loads_offline(tmp_path):
    """A model in the hub cache layout (refs/main -> snapshots/<commit>/) loads with HF_HUB_OFFLINE set."""
    saved = save_tiny_model(tmp_path / "saved", "llama")
    commit = "0" * 40
    repo = tmp_path / "hf-home" / "hub" / "models--tokext-test--tiny-llama"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = _load_in_fresh_process("tokext-test/tiny-llama", tmp_path, HF_HUB_OFFLINE="1")
    expected = json.loads((saved / "config.json").read_text())["num_hidden_layers"]
    assert out.get("loaded") == "TransformerBridge" and out["n_layers"] == expected, out


def test_reachable_against_a_local_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert reachable(f"http://127.0.0.1:{port}", timeout=2.0)
    assert not reachable(f"http://127.0.0.1:{port}", timeout=2.0)  # closed now: refused
    assert not reachable("not a url", timeout=0.5)


@pytest.mark.parametrize("proxy_env", ["http_proxy", "HTTP_PROXY"])
def test_reachable_asks_the_proxy(monkeypatch, proxy_env):
    """Behind a proxy the hub is reached through it: an unreachable proxy means an unreachable hub."""
    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setenv(proxy_env, f"http://127.0.0.1:{port}")
        assert reachable("http://hub.invalid", timeout=2.0)  # the proxy answers; the name is never looked up
    monkeypatch.setenv(proxy_env, "http://127.0.0.1:9")
    assert not reachable("http://hub.invalid", timeout=2.0)
