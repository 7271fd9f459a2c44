"""Config parsing: property-based tests (hypothesis) plus exact examples."""

from __future__ import annotations

import json
import re
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.config import (
    _CHOICES,
    _RANGES,
    ExperimentConfig,
    _get,
    _valid_keys,
    config_to_dict,
    dump_toml,
    load_config,
)
from fedmoe.errors import ConfigError

# keys checked by validate() beyond their type, or against each other: left to the exact tests
# (numeric keys with a range are drawn inside it, see _draw)
_CONSTRAINED = set(_CHOICES) | {"setting.budget_high", "setting.budget_low", "engine.inject_faults",
                                "data.val_fraction", "data.test_fraction"}


def _scalar_keys() -> dict[str, type]:
    out: dict[str, type] = {}
    for key in _valid_keys(ExperimentConfig):
        section, _, name = key.rpartition(".")
        cls = type(_get(ExperimentConfig(), section)) if section else ExperimentConfig
        tp = typing.get_type_hints(cls)[name]
        if tp in (int, float, bool, str) and key not in _CONSTRAINED:
            out[key] = tp
    return out


SCALARS = _scalar_keys()
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)
_VALUES = {
    int: st.integers(-(10**9), 10**9),
    float: st.floats(allow_nan=False, allow_infinity=False, width=64),
    bool: st.booleans(),
    str: _TEXT,
}


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string for these characters
    return repr(value)


@st.composite
def overrides(draw):
    keys = draw(st.lists(st.sampled_from(sorted(SCALARS)), min_size=1, max_size=6, unique=True))
    return {k: _draw(draw, k) for k in keys}


def _draw(draw, key):
    if key not in _RANGES:
        return draw(_VALUES[SCALARS[key]])
    lo, hi, inclusive = _RANGES[key]
    lo, hi = max(lo, -1e9), min(hi, 1e9)
    if SCALARS[key] is int:
        return draw(st.integers(int(lo) + (0 if inclusive else 1), int(hi)))
    return draw(st.floats(lo, hi, exclude_min=not inclusive, allow_nan=False, allow_infinity=False))


def test_there_are_unconstrained_keys_of_every_type():
    assert {int, float, bool, str} <= set(SCALARS.values())
    assert {k for k, tp in SCALARS.items() if tp in (int, float)} <= set(_RANGES)  # every number has a range


@settings(max_examples=150, deadline=None)
@given(overrides())
def test_override_sets_exactly_that_value(values):
    cfg = load_config(None, [f"{k}={_toml(v)}" for k, v in values.items()])
    for key, value in values.items():
        got = _get(cfg, key)
        assert got == value and type(got) is SCALARS[key], key
    default = config_to_dict(ExperimentConfig())
    changed = config_to_dict(cfg)
    for section, fields in default.items():  # nothing else moved
        if isinstance(fields, dict):
            for name, v in fields.items():
                if f"{section}.{name}" not in values:
                    assert changed[section][name] == v


@settings(max_examples=100, deadline=None)
@given(overrides())
def test_dump_toml_round_trips(tmp_path_factory, values):
    cfg = load_config(None, [f"{k}={_toml(v)}" for k, v in values.items()])
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(_valid_keys(ExperimentConfig))), st.data())
def test_unknown_key_is_named_and_a_valid_key_suggested(key, data):
    section, _, name = key.rpartition(".")
    i = data.draw(st.integers(0, len(name) - 1))
    typo = (f"{section}." if section else "") + name[:i] + name[i + 1:] + data.draw(st.sampled_from(["", "x", "_"]))
    if typo in _valid_keys(ExperimentConfig) or not typo.rpartition(".")[2]:
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{typo}=1"])
    text = str(err.value)
    assert f"`{typo}`" in text
    m = re.search(r"did you mean `([^`]+)`\?", text)
    if m:
        assert m.group(1) in _valid_keys(ExperimentConfig)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(k for k, t in SCALARS.items() if t in (int, float, bool))),
       st.text(alphabet="abcdefghij", min_size=1, max_size=8))
def test_wrong_type_is_one_clear_error(key, word):
    with pytest.raises(ConfigError, match=re.escape(f"`{key}` must be {SCALARS[key].__name__}")):
        load_config(None, [f"{key}={word}"])


def test_exact_examples():
    with pytest.raises(ConfigError, match=r"Unknown config key `train.lrr`.*did you mean `train.lr`\?"):
        load_config(None, ["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"`train.batch_size` = 0 is out of range.*>= 1"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"`engine.device` = 'tpu' is not one of"):
        load_config(None, ["engine.device=tpu"])
    with pytest.raises(ConfigError, match="has no `=`"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"`model.name` value `\"tiny` is not valid TOML"):
        load_config(None, ['model.name="tiny'])  # an unclosed quote is an error, not a literal string
    assert load_config(None, ["model.name=tiny-olmoe"]).model.name == "tiny-olmoe"  # bare words are strings
    with pytest.raises(ConfigError, match=r"`algorithm` = 'fedmo' is not one of"):
        load_config(None, ["algorithm=fedmo"])
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # an int where a float goes is widened


def test_algorithm_choices_match_the_registry():
    from fedmoe.engine.strategies import STRATEGIES

    assert set(_CHOICES["algorithm"]) == set(STRATEGIES)


def test_every_numeric_key_has_a_range_and_must_be_finite():
    import typing

    from fedmoe.config import _RANGES, ExperimentConfig, _valid_keys

    hints: dict[str, typing.Any] = {}

    def walk(cls, prefix=""):
        for name, tp in typing.get_type_hints(cls).items():
            if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
                walk(tp, f"{prefix}{name}.")
            else:
                hints[prefix + name] = tp

    walk(ExperimentConfig)
    numeric = {k for k, tp in hints.items() if tp in (int, float)}
    assert numeric and numeric <= set(_valid_keys(ExperimentConfig))
    assert numeric - set(_RANGES) == set()
    for key in sorted(k for k in numeric if hints[k] is float):
        for bad in ("inf", "nan", "-inf"):
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
                load_config(None, [f"{key}={bad}"])


@pytest.mark.parametrize("override", ["engine.checkpoint_every=-1", "train.grad_clip=-1", "train.warmup_ratio=5",
                                      "train.eval_batch_size=0", "data.max_target_len=0", "seed=-3",
                                      "hfedmoe.lam=2", "baseline.num_experts=-2"])
def test_out_of_range_values_are_refused(override):
    with pytest.raises(ConfigError, match="out of range"):
        load_config(None, [override])
