"""Grid points that train exactly what an earlier point trains ("twins"): run once, recorded twice.

A Cartesian grid can name one training twice. Below scaling.ref_batch_size a `ref` warmup has
nothing to ramp (scaling.config.warmup_start_lr: it starts at the trained LR), so with a constant
schedule `warmup.epochs=0` and `0.5` train the same trial; in the default study that is every
point at batch 16 and 64 with warmup 0.5, 32 of its 128. At scaling.ref_batch_size every rule
gives the same LR, so the rules' points there are twins too. A twin is not sent to Tune: its
MLflow run is written from its source's results, call for call (MirroringRecorder), under its
own params, and tagged `trial.same_as` (the derived.* params and Tune's trial id stay the
source's alone). The study's samples/trained counts only what ran; samples/full_grid still
counts every point, so the saving shows in samples/fraction.

What makes two points the same training is the resolved trial config with the LR's *labels*
(`lr`, `lr_multiplier`, `scaling.*`) replaced by the LR trained, and the warmup by what it does:
nothing, when it is flat (or zero epochs) in front of a constant schedule; else its length and
start LR (the main schedule starts after the warmup, so even a flat one shifts a decay). A study
resolves `scaling.ref_lr=auto` (one range test) before it looks for twins; a config that still says
`auto`, or trains from a range test at its own batch size (`schedule.from_lr_find`, where the LR is
that test's peak x lr_multiplier whatever the rule), is never a twin.
"""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace
from typing import Any, Optional

from scaling.config import effective_lr, warmup_start_lr

SAME_AS_TAG = "trial.same_as"


def training_key(config: dict) -> Optional[str]:
    """Return a key equal for two resolved trial configs that train the same thing (None: never a twin)."""
    if config["scaling"]["ref_lr"] == "auto" or config["schedule"].get("from_lr_find"):
        return None
    # the keys effective_lr and warmup_start_lr read: a DictConfig of a whole config costs ~30 ms
    cfg = SimpleNamespace(lr=config["lr"], lr_multiplier=config["lr_multiplier"], batch_size=config["batch_size"],
                          scaling=SimpleNamespace(**config["scaling"]), warmup=SimpleNamespace(**config["warmup"]))
    lr, start = effective_lr(cfg), warmup_start_lr(cfg)
    warmup = dict(config["warmup"])
    flat = float(warmup["epochs"]) == 0 or start >= lr
    key = copy.deepcopy(config)
    for label in ("lr", "lr_multiplier", "scaling", "warmup"):
        key.pop(label, None)
    key["trained_lr"] = repr(lr)
    key["warmup"] = None if flat and config["schedule"]["name"] == "constant" else \
        {"epochs": float(warmup["epochs"]), "start_lr": repr(start if not flat else lr)}
    return json.dumps(key, sort_keys=True, default=str)


def find_twins(configs: dict[int, dict]) -> dict[int, int]:
    """Return {twin index: source index}: each point whose training an earlier point (in index order) trains."""
    first: dict[str, int] = {}
    twins: dict[int, int] = {}
    for i in sorted(configs):
        key = training_key(configs[i])
        if key is None:
            continue
        if key in first:
            twins[i] = first[key]
        else:
            first[key] = i
    return twins


class MirroringRecorder:
    """A study recorder whose `trial_*` calls for a source trial are repeated for its twins.

    Everything else (status, best, logged_samples, ...) is the recorder's own. `mirrored` holds the
    twins written this way, which the study leaves out of samples/trained.
    """

    def __init__(self, recorder: Any, twins: dict[int, int], specs: dict[int, Any]):
        self.recorder = recorder
        self.specs = specs
        self.of: dict[int, list[int]] = {}
        for twin, source in sorted(twins.items()):
            self.of.setdefault(source, []).append(twin)
        self.mirrored = set(twins)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("recorder", "specs", "of", "mirrored"):
            raise AttributeError(name)  # unpickling (Ray may pickle callbacks) asks before __dict__ is set
        attr = getattr(self.recorder, name)
        if not name.startswith("trial_") or not callable(attr):
            return attr

        def both(index: int, *args: Any, **kwargs: Any) -> Any:
            out = attr(index, *args, **kwargs)
            for twin in self.of.get(index, ()):
                if name == "trial_params":  # derived values (warmup steps, ...) are the source's config's
                    continue
                if name == "trial_started":  # the twin's own config (its params), and where its values come from
                    source = self.specs[index]
                    attr(twin, self.specs[twin].config,
                         {SAME_AS_TAG: " ".join(source.overrides), f"{SAME_AS_TAG}_index": str(index)},
                         self.specs[twin].axes)
                else:
                    attr(twin, *args, **kwargs)
            return out

        return both


def whole_strata(twins: dict[int, int], stratum: dict[int, Any]) -> dict[int, int]:
    """Return the twins whose whole ASHA stratum is, trial for trial, the twin of one other stratum.

    ASHA judges a trial against its stratum. A twin alone among others (at the reference batch
    size, or where two rules' LR grids overlap) would carry its source's fate, decided among
    another stratum's trials; it runs itself. A stratum that is all twins of one stratum (a flat
    warmup's) sees the same values as its source and comes to the same decisions.
    """
    members: dict[Any, list[int]] = {}
    for i in sorted(stratum):
        members.setdefault(stratum[i], []).append(i)
    kept = {}
    for trials in members.values():
        sources = {twins.get(i) for i in trials}
        if None in sources or len(sources) != len(trials) or len({stratum[s] for s in sources}) != 1:
            continue
        if len(members[stratum[next(iter(sources))]]) == len(trials):
            kept.update({i: twins[i] for i in trials})
    return kept


def mirror_twins(recorder: Any, twins: dict[int, int], specs: dict[int, Any]) -> Any:
    """Return the study's recorder, mirroring to each unfinished twin its unfinished source's records.

    A twin whose source an earlier attempt finished before the twin (a driver killed between the
    two records) runs itself."""
    finished = recorder.finished_indices()
    mirrored = {t: s for t, s in twins.items() if t not in finished and s not in finished}
    if not mirrored:
        return recorder
    print(f"{len(mirrored)} of {len(specs)} trials train what another trial trains (e.g. a flat warmup): "
          f"each pair runs once, recorded for both (tag {SAME_AS_TAG})", flush=True)
    return MirroringRecorder(recorder, mirrored, specs)
