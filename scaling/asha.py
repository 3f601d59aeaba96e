"""Batch-size-stratified ASHA: successive halving whose promotions are decided within a stratum.

In a batch-size x LR study, plain ASHA ranks every trial at a rung against every other one.
Large batches are worse early per sample seen, so plain ASHA prunes a whole batch size before
its best LR had the budget to win. Here each stratum (by default: every swept axis except the
LR multiplier, `lr` and `seed`) keeps its own rungs, so an LR competes only with LRs of the
same batch size (and rule, warmup, ...).

Reused from Ray Tune's `async_hyperband._Bracket` (one per stratum): `on_result`, i.e. a trial
is judged once per rung, at its first report whose time >= the rung (so evaluations every 0.5
epoch and a rung at 1.33 work; one report past several rungs is judged at the highest), and
stopped when its value is below the rung's (1 - 1/rf) percentile of the values recorded there
before it. Changed, and why:
- rungs are grace_period * rf**k < max_t, floats: Ray's `int(log(max_t/min_t)/log(rf)) + 1`
  rounds either way (max_t=9, rf=3 gives a useless rung at 9 = max_t, where the trial stops
  anyway; max_t=1000, rf=10 does not, as log(1000)/log(10) = 2.9999999999999996);
- NaN/inf values and trial_status diverged/oom/error stop the trial at once and are recorded
  as -inf (the worst value), never skipped: Ray lets a NaN trial continue;
- `cutoff` survives -inf: linear interpolation next to -inf gives NaN or -inf, and then the
  nearest recorded value above is the cutoff (so a diverged trial never becomes it);
- `on_trial_complete` records nothing: every result already went through `on_trial_result`,
  and Ray's re-recording could file a later, better value under an earlier rung.

Which trial starts next (`choose_trial_to_run`): the pending trial whose LR multiplier is
closest to the scaling rule's prediction (smallest |log lr_multiplier|), strata interleaved,
Tune's order (the study's seeded shuffle) breaking ties. Async ASHA always promotes the first
trial to reach a rung in its stratum and judges later ones only against those before them, so
the first arrivals should be the LRs the study exists to test: the rule's own LR is then the
first arrival of its stratum and runs the full budget (unless it diverges), and every other LR
must beat it to go on. Short-horizon bias is why this matters: at an early rung a too-large LR
often leads and diverges later (benchmark, batch 1024: lr x4 leads up to 0.4 epoch, then ends
at 2.4 against lr x1's 1.76); in a random order it could arrive first and be the only one kept.
Ordering only chooses which pending trial gets a free slot, so it never prunes anything.
Limits: Tune asks the scheduler for one trial per scheduling pass, and fills the other slots
freed in that pass (at start-up, or when trials end together) in its own list order; with
max_concurrent_trials it creates one trial at a time, so the list order is all there is. The
caller's trial list in the same order would close both gaps.

Why a stratum is never pruned whole: a trial is stopped by this scheduler only when it is
judged at a rung (which records its value), when it diverges, or at max_t. Take a stratum and
the highest rung k at which any of its trials was judged, and let t* be the trial with the
largest value recorded at k (the first of equals). When t* was judged, every value recorded
at k before it was <= its own, and the cutoff, a percentile of those values (linear, or the
nearest recorded value above), is <= their maximum, so t* got CONTINUE. No trial of the
stratum is ever judged above k, so nothing stops t* before max_t unless it diverges. If no
trial was ever judged, none was pruned. Hence each stratum runs at least one trial to max_t.
"""
from __future__ import annotations

import math
import numbers
import pickle
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.result import DEFAULT_METRIC
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

BAD_STATUSES = ("diverged", "oom", "error")
# Axes that are the LR under study or a replicate, never a stratum; matched on the last part.
NON_STRATUM_KEYS = frozenset({"lr_multiplier", "lr", "seed"})
Stratum = tuple  # ((key, value), ...) in group_by order; () when unstratified


def get_dotted(config: Dict[str, Any], key: str, default: Any = None) -> Any:
    """Return config["a"]["b"] for key "a.b", or config["a"]["b.c"] for "a.b.c" (a key held flat at any
    level, as a trial's grid point holds its axes), else default."""
    if key in config:
        return config[key]
    head, _, rest = key.partition(".")
    if rest and isinstance(config.get(head), dict):
        return get_dotted(config[head], rest, default)
    return default


def rung_levels(grace_period: float, max_t: float, reduction_factor: float) -> list[float]:
    """Return the rungs grace_period * rf**k that lie strictly below max_t, ascending."""
    rungs, k = [], 0
    while grace_period * reduction_factor**k < max_t * (1 - 1e-9):
        # to 12 digits: 0.1 * 3 is 0.30000000000000004, above the 0.3 a trial reports after 0.3 epoch
        # (step * B / n_train, correctly rounded), so the rung fell on the evaluation after it
        rungs.append(float(f"{grace_period * reduction_factor**k:.12g}"))
        k += 1
    return rungs


@dataclass(frozen=True)
class Decision:
    """One judgement: at a rung (reason "rung") or on a non-finite/failed result ("diverged")."""

    trial_id: str
    stratum: Stratum
    rung: Optional[float]  # None: the trial diverged before its first rung
    time: Optional[float]  # the time_attr of the report judged (>= rung)
    value: float  # the metric as reported (NaN/inf kept as is)
    action: str  # "continue" | "stop"
    reason: str = "rung"


class _StratumBracket(_Bracket):
    """Ray's bracket with explicit float rungs and a cutoff that tolerates -inf."""

    def __init__(self, rungs: Sequence[float], reduction_factor: float):
        self.rf = reduction_factor
        self._rungs = [(float(r), {}) for r in sorted(rungs, reverse=True)]  # Ray keeps them descending
        self._stop_last_trials = True

    def cutoff(self, recorded: Dict[str, float]) -> Optional[float]:
        """Return the value a trial must reach to continue, or None when nothing is recorded."""
        if not recorded:
            return None
        values, q = list(recorded.values()), (1 - 1 / self.rf) * 100
        with np.errstate(invalid="ignore"):
            cut = float(np.percentile(values, q))
        if not math.isfinite(cut):  # interpolating towards -inf: take the recorded value above
            cut = float(np.percentile(values, q, method="higher"))
        return min(cut, max(values))  # never above the best so far, whatever the rounding


@dataclass(frozen=True)
class _Seeded:
    """What `_Bracket.on_result` reads of a trial (its id), for a trial of an earlier attempt."""

    trial_id: str


class StratifiedASHA(FIFOScheduler):
    """Asynchronous successive halving with one set of rungs per stratum of the grid."""

    pauses_at_rungs = False  # it stops or continues; scaling.asha_promotion pauses

    def __init__(
        self,
        metric: Optional[str] = None,
        mode: Optional[str] = None,
        time_attr: str = "epoch",
        max_t: float = 10.0,
        grace_period: float = 1.0,
        reduction_factor: float = 3,
        group_by: Optional[list[str]] = None,
        axes: Optional[list[str]] = None,
        stratified: bool = True,
    ):
        if not 0 < grace_period <= max_t:
            raise ValueError(f"need 0 < grace_period ({grace_period}) <= max_t ({max_t})")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        super().__init__()
        self._metric, self._mode, self._time_attr = metric, mode, time_attr
        self._max_t, self._rf = float(max_t), float(reduction_factor)
        self.rungs = rung_levels(grace_period, max_t, reduction_factor)
        if not stratified:
            self.group_by: list[str] = []
        elif group_by is not None:
            self.group_by = list(group_by)
        elif axes is not None:
            self.group_by = [a for a in axes if a.split(".")[-1] not in NON_STRATUM_KEYS]
        else:  # no grid given: batch size is the one axis that must never be pruned whole
            self.group_by = ["batch_size"]
        # the LR-multiplier axis: trials start nearest to the rule's prediction (1) first
        self.lr_key = next((a for a in axes or [] if a.split(".")[-1] == "lr_multiplier"), None)
        self._brackets: dict[Stratum, _StratumBracket] = {}
        self._strata: dict[str, Stratum] = {}  # trial_id -> stratum
        self.decisions: list[Decision] = []
        self.pruned_trial_ids: set[str] = set()  # stopped at a rung: label "pruned"
        self.diverged_trial_ids: set[str] = set()  # stopped on NaN/inf/bad trial_status

    @property
    def _metric_op(self) -> Optional[float]:
        return {"max": 1.0, "min": -1.0}.get(self._mode or "")

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        """Return False if metric/mode were already set here (Tune then reports the conflict)."""
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric, self._mode = metric or self._metric, mode or self._mode
        if self._metric is None and self._mode:
            self._metric = DEFAULT_METRIC
        return True

    def stratum_of(self, config: Dict[str, Any]) -> Stratum:
        """Return the stratum key of a trial config: ((key, value), ...) over group_by."""
        def hashable(v: Any) -> Any:
            return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
        return tuple((k, hashable(get_dotted(config, k))) for k in self.group_by)

    def _bracket_of(self, trial: Trial) -> tuple[Stratum, _StratumBracket]:
        return self._bracket_for(trial.trial_id, trial.config)

    def _bracket_for(self, trial_id: str, config: Dict[str, Any]) -> tuple[Stratum, _StratumBracket]:
        if trial_id not in self._strata:  # e.g. a trial restored without on_trial_add
            self._strata[trial_id] = self.stratum_of(config)
        stratum = self._strata[trial_id]
        if stratum not in self._brackets:
            self._brackets[stratum] = _StratumBracket(self.rungs, self._rf)
        return stratum, self._brackets[stratum]

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        if not self._metric or not self._metric_op:
            raise ValueError(
                f"{type(self).__name__} needs a `metric` ({self._metric}) and a `mode` "
                f"({self._mode}): pass them here or to tune.TuneConfig()")
        self._bracket_of(trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Optional[Trial]:
        """Return the pending trial nearest the rule's LR, from the least-started stratum on ties."""
        trials = tune_controller.get_trials()
        pending = [(i, t) for i, t in enumerate(trials) if t.status == Trial.PENDING]
        if not pending or self.lr_key is None:
            return super().choose_trial_to_run(tune_controller)
        started = Counter(self._bracket_of(t)[0] for t in trials if t.status != Trial.PENDING)
        return min(pending, key=lambda it: (self.lr_distance(it[1].config), started[self._bracket_of(it[1])[0]],
                                            it[0]))[1]

    def lr_distance(self, config: Dict[str, Any]) -> float:
        """Return |log lr_multiplier| (0 at the rule's prediction; 0 for all without that axis); inf when
        it is not a positive number."""
        if self.lr_key is None:
            return 0.0
        try:
            m = float(get_dotted(config, self.lr_key))
        except (TypeError, ValueError):
            return math.inf
        return round(abs(math.log(m)), 9) if m > 0 else math.inf  # rounded: 0.5 and 2 tie exactly

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: Dict) -> str:
        """Return STOP or CONTINUE for one reported result, logging rung judgements."""
        t, raw = result.get(self._time_attr), result.get(self._metric)
        raw = float(raw) if isinstance(raw, numbers.Real) else None
        bad = result.get("trial_status") in BAD_STATUSES or (raw is not None and not math.isfinite(raw))
        stratum, bracket = self._bracket_of(trial)
        value = math.nan if raw is None else raw
        if bad:  # stop whatever the bracket says; -inf makes it the worst at the rung it crossed
            rung = self._judge(bracket, trial, t, -math.inf)[0] if t is not None else None
            self.diverged_trial_ids.add(trial.trial_id)
            self.decisions.append(Decision(trial.trial_id, stratum, rung, t, value, "stop", "diverged"))
            return TrialScheduler.STOP
        if t is None or raw is None:
            return TrialScheduler.CONTINUE  # nothing to judge (as Ray does)
        if t >= self._max_t:
            return TrialScheduler.STOP  # full budget spent: done, not pruned
        rung, action = self._judge(bracket, trial, t, self._metric_op * raw)
        return self._decide(tune_controller, trial, result, stratum, rung, t, value, action)

    def _decide(self, tune_controller: Any, trial: Trial, result: Dict, stratum: Stratum, rung: Optional[float],
                t: float, value: float, action: str) -> str:
        """Return the verdict on a result that recorded the trial at `rung` (None: it crossed no new
        rung), given the bracket's `action`, logging a rung judgement. Here: the bracket's (stopping-based
        ASHA); scaling.asha_promotion decides otherwise."""
        if rung is not None:
            stop = action == TrialScheduler.STOP
            if stop:
                self.pruned_trial_ids.add(trial.trial_id)
            self.decisions.append(
                Decision(trial.trial_id, stratum, rung, t, value, "stop" if stop else "continue"))
        return action

    @staticmethod
    def _judge(bracket: _StratumBracket, trial: Trial, t: float, value: float) -> tuple[Optional[float], str]:
        """Return (the rung this result was judged at, or None; Ray's bracket decision)."""
        before = {m for m, rec in bracket._rungs if trial.trial_id in rec}
        action = bracket.on_result(trial, t, value)
        judged = [m for m, rec in bracket._rungs if trial.trial_id in rec and m not in before]
        return (judged[0] if judged else None), action

    def seed(self, trial_id: str, config: Dict[str, Any], history: Sequence[tuple[float, float]],
             bad: bool = False, finished: bool = False) -> int:
        """Record, at the rungs it reached, a trial that an earlier attempt of the study finished.

        A resumed study is a fresh Tune run over the unfinished trials, so without this its rungs
        start empty: the first trial of each stratum to reach a rung again goes on whatever the
        finished ones scored there, and ASHA prunes less than the uninterrupted study would have.
        `history` is the trial's evaluations in order, as (time_attr, metric); each is replayed
        through the bracket as the trial's reports were (the first one at or past each rung is
        the one recorded). A non-finite value, or the last one when `bad` (the trial ended
        diverged, oom or error), is recorded as -inf, as `on_trial_result` did. Nothing is
        decided (`finished`, whether it ended by itself, is for the promotion variant). Return the
        number of rung values recorded.
        """
        _, bracket = self._bracket_for(trial_id, config)
        ref = _Seeded(trial_id)
        for n, (t, raw) in enumerate(history):
            worst = not math.isfinite(raw) or (bad and n == len(history) - 1)
            bracket.on_result(ref, t, -math.inf if worst else self._metric_op * raw)
            if worst:
                break
        return sum(trial_id in rec for _, rec in bracket._rungs)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: Dict) -> None:
        pass  # the final result was already judged by on_trial_result

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        pass  # keep the stratum: decisions and rung records outlive the trial

    def debug_string(self) -> str:
        """Return one line per stratum with the current cutoff at each rung."""
        by = "by " + ",".join(self.group_by) if self.group_by else "unstratified"
        lines = [f"Using StratifiedASHA ({by}):"
                 f" rungs={[round(r, 4) for r in self.rungs]} pruned={len(self.pruned_trial_ids)}"
                 f" diverged={len(self.diverged_trial_ids)}"]
        for stratum, b in self._brackets.items():
            cuts = " | ".join(f"{m:.3g}: n={len(rec)} cut={b.cutoff(rec)}" for m, rec in reversed(b._rungs))
            lines.append(f"  {dict(stratum)}: {cuts}")
        return "\n".join(lines)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
