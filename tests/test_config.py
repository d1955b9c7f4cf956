"""IA3Config against PEFT's own IA3Config and matching functions (the independent reference)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import peft
import pytest
from peft.tuners.ia3.model import IA3Model
from peft.tuners.tuners_utils import check_target_module_exists

from ia3_jax import IA3Config, IA3ConfigError

KEYS = [
    "encoder.block.0.layer.0.SelfAttention.k",
    "encoder.block.0.layer.0.SelfAttention.v",
    "encoder.block.0.layer.0.SelfAttention.q",
    "encoder.block.0.layer.1.DenseReluDense.wo",
    "encoder.block.0.layer.1.DenseReluDense.wi",
    "transformer.h.0.attn.c_attn",
    "transformer.h.0.mlp.c_proj",
    "transformer.h.0.attn.c_proj",
    "model.layers.1.self_attn.k_proj",
    "model.layers.1.mlp.down_proj",
    "bert.encoder.layer.0.attention.output.dense",
    "bert.encoder.layer.0.output.dense",
    "classifier",
    "classifier.dense",
    "k",
]

CONFIGS = [
    dict(target_modules=["k", "v", "wo"], feedforward_modules=["wo"]),
    dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]),
    dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    dict(target_modules=r".*\.(k|v|wo)", feedforward_modules=r".*wo"),
    dict(target_modules=["k_proj", "down_proj"], exclude_modules=["model.layers.1.self_attn.k_proj"]),
    dict(target_modules=r".*dense", exclude_modules=r".*attention.*", modules_to_save=["classifier"]),
    dict(target_modules=["dense", "k"], modules_to_save=["classifier"], feedforward_modules=["dense"]),
]


@pytest.mark.parametrize("fields", CONFIGS)
def test_matching_equals_peft(fields):
    ours = IA3Config(**fields)
    theirs = peft.IA3Config(**fields)
    for key in KEYS:
        assert ours.is_target(key) == bool(check_target_module_exists(theirs, key)), key
        if ours.is_target(key) and theirs.feedforward_modules is not None:
            assert ours.is_feedforward(key) == IA3Model._check_target_module_feedforward(theirs, key), key
        elif ours.is_target(key):  # PEFT resolves None from its model tables first; on its own it is "none"
            assert not ours.is_feedforward(key)


def test_defaults_equal_peft():
    ours = IA3Config()
    theirs = peft.IA3Config()
    for field in dataclasses.fields(IA3Config):
        assert getattr(ours, field.name) == getattr(theirs, field.name), field.name


def test_feedforward_must_be_subset_of_targets():
    with pytest.raises(IA3ConfigError, match=r"subset of `target_modules`.*\['wi'\]"):
        IA3Config(target_modules=["k"], feedforward_modules=["wi"])
    # PEFT checks nothing when either side is a regex; neither do we.
    IA3Config(target_modules=".*k", feedforward_modules=["wi"])


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(target_modules=[1]), "module names"),
        (dict(target_modules="(unclosed"), "not a valid regex"),
        (dict(modules_to_save="classifier"), r"write \['classifier'\]"),
        (dict(task_type="CLASSIFY"), "task types"),
        (dict(fan_in_fan_out="yes"), "must be a bool"),
        (dict(target_modules=[]), "empty"),
    ],
)
def test_bad_fields(fields, message):
    with pytest.raises(IA3ConfigError, match=message):
        IA3Config(**fields)


def test_json_round_trip_and_peft_reads_it(tmp_path):
    config = IA3Config(
        target_modules=["k", "v", "wo"], feedforward_modules=["wo"], modules_to_save=["classifier"], task_type="SEQ_CLS"
    )
    assert IA3Config.from_json(config.to_json()) == config
    # PEFT reads our JSON into an equal config.
    (tmp_path / "adapter_config.json").write_text(config.to_json())
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.IA3Config)
    assert theirs.target_modules == {"k", "v", "wo"}
    assert theirs.feedforward_modules == {"wo"}
    assert list(theirs.modules_to_save) == ["classifier"]
    # And we read PEFT's JSON.
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = IA3Config.from_json((tmp_path / "peft" / "adapter_config.json").read_text())
    assert ours == config


def test_unknown_fields_and_other_peft_types_are_rejected():
    with pytest.raises(IA3ConfigError, match=r"Unknown IA3Config fields \['r'\]"):
        IA3Config.from_dict({"target_modules": ["k"], "r": 8})
    with pytest.raises(IA3ConfigError, match="not an IA3 adapter"):
        IA3Config.from_dict({"peft_type": "LORA", "target_modules": ["k"]})
    with pytest.raises(IA3ConfigError, match="not valid JSON"):
        IA3Config.from_json("{")
    assert json.loads(IA3Config(target_modules=["k"]).to_json())["peft_type"] == "IA3"


def test_config_is_a_static_jit_argument():
    config = IA3Config(target_modules=["k"])
    assert hash(config) == hash(IA3Config(target_modules=["k"]))
    traces = []

    def count_targets(x, config):
        traces.append(config)
        return x * len(config.target_modules)

    f = jax.jit(count_targets, static_argnums=1)
    assert float(f(jnp.ones(()), config)) == 1.0
    assert float(f(jnp.ones(()), IA3Config(target_modules=["k"]))) == 1.0
    assert len(traces) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.fan_in_fan_out = True  # type: ignore[misc]


def test_modules_to_save_are_plain_names_not_regexes():
    """PEFT matches modules_to_save entries as names; a regex character must mean itself (no re.error)."""
    config = IA3Config(target_modules=["k"], modules_to_save=["lin(", "head.out"])
    assert config.is_module_to_save("lin(")
    assert config.is_module_to_save("model.lin(.weight_holder")  # a module inside a saved one
    assert not config.is_module_to_save("lin0")
    assert config.is_module_to_save("model.head.out")
    assert not config.is_module_to_save("model.headXout")  # '.' is a dot, not "any character"
    assert not config.is_target("lin(") and config.is_target("encoder.k")
