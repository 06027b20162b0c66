"""Models across devices: placements checked before anything loads, a device_map passed through to
TransformerLens 4 (accelerate), and every tokext path following the device of its tensors.

On a CPU-only machine the cross-device path is exercised with accelerate's disk offload: a
``device_map`` that puts the input embedding, a layer and the unembedding on ``"disk"``, so those
parameters sit on ``meta`` and are materialised per call. The reference is the same checkpoint
loaded on one device. Tests that need CUDA (one GPU, or two for a model split across GPUs) run
only where it exists.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_evaluate import tiny_eval_model_dir
from tokext.errors import InputError

CUDA = torch.cuda.is_available()
TWO_GPUS = CUDA and torch.cuda.device_count() >= 2
PROMPTS = [
    "The capital of France is Paris , and the capital of Germany is Berlin .",
    "a cat sat on the mat ! Why is the sky blue ?",
    "one two three",
]
OFFLOAD = {
    "model.embed_tokens": "disk",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_eval_model_dir(str(tmp_path_factory.mktemp("devices"))))


@pytest.fixture(scope="module")
def reference(model_dir):
    from tokext.models.loading import load_model

    return load_model(model_dir)


# ---------------------------------------------------------------------- placements refused before loading


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda:99", "'cuda:99'"),
        ("tpu", "'tpu' is not a device name"),
        ("meta", "'meta' holds no weights"),
    ],
)
def test_devices_that_do_not_exist_are_named(device, message):
    from tokext.models.devices import check_device

    with pytest.raises(InputError, match=message) as err:
        check_device(device)
    assert "devices here: cpu" in str(err.value) or "CUDA device(s) (cpu" in str(err.value)


def test_cuda_without_a_gpu_says_so():
    from tokext.models.devices import check_device

    if CUDA:
        assert check_device("cuda").type == "cuda"
    else:
        with pytest.raises(InputError, match="this machine has no CUDA device"):
            check_device("cuda")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"device": "cpu", "device_map": "auto"}, "either device"),
        ({"n_devices": max(2, torch.cuda.device_count() + 1)}, f"this machine has {torch.cuda.device_count()}"),
        ({"n_devices": 0}, "positive integer"),
        ({"device_map": "fastest"}, "neither a placement strategy"),
        ({"device_map": {"model.layers.0": "cuda:7"}}, r"device_map\['model.layers.0'\]: 'cuda:7'"),
        ({"device_map": {"model.layers.0": "cpu"}, "max_memory": {"cpu": "lots"}}, "is not a size"),
        ({"max_memory": {"cpu": "2GiB"}}, "with device_map or n_devices"),
    ],
)
def test_bad_placements(kwargs, message):
    from tokext.models.devices import check_placement

    with pytest.raises(InputError, match=message):
        check_placement(**kwargs)


def test_mixed_offload_and_gpu_map_is_refused():
    from tokext.models.devices import check_placement

    with pytest.raises(InputError, match="mixes CPU/disk offload with a GPU" if CUDA else "needs CUDA"):
        check_placement(device_map={"model.layers.0": "disk", "model.layers.1": 0})


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a load reaches TransformerLens or transformers' weight loading."""
    from transformer_lens import TransformerBridge
    from transformers import AutoModelForCausalLM

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the placement was checked")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", forbidden)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)


@pytest.mark.parametrize(
    "placement, message",
    [
        ({"device": "cuda:5"}, "'cuda:5'"),
        ({"device_map": {"model.layers.9": "cpu"}}, r"names modules this model does not have: \['model.layers.9'\]"),
        (
            {"device_map": {k: v for k, v in OFFLOAD.items() if k != "lm_head"}},
            r"no device to the parameters of \['lm_head'\]",
        ),
        ({"device_map": {**OFFLOAD, "lm_head": "meta"}}, "'meta' holds no weights"),
    ],
)
def test_load_model_checks_the_placement_before_loading(model_dir, nothing_loads, placement, message):
    from tokext.models.loading import load_model

    with pytest.raises(InputError, match=message):
        load_model(model_dir, **placement)


# ---------------------------------------------------------------------- a device_map on this machine


@pytest.fixture(scope="module")
def offloaded(model_dir, tmp_path_factory):
    from tokext.models.loading import load_model

    return load_model(model_dir, device_map=OFFLOAD, offload_folder=str(tmp_path_factory.mktemp("offload")))


def test_device_map_reaches_accelerate(offloaded):
    from tokext.models.devices import input_device

    hf_map = offloaded.original_model.hf_device_map
    assert hf_map["model.layers.1"] == "disk" and hf_map["model.layers.0"] == "cpu"
    devices = {p.device.type for p in offloaded.parameters()}
    assert devices == {"cpu", "meta"}  # offloaded weights are materialised per call
    assert next(offloaded.parameters()).device.type == "meta"  # the first parameter cannot decide
    assert input_device(offloaded) == torch.device("cpu")


def test_offloaded_model_gives_the_same_statistics(offloaded, reference):
    import tokext

    a = tokext.collect_attention_stats(reference, PROMPTS, batch_size=2, progress=False)
    b = tokext.collect_attention_stats(offloaded, PROMPTS, batch_size=2, progress=False)
    for name in ("received", "entropy", "category_mass", "row_sum"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    "make",
    [
        lambda: __import__("tokext").EarlyLayerEmulation(alpha=1.0),
        lambda: __import__("tokext").PatternPatch(source_layer=0, target_layers=[2]),
        lambda: __import__("tokext").SinkRebalance(targets="first", scale=0.5),
    ],
    ids=["EarlyLayerEmulation", "PatternPatch", "SinkRebalance"],
)
def test_offloaded_model_gives_the_same_interventions(offloaded, reference, make):
    import tokext

    a = tokext.intervention_effect(reference, PROMPTS, make())
    b = tokext.intervention_effect(offloaded, PROMPTS, make())
    assert a.max_abs_delta_logit > 1e-3  # the intervention does something
    assert b.max_abs_delta_logit == pytest.approx(a.max_abs_delta_logit, abs=1e-5)
    assert b.loss_after == pytest.approx(a.loss_after, abs=1e-6)


def test_offloaded_model_gives_the_same_generation_and_evaluation(offloaded, reference):
    import tokext
    from tokext.evaluation.evaluate import evaluate
    from tokext.evaluation.generation import greedy_generate

    ids = [reference.tokenizer(p).input_ids for p in PROMPTS]
    assert greedy_generate(offloaded, ids, 6) == greedy_generate(reference, ids, 6)
    spec = {"task": "arithmetic", "level": 1, "n": 3, "shots": 1, "max_new_tokens": 6}
    emulation = [tokext.EarlyLayerEmulation(alpha=1.0)]
    pd.testing.assert_frame_equal(
        evaluate(offloaded, spec, emulation, progress=False),
        evaluate(reference, spec, emulation, progress=False),
        atol=1e-6,
    )


def test_dtype_by_name(model_dir, reference):
    import tokext
    from tokext.models.loading import load_model

    half = load_model(model_dir, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    a = tokext.collect_attention_stats(reference, PROMPTS, progress=False)
    b = tokext.collect_attention_stats(half, PROMPTS, progress=False)
    np.testing.assert_allclose(b.first_token_mass, a.first_token_mass, atol=0.03)  # bf16 keeps 8 bits
    with pytest.raises(InputError, match="unknown dtype 'float8'"):
        load_model(model_dir, dtype="float8")


# ---------------------------------------------------------------------- CUDA only


def _same_everything(model, ref, atol: float) -> None:
    import tokext
    from tokext.evaluation.generation import greedy_generate

    a = tokext.collect_attention_stats(ref, PROMPTS, batch_size=2, progress=False)
    b = tokext.collect_attention_stats(model, PROMPTS, batch_size=2, progress=False)
    for name in ("received", "entropy", "category_mass"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), atol=atol, err_msg=name)
    for iv in (
        tokext.EarlyLayerEmulation(alpha=1.0),
        tokext.PatternPatch(source_layer=0, target_layers=[2]),
        tokext.SinkCalibration(tau=0.05),
    ):
        x, y = tokext.intervention_effect(ref, PROMPTS, iv), tokext.intervention_effect(model, PROMPTS, iv)
        assert y.loss_after == pytest.approx(x.loss_after, abs=atol), repr(iv)
    ids = [ref.tokenizer(p).input_ids for p in PROMPTS]
    with tokext.intervene(ref, tokext.EarlyLayerEmulation(alpha=1.0)):
        expected = greedy_generate(ref, ids, 6)
    with tokext.intervene(model, tokext.EarlyLayerEmulation(alpha=1.0)):
        assert greedy_generate(model, ids, 6) == expected


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_on_one_gpu_as_on_the_cpu(model_dir, reference):
    from tokext.models.devices import input_device
    from tokext.models.loading import load_model

    model = load_model(model_dir, device="cuda")
    assert input_device(model).type == "cuda" and {p.device.type for p in model.parameters()} == {"cuda"}
    _same_everything(model, reference, atol=1e-4)


@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA GPUs")
def test_split_over_two_gpus_as_on_one(model_dir):
    from tokext.models.loading import load_model

    split = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.layers.2": 1,
        "model.norm": 1,
        "model.rotary_emb": 1,
        "lm_head": 1,
    }
    model = load_model(model_dir, device_map=split)
    assert {str(p.device) for p in model.parameters()} == {"cuda:0", "cuda:1"}
    _same_everything(model, load_model(model_dir, device="cuda:0"), atol=1e-5)


@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA GPUs")
def test_n_devices_splits_over_gpus(model_dir):
    from tokext.models.loading import load_model

    model = load_model(model_dir, n_devices=2, max_memory={0: "1MiB", 1: "1GiB"})
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    _same_everything(model, load_model(model_dir, device="cuda:0"), atol=1e-5)
