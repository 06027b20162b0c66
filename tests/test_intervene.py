"""The ``intervene`` context manager: hook lifetime, nesting, refusals, validation, effects."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.models_fixtures import encode_text, tiny_gpt2, tiny_llama, tiny_native, tiny_opt  # noqa: F401  (fixtures)
from tokext.errors import (
    InputError,
    InterventionNotAppliedError,
    LayerIndexError,
    TokextError,
    UneditableAttentionError,
)
from tokext.interventions.ablation import HeadAblation
from tokext.interventions.base import fwd_hooks
from tokext.interventions.calibration import SinkCalibration, select_heads_greedy
from tokext.interventions.emulation import EarlyLayerEmulation
from tokext.interventions.intervene import intervene, intervention_effect, mean_loss
from tokext.interventions.patching import PatternPatch
from tokext.interventions.rebalance import SinkRebalance
from tokext.interventions.temperature import AttentionTemperature
from tokext.interventions.zerotuning import ZeroTuning
from tokext.models.hooks import pattern_hook_name
from tokext.models.info import model_info
from tokext.models.native import native_model

ALL = [
    EarlyLayerEmulation(alpha=1.0),
    SinkCalibration(),
    SinkRebalance(),
    AttentionTemperature(0.5),
    PatternPatch(0, (1, 2)),
    HeadAblation([(1, 1)], "mean"),
    ZeroTuning(head_gammas=[(1, 0, 0.5), (2, 3, 2.0)]),
]


def _hook_count(model) -> int:
    return sum(len(point.fwd_hooks) for point in model.hook_dict.values())


def _tokens(model, n=2, length=8, seed=0):
    return torch.randint(3, int(model.cfg.d_vocab), (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny_native", "tiny_llama"])
def test_hooks_removed_after_block_and_after_exceptions(request, name):
    model = request.getfixturevalue(name)
    tokens = _tokens(model)
    before = _hook_count(model)

    def broken(pattern, hook):
        raise RuntimeError("a hook failed mid-forward")

    with torch.no_grad():
        base = model(tokens)
        with intervene(model, *ALL) as run:
            assert _hook_count(model) > before
            model(tokens)
        assert _hook_count(model) == before and run.forwards == 1 and all(run.fired[i] for i in range(len(ALL)))
        with pytest.raises(ZeroDivisionError), intervene(model, *ALL):
            model(tokens)
            _ = 1 / 0
        assert _hook_count(model) == before
        # an error raised inside a hook, in the middle of a forward pass
        with pytest.raises(RuntimeError, match="mid-forward"), intervene(model, *ALL):
            with model.hooks(fwd_hooks=[(pattern_hook_name(1), broken)]):
                model(tokens)
        assert _hook_count(model) == before
        if name == "tiny_native":  # one of tokext's own errors, raised from inside its hook
            with pytest.raises(InputError, match="tokenizer"), intervene(model, SinkRebalance("categories")):
                model(tokens)
            assert _hook_count(model) == before
        torch.testing.assert_close(model(tokens), base)


@pytest.mark.parametrize("order", ["temperature-first", "temperature-second"])
@pytest.mark.parametrize("name", ["tiny_native", "tiny_llama"])
def test_nested_blocks_compose_and_user_hooks_survive(request, name, order):
    """Nested blocks act like one block listing the outer interventions first, also on an HF
    model, where the temperature could act on the pre-softmax scores (before every pattern hook)."""
    model = request.getfixturevalue(name)
    tokens = _tokens(model)
    seen = []
    user_hook = (pattern_hook_name(1), lambda p, hook: seen.append(float(p.sum())))
    a, b = AttentionTemperature(0.5), SinkRebalance(scale=0.1)
    if order == "temperature-second":
        a, b = b, a
    with torch.no_grad():
        with intervene(model, b, a):
            swapped = model(tokens)
        with model.hooks(fwd_hooks=[user_hook]):
            with intervene(model, a, b):
                both = model(tokens)
            with intervene(model, a):
                with intervene(model, b):
                    nested = model(tokens)
                only_a = model(tokens)  # the inner block's hooks are gone, the outer's remain
            with intervene(model, a):
                reference_a = model(tokens)
            assert len(seen) == 4  # the user's hook fired in every pass and is still attached
    torch.testing.assert_close(nested, both)
    torch.testing.assert_close(only_a, reference_a)
    assert float((only_a - both).abs().max()) > 1e-4
    assert float((swapped - both).abs().max()) > 1e-4  # the order matters, so the test can tell


def test_temperature_keeps_its_place_after_pattern_hooks(tiny_llama):
    """On HF models the temperature divides the scores only in layers where nothing must act first."""
    from tokext.interventions.base import RunContext

    model = tiny_llama
    hooks_before = _hook_count(model)
    alone = [n for n, _ in AttentionTemperature(2.0).hooks(model, RunContext())]
    assert all(n.endswith("hook_attn_scores") for n in alone)
    after_patch = [
        n
        for n, _ in AttentionTemperature(2.0).hooks(
            model, RunContext(earlier_points={pattern_hook_name(0), pattern_hook_name(2)})
        )
    ]
    assert after_patch == [pattern_hook_name(0), "blocks.1.attn.hook_attn_scores", pattern_hook_name(2)]
    with pytest.raises(InputError, match="list it first"):
        with intervene(model, PatternPatch(0, (2,)), AttentionTemperature(2.0, hook="scores")):
            pass
    assert _hook_count(model) == hooks_before


def test_refuses_uneditable_models(tiny_opt, tiny_native):
    tokens = _tokens(tiny_opt)
    before = _hook_count(tiny_opt)
    with pytest.raises(UneditableAttentionError, match="do not reach the logits"):
        with intervene(tiny_opt, AttentionTemperature(2.0)):
            tiny_opt(tokens)
    assert _hook_count(tiny_opt) == before
    with pytest.raises(UneditableAttentionError):
        AttentionTemperature(2.0).hooks(tiny_opt)
    simulated = native_model(n_layers=3, seed=7)
    model_info(simulated).pattern_edit_lands = {0: True, 1: True, 2: False}
    with pytest.raises(UneditableAttentionError, match=r"layers \[2\]"):
        with intervene(simulated, EarlyLayerEmulation()):
            pass
    with intervene(simulated, AttentionTemperature(2.0, layers=(0, 1))):  # editable layers only: accepted
        simulated(_tokens(simulated))


def test_parameter_validation():
    bad = [
        lambda: EarlyLayerEmulation(alpha=float("nan")),
        lambda: EarlyLayerEmulation(threshold=1.5),
        lambda: EarlyLayerEmulation(uniform=True, renormalize=True),
        lambda: EarlyLayerEmulation(horizon=0),
        lambda: SinkCalibration(beta=1.2),
        lambda: SinkCalibration(tau=-0.1),
        lambda: SinkCalibration(heads=[(1,)]),
        lambda: SinkRebalance("sinks"),
        lambda: SinkRebalance((-1,)),
        lambda: SinkRebalance(scale=-1.0),
        lambda: AttentionTemperature(0.0),
        lambda: AttentionTemperature(float("inf")),
        lambda: HeadAblation([(0, 0)], mode="resample"),
        lambda: HeadAblation([]),
        lambda: PatternPatch(0, ()),
        lambda: EarlyLayerEmulation(renormalize="yes"),
        lambda: SinkRebalance(layers=[1.5]),
    ]
    for make in bad:
        with pytest.raises(InputError):
            make()


def test_validation_against_the_model(tiny_native):
    model = tiny_native  # 3 layers, 4 heads
    cases = [
        (AttentionTemperature(2.0, layers=(3,)), r"layer 3 out of range .*0\.\.2"),
        (SinkCalibration(heads=[(0, 4)]), r"head 4 .*0\.\.3"),
        (EarlyLayerEmulation(source_layer=1, layers=(1, 2)), "after source_layer=1"),
        (EarlyLayerEmulation(source_layer=2), "no layer after"),
        (PatternPatch(2, (1,)), "after source_layer=2"),
        (SinkRebalance(layers=(0,), heads=[(1, 0)]), "none of the heads"),
        (EarlyLayerEmulation(alpha=-3.0), "negative"),
    ]
    before = _hook_count(model)
    for iv, message in cases:
        with pytest.raises((LayerIndexError, InputError), match=message):
            with intervene(model, iv):
                pass
    with pytest.raises(InputError, match="Intervention objects"):
        with intervene(model, "temperature"):
            pass
    assert _hook_count(model) == before


def test_not_applied_error_when_no_hook_fires(tiny_native):
    model, tokens = tiny_native, _tokens(tiny_native)
    with pytest.raises(InterventionNotAppliedError, match="never fired"):
        with intervene(model, AttentionTemperature(2.0, layers=(2,))):
            model(tokens, stop_at_layer=1)
    with intervene(model, AttentionTemperature(2.0, layers=(2,))):  # no forward pass: nothing to report
        pass
    assert issubclass(InterventionNotAppliedError, (TokextError, RuntimeError))


@pytest.mark.parametrize("iv", ALL + [SinkRebalance("categories", 0.0)], ids=repr)
def test_hooks_for_run_with_hooks_match_intervene(tiny_llama, iv):
    model = tiny_llama
    tokens = torch.tensor([[1] + encode_text(["ab, cd. e!\nfg h"])[0]])
    with torch.no_grad():
        with intervene(model, iv):
            expected = model(tokens)
        got = model.run_with_hooks(tokens, fwd_hooks=iv.hooks(model))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert _hook_count(model) == 0


@pytest.mark.parametrize(
    "pair",
    [
        (SinkRebalance(scale=0.2), AttentionTemperature(0.7)),
        (EarlyLayerEmulation(alpha=1.0), AttentionTemperature(2.0)),
        (SinkRebalance("categories", 0.1, layers=(2,)), PatternPatch(0, (2,))),
    ],
    ids=repr,
)
def test_fwd_hooks_for_several_interventions_keep_their_order(tiny_llama, pair):
    model = tiny_llama
    tokens = torch.tensor([[1] + encode_text(["ab, cd. e!\nfg h"])[0]])
    before = _hook_count(model)
    with torch.no_grad():
        with intervene(model, *pair):
            expected = model(tokens)
        with intervene(model, *pair[::-1]):
            swapped = model(tokens)
        got = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks(model, *pair))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert float((swapped - expected).abs().max()) > 1e-4  # the order matters here
    assert _hook_count(model) == before
    with pytest.raises(InputError, match="fwd_hooks takes Intervention objects"):
        fwd_hooks(model, "EarlyLayerEmulation()")


def test_repr_and_asdict_round_trip():
    for iv in ALL + [SinkRebalance(("punctuation", 0), 0.5, heads=[(1, 2)]), EarlyLayerEmulation(horizon=31)]:
        assert type(iv)(**dataclasses.asdict(iv)) == iv
        assert repr(iv).startswith(type(iv).__name__ + "(")
        hash(iv)
    namespace = {
        cls.__name__: cls
        for cls in (
            EarlyLayerEmulation,
            SinkCalibration,
            SinkRebalance,
            AttentionTemperature,
            PatternPatch,
            HeadAblation,
            ZeroTuning,
        )
    }
    for iv in ALL + [PatternPatch(0, range(1, 30)), HeadAblation([(15, h) for h in range(9)], "first")]:
        assert eval(repr(iv), namespace) == iv  # noqa: S307 - readable and still valid Python
    assert repr(PatternPatch(0, range(1, 30))) == "PatternPatch(source_layer=0, target_layers=range(1, 30))"
    assert repr(EarlyLayerEmulation()) == "EarlyLayerEmulation()"
    assert repr(SinkCalibration(beta=0.5)) == "SinkCalibration(beta=0.5)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        EarlyLayerEmulation().alpha = 1.0


def test_patterns_seen_inside_the_block_are_edited(tiny_native):
    model, tokens = tiny_native, _tokens(tiny_native)
    name = pattern_hook_name(1)
    with torch.no_grad():
        _, plain = model.run_with_cache(tokens, names_filter=name)
        with intervene(model, AttentionTemperature(0.1, layers=(1,))):
            _, cache = model.run_with_cache(tokens, names_filter=name)
    powered = plain[name].double() ** 10
    torch.testing.assert_close(cache[name].double(), powered / powered.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_intervention_effect_and_loss(tiny_llama):
    """Max |delta logit| and the losses against each sequence run alone, without padding."""
    model = tiny_llama
    texts = ["abc, def. ghi", "jk lm!\nno pq rs"]
    iv = EarlyLayerEmulation(alpha=1.0)
    effect = intervention_effect(model, texts, iv, batch_size=2)
    deltas, before, after, count = [], 0.0, 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([model.tokenizer(text).input_ids])
            base = model(ids)
            with intervene(model, iv):
                edited = model(ids)
            deltas.append(float((edited - base).abs().max()))
            n = ids.shape[1] - 1
            before += n * float(torch.nn.functional.cross_entropy(base[0, :-1], ids[0, 1:]))
            after += n * float(torch.nn.functional.cross_entropy(edited[0, :-1], ids[0, 1:]))
            count += n
    assert effect.n_tokens == count == sum(len(t) - 1 for t in texts)  # one token per char (no BOS), minus one
    assert effect.max_abs_delta_logit == pytest.approx(max(deltas), abs=1e-4) and max(deltas) > 1e-3
    assert effect.loss_before == pytest.approx(before / count, abs=1e-5)
    assert effect.loss_after == pytest.approx(after / count, abs=1e-5)
    assert effect.delta_loss == pytest.approx(effect.loss_after - effect.loss_before)
    assert mean_loss(model, texts, iv) == pytest.approx(after / count, abs=1e-5)
    with torch.no_grad():
        alone = model(torch.tensor([model.tokenizer(texts[1]).input_ids]), return_type="loss")
    assert mean_loss(model, texts[1:]) == pytest.approx(float(alone), abs=1e-5)
    none = intervention_effect(model, texts, EarlyLayerEmulation(alpha=0.0))
    assert none.max_abs_delta_logit < 1e-5


def test_select_heads_greedy(tiny_native):
    """ACT's selection against the greedy loop written out, scored by TransformerLens's own loss."""
    model, tokens = tiny_native, _tokens(tiny_native, n=3, length=12)
    candidates = [(1, 0), (1, 1), (2, 3), (0, 2)]

    def direct_loss(heads=()):
        with torch.no_grad():
            if not heads:
                return float(model(tokens, return_type="loss"))
            with intervene(model, SinkCalibration(beta=0.0, heads=list(heads))):
                return float(model(tokens, return_type="loss"))

    baseline = direct_loss()
    picked = select_heads_greedy(model, tokens, candidates=candidates, beta=0.0)
    assert picked.baseline == pytest.approx(baseline, abs=1e-5)
    for pair in candidates:
        assert picked.scores[pair] == pytest.approx(direct_loss([pair]), abs=1e-5)
    assert list(picked.heads) == [pair for pair in candidates if picked.scores[pair] < baseline]

    # forward selection, with a score (the loss raised) that some heads are sure to improve
    def raised(m):
        return -float(m(tokens, return_type="loss"))

    forward = select_heads_greedy(model, tokens, candidates=candidates, beta=0.0, cumulative=True, score=raised)
    kept, current = [], -baseline
    for pair in candidates:
        value = -direct_loss(kept + [pair])
        assert forward.scores[pair] == pytest.approx(value, abs=1e-5)
        if value < current:
            kept, current = kept + [pair], value
    assert kept, "the raised-loss score should keep at least one head"
    assert list(forward.heads) == kept
    assert forward.intervention() == SinkCalibration(beta=0.0, heads=kept)


@pytest.mark.parametrize(
    "iv",
    ALL
    + [
        SinkCalibration(heads=[(1, 0)]),
        AttentionTemperature(2.0, heads=[(0, 1)]),
        EarlyLayerEmulation(renormalize=True),
    ],
    ids=repr,
)
def test_gradients_flow_through_the_edits(tiny_native, iv):
    model, tokens = tiny_native, _tokens(tiny_native)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    model.zero_grad()
    with intervene(model, iv):
        logits = model(tokens, attention_mask=mask)
    logits[mask.bool()].sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    with torch.no_grad(), intervene(model, iv):
        torch.testing.assert_close(logits.detach(), model(tokens, attention_mask=mask))
    model.zero_grad()


def test_string_batches_with_hidden_padding_are_refused_where_padding_matters(tiny_llama):
    model = tiny_llama
    with torch.no_grad():
        with pytest.raises(InputError, match="padding"), intervene(model, SinkRebalance()):
            model(["ab cd", "e"])
        with intervene(model, SinkRebalance()):  # one string: no padding
            single = model(["ab cd"])
        with intervene(model, EarlyLayerEmulation()):  # pad keys carry zero attention: no mask needed
            model(["ab cd", "e"])
    tokens = model.to_tokens("ab cd")  # what TransformerLens feeds for a string
    with torch.no_grad(), intervene(model, SinkRebalance()):
        torch.testing.assert_close(single, model(tokens))


def test_transformerlens_hook_contexts_inside_the_block_leave_ours_attached(tiny_native):
    model, tokens = tiny_native, _tokens(tiny_native)
    noop = [(pattern_hook_name(0), lambda p, hook: None)]
    with torch.no_grad(), intervene(model, AttentionTemperature(2.0)) as run:
        first = model(tokens)
        model.run_with_cache(tokens, names_filter=pattern_hook_name(1))
        model.run_with_hooks(tokens, fwd_hooks=noop)
        with model.hooks(fwd_hooks=noop):
            pass
        torch.testing.assert_close(model(tokens), first)
    assert run.forwards == 4 and run.fired[0] == 4 * model.cfg.n_layers


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_temperature_on_scores_equals_tempering_the_pattern(request, name, temperature):
    """Where score edits land, scores / T gives the logits of p^(1/T) renormalised (padded batch)."""
    from tokext.models.probes import check_score_edits

    model = request.getfixturevalue(name)
    assert all(check_score_edits(model).values())
    tokens = _tokens(model, n=3, length=10, seed=4)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    real = mask.bool()
    with torch.no_grad():
        base = model(tokens, attention_mask=mask)
        with intervene(model, AttentionTemperature(temperature, hook="scores")):
            on_scores = model(tokens, attention_mask=mask)
        with intervene(model, AttentionTemperature(temperature, hook="pattern")):
            on_pattern = model(tokens, attention_mask=mask)
        with intervene(model, AttentionTemperature(temperature, heads=[(1, 0)], hook="scores")):
            one_head_scores = model(tokens, attention_mask=mask)
        with intervene(model, AttentionTemperature(temperature, heads=[(1, 0)], hook="pattern")):
            one_head_pattern = model(tokens, attention_mask=mask)
    assert float((on_scores - base).abs()[real].max()) > 1e-3
    assert float((on_scores - on_pattern).abs()[real].max()) < 1e-4
    assert float((one_head_scores - one_head_pattern).abs()[real].max()) < 1e-4
    names = [n for n, _ in AttentionTemperature(temperature).hooks(model)]
    assert all(n.endswith("hook_attn_scores") for n in names)  # auto picks the scores


def test_temperature_falls_back_to_the_pattern_where_score_edits_are_discarded(tiny_native):
    from tokext.models.probes import check_score_edits

    model = tiny_native
    assert not any(check_score_edits(model).values())
    with pytest.raises(UneditableAttentionError, match="hook_attn_scores"):
        with intervene(model, AttentionTemperature(2.0, hook="scores")):
            pass
    names = [n for n, _ in AttentionTemperature(2.0).hooks(model)]
    assert all(n.endswith("hook_pattern") for n in names)
    tokens = _tokens(model)
    with torch.no_grad():
        base = model(tokens)
        with intervene(model, AttentionTemperature(2.0)):
            moved = model(tokens)
    assert float((moved - base).abs().max()) > 1e-3
    with pytest.raises(InputError, match="hook must be one of"):
        AttentionTemperature(2.0, hook="softmax")


def test_public_names_resolve_to_the_library_objects():
    """``tokext.X`` (loaded lazily) is the object defined in its module, for every exported name."""
    import importlib

    import tokext

    for name in tokext.__all__:
        if name == "__version__":
            continue
        module = importlib.import_module(tokext._EXPORTS[name])
        assert getattr(tokext, name) is getattr(module, name), name
    assert tokext.intervene is intervene and tokext.EarlyLayerEmulation is EarlyLayerEmulation
    assert tokext.AttentionTemperature is AttentionTemperature and tokext.HeadAblation is HeadAblation
    with pytest.raises(AttributeError):
        tokext.no_such_name  # noqa: B018
