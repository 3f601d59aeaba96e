"""Config: every preset composes and validates; every bad value fails with its key; effective LR."""
from __future__ import annotations

import math

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from scaling.cli import CONF_DIR, compose, one_line
from scaling.config import ConfigError, effective_lr, warmup_start_lr
from scaling.validation import validate

# Every option of every config group, discovered from scaling/conf/ so a new preset is covered as it lands.
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
PRESETS = [(group, f.stem) for group in GROUPS for f in sorted((CONF_DIR / group).glob("*.yaml"))]


def test_presets_discovered():
    assert {"data", "model", "optimizer", "schedule", "experiment"} <= set(GROUPS)
    for group in ("data", "model", "optimizer", "schedule", "experiment"):
        assert any(g == group for g, _ in PRESETS), f"no preset found in scaling/conf/{group}"


@pytest.mark.parametrize("group,name", PRESETS, ids=[f"{g}={n}" for g, n in PRESETS])
def test_every_preset_composes_and_validates(compose_cfg, group, name):
    cfg = compose_cfg(f"{group}={name}")
    validate(cfg)
    if group != "experiment":  # a group option sets the group's `name` to its own (the dispatch key)
        assert cfg[group].name == name


def test_defaults_compose_and_validate(compose_cfg):
    cfg = compose_cfg()
    validate(cfg)
    assert (cfg.data.name, cfg.model.name, cfg.optimizer.name, cfg.schedule.name) == ("mnist1d", "mlp", "sgd", "constant")


# --------------------------------------------------------------------------- rejected values

# (overrides, key the ConfigError names, the bad value as typed)
REJECTED = [
    (["batch_size=0"], "batch_size", "0"),
    (["batch_size=-1"], "batch_size", "-1"),
    (["micro_batch_size=0"], "micro_batch_size", "0"),
    (["micro_batch_size=-16"], "micro_batch_size", "-16"),
    (["lr=0"], "lr", "0"),
    (["lr=-0.1"], "lr", "-0.1"),
    (["lr_multiplier=0"], "lr_multiplier", "0"),
    (["lr_multiplier=-2"], "lr_multiplier", "-2"),
    (["epochs=0"], "epochs", "0"),
    (["epochs=-1"], "epochs", "-1"),
    (["scaling.ref_lr=0"], "scaling.ref_lr", "0"),
    (["scaling.ref_lr=-0.05"], "scaling.ref_lr", "-0.05"),
    (["scaling.ref_batch_size=0"], "scaling.ref_batch_size", "0"),
    (["scaling.ref_batch_size=-128"], "scaling.ref_batch_size", "-128"),
    (["batch_size=32", "micro_batch_size=3"], "micro_batch_size", "3"),
    (["batch_size=64", "micro_batch_size=128"], "micro_batch_size", "128"),
    # gns.micro_batches: one split for every batch size of a study, checked only while it measures
    (["gns.enabled=true", "gns.micro_batches=1"], "gns.micro_batches", "1"),
    (["gns.enabled=true", "gns.micro_batches=0"], "gns.micro_batches", "0"),
    (["gns.enabled=true", "batch_size=96", "gns.micro_batches=5"], "gns.micro_batches", "5"),
    (["gns.enabled=true", "gns.micro_batches=4", "micro_batch_size=16"], "gns.micro_batches", "4"),
    (["gns.enabled=true", "gns.micro_batches=4", "parallel.max_micro_batch=16"], "gns.micro_batches", "4"),
    (["data.n_samples=100", "batch_size=128"], "batch_size", "128"),  # 80 training samples
    (["scaling.rule=cubic"], "scaling.rule", "cubic"),
    (["optimizer.name=lion"], "optimizer.name", "lion"),
    (["schedule.name=warmup_cosine"], "schedule.name", "warmup_cosine"),
    (["epochs=1", "eval_every=2"], "eval_every", "2"),
    (["target.metric=val/f1"], "target.metric", "val/f1"),
    (["lr=nan"], "lr", "nan"),
    (["lr=inf"], "lr", "inf"),
    (["lr_multiplier=nan"], "lr_multiplier", "nan"),
    (["epochs=nan"], "epochs", "nan"),
    (["eval_every=nan"], "eval_every", "nan"),
    (["scaling.ref_lr=nan"], "scaling.ref_lr", "nan"),
    (["target.value=nan"], "target.value", "nan"),
    (["divergence.factor=nan"], "divergence.factor", "nan"),
    # lengths a schedule cannot take at batch 128 of 19,200 samples: 0.15 steps, a 1-step cycle
    (["schedule=step", "schedule.step_epochs=0.001"], "schedule.step_epochs", "0.001"),
    (["schedule=cyclic", "schedule.cycle_epochs=0.005"], "schedule.cycle_epochs", "0.005"),
    # onecycle's max_lr is the recorded effective LR: a start or an end above it would train a higher one
    (["schedule=onecycle", "schedule.div_factor=0.5"], "schedule.div_factor", "0.5"),
    (["schedule=onecycle", "schedule.div_factor=2", "schedule.final_div_factor=0.25"],
     "schedule.final_div_factor", "0.25"),
]


@pytest.mark.parametrize("overrides,key,bad", REJECTED, ids=[" ".join(o) for o, _, _ in REJECTED])
def test_rejected(compose_cfg, overrides, key, bad):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    err = info.value
    assert err.key == key
    if bad == "nan":
        assert isinstance(err.value, float) and math.isnan(err.value)
    elif isinstance(err.value, str):
        assert err.value == bad
    else:
        assert float(err.value) == float(bad)
    msg = str(err)
    assert "\n" not in msg
    assert msg.startswith(f"{key}="), msg  # names the key first...
    assert bad in msg.split(":", 1)[0], msg  # ...then the value that was given


def test_gns_micro_batches_splits_every_batch_size_of_a_study_alike(compose_cfg):
    """One override measures B_simple at every batch size of a grid (micro_batch_size is one size for all,
    which a grid from 16 to 2048 cannot share usefully); it changes nothing while the noise scale is off."""
    from scaling.config import Split
    from scaling.split import plan_split

    for b in (16, 64, 2048):
        cfg = compose_cfg(f"batch_size={b}", "gns.enabled=true", "gns.micro_batches=4")
        validate(cfg)
        assert plan_split(cfg) == Split(1, b // 4, 4)
    assert plan_split(compose_cfg("batch_size=64", "gns.micro_batches=4")) == Split(1, 64, 1)
    with pytest.raises(ConfigError, match="needs at least 2 micro-batches per step: set gns.micro_batches"):
        validate(compose_cfg("gns.enabled=true"))


# (overrides, words the one-line error must contain): Hydra refuses these before validate() runs.
COMPOSE_FAILS = [
    (["batch_size=abc"], ["batch_size", "abc"]),
    (["epochs=ten"], ["epochs", "ten"]),
    (["mlflow.enabled=maybe"], ["mlflow.enabled", "maybe"]),
    (["batchsize=3"], ["batchsize"]),
    (["scaling.rulez=sqrt"], ["rulez"]),
    (["optimizer=foo"], ["optimizer", "foo"]),
    (["schedule=foo"], ["schedule", "foo"]),
    (["model=transformer"], ["model", "transformer"]),
    (["experiment=nope"], ["experiment", "nope"]),
    # a composition error whose reason is on the line after Hydra's "... raised while composing config:"
    (["hydra/sweeper=basic", "experiment=default_study"],
     ["experiment/default_study", "Key 'asha' not in 'BasicSweeperConf'", "hydra.sweeper.asha"]),
]


@pytest.mark.parametrize("overrides,words", COMPOSE_FAILS, ids=[" ".join(o) for o, _ in COMPOSE_FAILS])
def test_rejected_at_compose(overrides, words):
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose(overrides)
    line = one_line(info.value)
    assert "\n" not in line
    for word in words:
        assert word in line, line


def test_optimizer_group_lists_its_options():
    with pytest.raises(HydraException) as info:
        compose(["optimizer=foo"])
    assert "adam" in one_line(info.value) and "sgd" in one_line(info.value)


# --------------------------------------------------------------------------- effective LR

REF_LR, REF_B = 0.05, 128
LR_TABLE = [
    # rule, batch_size, lr_multiplier, expected effective LR
    ("none", 32, 1.0, 0.05), ("none", 128, 1.0, 0.05), ("none", 2048, 1.0, 0.05), ("none", 512, 2.0, 0.1),
    ("linear", 32, 1.0, 0.0125), ("linear", 128, 1.0, 0.05), ("linear", 512, 1.0, 0.2),
    ("linear", 2048, 1.0, 0.8), ("linear", 256, 0.5, 0.05),
    ("sqrt", 32, 1.0, 0.025), ("sqrt", 128, 1.0, 0.05), ("sqrt", 512, 1.0, 0.1),
    ("sqrt", 2048, 1.0, 0.2), ("sqrt", 8, 4.0, 0.05),
]


@pytest.mark.parametrize("rule,batch_size,mult,expected", LR_TABLE)
def test_effective_lr_table(compose_cfg, rule, batch_size, mult, expected):
    cfg = compose_cfg(f"scaling.rule={rule}", f"batch_size={batch_size}", f"lr_multiplier={mult}",
                      f"scaling.ref_lr={REF_LR}", f"scaling.ref_batch_size={REF_B}")
    validate(cfg)
    assert effective_lr(cfg) == pytest.approx(expected, rel=1e-12)
    # an explicit reference LR (the LR range test's result) replaces scaling.ref_lr
    assert effective_lr(cfg, ref_lr=2 * REF_LR) == pytest.approx(2 * expected, rel=1e-12)


@pytest.mark.parametrize("rule", ["none", "sqrt", "linear"])
@pytest.mark.parametrize("batch_size", [32, 512])
def test_explicit_lr_bypasses_the_rule(compose_cfg, rule, batch_size):
    cfg = compose_cfg("lr=0.3", f"scaling.rule={rule}", f"batch_size={batch_size}", "lr_multiplier=4")
    validate(cfg)
    assert effective_lr(cfg) == 0.3
    assert effective_lr(cfg, ref_lr=1.0) == 0.3


@pytest.mark.parametrize("rule,batch_size,mult,expected", LR_TABLE)
def test_warmup_starts_from_the_rules_lr_at_the_reference_batch(compose_cfg, rule, batch_size, mult, expected):
    """Goyal et al.'s start, ref_lr x multiplier, is the trained LR scaled back to ref_batch_size by
    the rule; an explicit lr gets the same start, lr x (B_ref / B) ** alpha, and not ref_lr's.
    Below ref_batch_size that would start above the trained LR: the warmup is flat there."""
    over = (f"scaling.rule={rule}", f"batch_size={batch_size}", f"scaling.ref_lr={REF_LR}",
            f"scaling.ref_batch_size={REF_B}", "warmup.epochs=0.5")
    cfg = compose_cfg(*over, f"lr_multiplier={mult}")
    assert warmup_start_lr(cfg) == pytest.approx(min(REF_LR * mult, expected), rel=1e-12)
    assert warmup_start_lr(cfg) <= effective_lr(cfg)
    alpha = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[rule]
    explicit = compose_cfg(*over, "lr=0.3", "lr_multiplier=4")  # neither ref_lr nor the multiplier counts
    assert warmup_start_lr(explicit) == pytest.approx(0.3 * min(1.0, (REF_B / batch_size) ** alpha), rel=1e-12)
    assert warmup_start_lr(explicit, ref_lr=1.0) == warmup_start_lr(explicit)
    assert warmup_start_lr(compose_cfg(*over, "lr=0.3", "warmup.start=zero")) == 0.0


def test_hydras_repository_copies_share_the_config_store_and_compositions_stay_independent():
    """Hydra deep-copies its config repository per composition (and per group `--help` lists); the
    ConfigStore is shared by those copies instead of copied (scaling.config._share_config_store).
    Sharing must not let one composition, or a caller editing what the store hands out, reach another."""
    import copy

    from hydra.core.config_store import ConfigStore

    tuned = compose(["batch_size=64", "optimizer=adam"])
    store = ConfigStore.instance()
    assert copy.deepcopy(store) is store
    store.load("trial_schema.yaml").node.batch_size = 12345  # the store hands out a copy: no effect
    plain = compose([])
    assert (tuned.batch_size, tuned.optimizer.name) == (64, "adam")
    assert (plain.batch_size, plain.optimizer.name) == (128, "sgd")
    assert store.load("trial_schema.yaml").node.batch_size != 12345


@pytest.mark.parametrize("url, shown", [
    ("postgresql://alice:s3cret@db.example:5432/mlflow", "postgresql://alice:***@db.example:5432/mlflow"),
    ("http://alice:p@ss@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),  # an '@' in the password
    ("mysql+pymysql://u:p%40ss@h/d", "mysql+pymysql://u:***@h/d"),
    ("http://u:p@[::1]:99/x", "http://u:***@[::1]:99/x"),
    ("postgresql://bob@db/x", "postgresql://bob@db/x"),  # a user, no password
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("file:///runs@2026/mlruns", "file:///runs@2026/mlruns"),
    ("http://host:5000/runs@2026", "http://host:5000/runs@2026"),  # an '@' in the path, after the port
    ("mlflow.tracking_uri=http\\://u\\:pw@h\\:5000", "mlflow.tracking_uri=http\\://u\\:***@h\\:5000"),  # a Hydra override
])
def test_a_urls_password_is_hidden_where_the_tool_prints_or_records_it(url, shown):
    from scaling.config import ConfigError, redact_url

    assert redact_url(url) == shown
    message = str(ConfigError("mlflow.tracking_uri", url, "tracking server unreachable"))
    assert message == f"mlflow.tracking_uri={shown!r}: tracking server unreachable"
