"""What a run records of its config (scaling.recorded), from a plain dict as from a DictConfig."""
from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from scaling.recorded import as_attributes, config_yaml, recorded_config, trial_params, trial_run_name

# Strings OmegaConf quotes (it would read them back as numbers or booleans), and what PyYAML's
# emitters could write differently: a line past the 80-column width, unicode, line breaks.
AWKWARD = {
    "numbers": ["1e-3", "10", "0x1F", "1_000", ".5", "-.inf", "nan"],
    "words": ["true", "False", "yes", "off", "null", "~", ""],
    "long": "a path " * 20 + "that runs well past eighty columns",
    "unicode": "lr×2 µ ∞ é",
    "lines": "first line\nsecond line\n",
    "quotes": "it's \"quoted\": a: b # not a comment",
    "values": {"none": None, "yes": True, "float": 1e-06, "inf": math.inf, "int": -3, "list": [1, [2.5, "x"], {}]},
}


@pytest.mark.parametrize("overrides", [(), ("batch_size=512", "scaling.rule=sqrt", "warmup.epochs=1",
                                            "micro_batch_size=128", "gns.enabled=true"), ("lr=0.3", "optimizer=adam")])
def test_config_yaml_writes_what_omegaconf_writes_for_a_trial_config(compose_cfg, overrides):
    plain = recorded_config(compose_cfg(*overrides))
    text = config_yaml(plain)
    assert text == OmegaConf.to_yaml(plain)
    assert OmegaConf.to_container(OmegaConf.create(text)) == plain


def test_config_yaml_quotes_and_wraps_as_omegaconf_does():
    text = config_yaml(AWKWARD)
    assert text == OmegaConf.to_yaml(AWKWARD)
    back = OmegaConf.to_container(OmegaConf.create(text))
    assert back["numbers"] == AWKWARD["numbers"] and back["words"] == AWKWARD["words"]  # still strings
    assert {k: back[k] for k in ("long", "unicode", "lines", "quotes")} == \
        {k: AWKWARD[k] for k in ("long", "unicode", "lines", "quotes")}


@pytest.mark.parametrize("overrides, ref_lr", [
    (("batch_size=512", "scaling.rule=sqrt", "warmup.epochs=1", "micro_batch_size=128"), None),
    (("lr=0.3", "seed=7"), None),
    (("scaling.ref_lr=auto", "batch_size=32"), 0.05),  # the range test's LR, as the study passes it
])
def test_a_plain_config_gives_the_params_and_name_its_dictconfig_gives(compose_cfg, overrides, ref_lr):
    cfg = compose_cfg(*overrides)
    plain = OmegaConf.to_container(cfg, resolve=True)
    params = trial_params(plain, ref_lr)
    assert params == trial_params(cfg, ref_lr)
    assert list(params) == list(trial_params(cfg, ref_lr)) and list(params)[-1] == "lr.rule_bypassed"  # the order
    assert trial_run_name(plain) == trial_run_name(cfg)


def test_a_run_name_shows_the_grid_axes_its_fields_do_not(compose_cfg):
    """An optimizer, schedule or model sweep named its trials alike in the MLflow UI (bs=32 lr×1 sqrt s0)."""
    cfg = compose_cfg("batch_size=32", "optimizer=adam", "model.width=64")
    axes = {"batch_size": "32", "optimizer": "adam", "+model.width": "64", "seed": "0"}
    assert trial_run_name(cfg, axes) == "bs=32 lr×1 linear optimizer=adam width=64 s0"
    assert trial_run_name(cfg) == "bs=32 lr×1 linear s0"


def test_a_warmup_axis_names_its_zero_too(compose_cfg):
    """In the default study (warmup.epochs=0,0.5) the warmup-0 trials' names said nothing of it."""
    axes = {"batch_size": "256", "+warmup.epochs": "0"}
    assert trial_run_name(compose_cfg("batch_size=256"), axes) == "bs=256 lr×1 linear warmup=0 s0"
    assert trial_run_name(compose_cfg("batch_size=256", "warmup.epochs=0.5"), axes | {"+warmup.epochs": "0.5"}) \
        == "bs=256 lr×1 linear warmup=0.5 s0"
    assert trial_run_name(compose_cfg("batch_size=256")) == "bs=256 lr×1 linear s0"  # not swept: no warmup, no word


def test_as_attributes_reads_nested_keys_and_leaves_a_dictconfig_alone(compose_cfg):
    view = as_attributes({"scaling": {"rule": "sqrt", "ref_batch_size": 128}, "lr": None, "odd-key": 1})
    assert (view.scaling.rule, view.scaling.ref_batch_size, view.lr) == ("sqrt", 128, None)
    assert getattr(view, "odd-key") == 1
    cfg = compose_cfg()
    assert as_attributes(cfg) is cfg
