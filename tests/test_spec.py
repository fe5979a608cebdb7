"""The spec: validated on load, presets fill defaults, errors name the key and the allowed ones."""
from __future__ import annotations

import pytest

import vitgraph as vg
from vitgraph.spec import PRESETS, Spec


def test_unknown_keys_are_named_with_the_allowed_ones():
    with pytest.raises(vg.SpecError, match=r"unknown key 'widht'.*allowed keys: preset, budget, width"):
        Spec.from_dict({"widht": {}})
    with pytest.raises(vg.SpecError, match=r"'width.methd'.*under width: method, heads, head_dim, mlp, embed, align, allocation"):
        Spec.from_dict({"width": {"methd": "magnitude"}})


@pytest.mark.parametrize("bad, words", [
    ({"budget": {"flops": 1.5}}, "budget.flops"),
    ({"budget": {"flops": 0}}, "budget.flops"),
    ({"width": {"method": "random"}}, "magnitude, taylor, wdpruning, uvc"),
    ({"width": {"heads": "yes"}}, "width.heads must be true or false"),
    ({"train": {"steps": 1.5}}, "train.steps must be an integer"),
    ({"preset": "nope"}, "unknown preset 'nope'"),
    ({"width": 3}, "width must be a mapping"),
])
def test_bad_values_are_spec_errors(bad, words):
    with pytest.raises(vg.SpecError, match=words):
        Spec.from_dict(bad)


def test_presets_fill_defaults_and_user_keys_win():
    spec = Spec.from_dict({"preset": "wdpruning", "budget": {"flops": 0.4}, "train": {"steps": 10}})
    assert spec.width.method == "wdpruning" and spec.width.align == 16
    assert spec.budget.flops == 0.4 and spec.train.steps == 10
    assert spec.train.lr == PRESETS["wdpruning"]["train"]["lr"]
    assert Spec.from_dict({"preset": "uvc"}).width.method == "uvc"
    tokens = Spec.from_dict({"preset": "spvit_tokens"})
    assert tokens.tokens.on and tokens.tokens.method == "spvit" and not (tokens.width.heads or tokens.width.mlp)


def test_every_example_spec_loads():
    from pathlib import Path

    specs = sorted((Path(__file__).parent.parent / "examples" / "specs").glob("*.yaml"))
    assert len(specs) >= 6
    for path in specs:
        Spec.load(path)


def test_yaml_round_trip_and_scientific_strings(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("budget: {flops: 0.5}\ntrain: {lr: 5e-4, steps: 20}\n")  # YAML 1.1 reads 5e-4 as a string
    spec = Spec.load(path)
    assert spec.train.lr == pytest.approx(5e-4)
    spec.save(tmp_path / "again.yaml")
    assert Spec.load(tmp_path / "again.yaml") == spec


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(vg.SpecError, match="does not exist"):
        Spec.load(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("budget: [\n")
    with pytest.raises(vg.SpecError, match="not valid YAML"):
        Spec.load(tmp_path / "bad.yaml")


def test_a_tokens_section_turns_tokens_on_and_names_only_tokens():
    """`tokens: {method: attention}` compresses tokens at the default stages, not the default width (it did)."""
    spec = Spec.from_dict({"budget": {"flops": 0.6}, "tokens": {"method": "attention"}})
    assert spec.tokens.on and spec.tokens.stages == () and not spec.width.enabled
    assert not Spec.from_dict({"tokens": {"method": "attention", "enabled": False}}).tokens.on
    assert not Spec.from_dict({"budget": {"flops": 0.6}}).tokens.on
    both = Spec.from_dict({"tokens": {"method": "attention"}, "width": {"heads": True}})
    assert both.tokens.on and both.width.heads
