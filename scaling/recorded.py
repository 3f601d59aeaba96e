"""What a run records of its config: the params, the run's name and `config.yaml`.

The study driver records every trial from its plain resolved config (a dict, as the trials get
it), so nothing here needs a DictConfig: building one from a trial's ~80 keys takes ~5 ms of
CPU, and OmegaConf.to_yaml builds another. Both ran for every trial on the driver's recording
thread, on cores the trials fill (benchmarks/README.md, row 4).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Optional

from scaling.config import effective_lr, lr_exponent, lr_from_range_test, redact_url
from scaling.grid import bare_key


def as_attributes(cfg: Any) -> Any:
    """Return `cfg` for attribute access (cfg.scaling.rule): a plain nested dict as a namespace, a
    DictConfig as it is. The namespace is a read-only use's view, built in microseconds."""
    if not isinstance(cfg, dict):
        return cfg
    return SimpleNamespace(**{k: as_attributes(v) if isinstance(v, dict) else v for k, v in cfg.items()})


def config_yaml(config: dict) -> str:
    """Return a plain config as OmegaConf.to_yaml writes it (OmegaConf.load reads it back the same).

    to_yaml turns its argument into a DictConfig and back, then dumps it with PyYAML's pure-Python
    emitter: ~10 ms of CPU for a trial's config. OmegaConf's own dumper on libyaml's emitter writes
    the same text in ~1 ms (a micro-benchmark; tests/test_recorded.py checks the text).
    """
    import yaml

    dumper = _omegaconf_dumper()
    if dumper is None:  # other OmegaConf internals: its own path
        from omegaconf import OmegaConf

        return OmegaConf.to_yaml(config)
    return yaml.dump(config, Dumper=dumper, default_flow_style=False, allow_unicode=True, sort_keys=False)


@functools.lru_cache(maxsize=None)
def _omegaconf_dumper() -> Optional[type]:
    """OmegaConf's YAML dumper (it quotes the strings OmegaConf would read as numbers or booleans) on
    libyaml's C emitter where PyYAML has one; None where OmegaConf has no such dumper."""
    import yaml

    try:
        from omegaconf._utils import get_omega_conf_dumper
    except ImportError:
        return None
    base = get_omega_conf_dumper()
    if not getattr(yaml, "__with_libyaml__", False):
        return base

    class Dumper(yaml.CDumper):  # yaml.Dumper's Representer and Resolver, libyaml's emitter
        pass

    for kind, represent in base.yaml_representers.items():
        Dumper.add_representer(kind, represent)
    return Dumper


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Return a nested mapping as {"a.b": value} (lists kept as their string form)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolved_container(cfg: Any) -> dict:
    """Return the config as a plain resolved dict (accepts DictConfig or dict)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def recorded_config(cfg: Any) -> dict:
    """Return the resolved config as runs record it (params, config.yaml): the tracking URI's password hidden."""
    out = resolved_container(cfg)
    if isinstance(out.get("mlflow"), dict) and "tracking_uri" in out["mlflow"]:
        out["mlflow"] = {**out["mlflow"], "tracking_uri": redact_url(out["mlflow"]["tracking_uri"])}
    return out


LAST_TRIAL_PARAM = "lr.rule_bypassed"


def param_values(values: dict[str, Any]) -> dict[str, str]:
    """Return flat values as MLflow params (None as "null")."""
    return {k: "null" if v is None else str(v) for k, v in values.items()}


def config_params(cfg: Any) -> dict[str, str]:
    """Return every resolved config value as an MLflow param, as runs record them (recorded_config)."""
    return param_values(flatten(recorded_config(cfg)))


def trial_params(cfg: Any, ref_lr: Optional[float] = None) -> dict[str, str]:
    """Return every resolved config value plus the derived LR values, as MLflow params (cfg: a
    DictConfig or a plain resolved dict)."""
    params = config_params(cfg)
    cfg = as_attributes(cfg)
    if ref_lr is not None or not lr_from_range_test(cfg):  # else the trial's own test gives it (lr_params)
        params.update(lr_params(cfg, ref_lr))
    params["lr.rule_exponent"] = repr(lr_exponent(cfg.scaling.rule))
    params[LAST_TRIAL_PARAM] = str(cfg.lr is not None)  # last: log_params writes in order, so its presence
    return params                                        # marks a trial run whose params all landed


def lr_params(cfg: Any, ref_lr: Optional[float] = None) -> dict[str, str]:
    """Return the params lr.effective (the LR trained) and lr.base (the reference LR the rule scales)."""
    cfg = as_attributes(cfg)
    base = repr(float(ref_lr if ref_lr is not None else cfg.scaling.ref_lr)) \
        if cfg.scaling.ref_lr != "auto" or ref_lr is not None else "auto"
    return {"lr.effective": repr(effective_lr(cfg, ref_lr)), "lr.base": base}


# the keys a run's name always shows (trial_run_name); other swept axes are added to it
NAMED_KEYS = {"batch_size", "lr", "lr_multiplier", "scaling.rule", "micro_batch_size", "warmup.epochs", "seed"}


def trial_run_name(cfg: Any, axes: Optional[dict[str, Any]] = None) -> str:
    """Return a readable run name, e.g. `bs=128 lr×2 sqrt warmup=2 s0` (cfg: a DictConfig or a plain dict),
    with the grid's other axes, e.g. `bs=128 lr×2 sqrt optimizer=adam width=64 s0`: without them the
    trials of an optimizer, schedule or model sweep share their names in the MLflow UI."""
    cfg = as_attributes(cfg)
    lr = f"lr={cfg.lr:g}" if cfg.lr is not None else f"lr×{cfg.lr_multiplier:g} {cfg.scaling.rule}"
    parts = [f"bs={cfg.batch_size}", lr]
    if cfg.micro_batch_size and cfg.micro_batch_size != cfg.batch_size:
        parts.append(f"mb={cfg.micro_batch_size}")
    swept = {bare_key(key): value for key, value in (axes or {}).items()}
    if cfg.warmup.epochs or "warmup.epochs" in swept:  # a warmup axis names its 0 too: `warmup=0` beside `warmup=0.5`
        parts.append(f"warmup={cfg.warmup.epochs:g}")
    for key, value in swept.items():
        if key not in NAMED_KEYS:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(parts + [f"s{cfg.seed}"])
