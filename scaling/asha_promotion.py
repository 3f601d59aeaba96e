"""Promotion-based ASHA (Li et al. 2020, Algorithm 2), stratified: a trial waits at a rung until
it has earned the next one.

`StratifiedASHA` is the stopping-based variant Ray Tune implements: a trial reaching a rung is
judged at once against the values recorded there before it, so the first arrivals always go on
(among 8 LRs about H(8) ~ 2.7 are each the best so far). Promotion-based ASHA pauses a trial at
a rung instead (Tune's PAUSE: the rung's report carries a checkpoint, and the trial's worker is
handed to another trial), and resumes it once it ranks in the top floor(n / rf) of the n trials
recorded at that rung. Promotions go before new trials, highest rung first, as in the paper.

A study's grid is finite, where the paper's stream of configurations is not, so two rules close a
stratum once every one of its trials is paused or ended (none pending or running):
- if none of its trials has finished its budget, the best trial waiting at the highest rung goes on
  (so each stratum runs at least one trial to max_t, as `StratifiedASHA` guarantees);
- otherwise the trials still waiting are stopped (`pruned`).
A trial judged at a rung goes on at once when the first rule would pick it anyway, so the last
trial of a stratum is not paused only to be resumed.

A trial that diverges (or fails) after it was promoted does not keep its place: the ranking at
each rung leaves out trials that ended badly, so the next best one moves into the top floor(n / rf)
and is resumed. At a rung a lead that ends in divergence is common for the largest LRs (the
benchmark's batch 1024: lr x4 leads at 0.3 epoch and diverges at 0.5).

Pausing needs a checkpoint at every rung (the trainable saves one there whatever
checkpoint_interval_s says) and Tune's PAUSE, which its concurrency cap does not allow for: a
paused trial counts against `max_concurrent_trials` until it ends, so with the cap and every
running trial paused no trial would start again. The sweeper refuses that combination.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any, Dict, Iterable, Optional, Sequence

from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import TrialScheduler

from scaling.asha import Decision, Stratum, StratifiedASHA


class PromotingASHA(StratifiedASHA):
    """Asynchronous successive halving that pauses trials at rungs and promotes the best of each."""

    pauses_at_rungs = True  # its trials must checkpoint at every rung

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected: Counter = Counter()  # stratum -> trials this Tune run will hold
        self._added: Counter = Counter()  # stratum -> trials Tune has created
        self.promoted: dict[tuple[Stratum, float], set[str]] = defaultdict(set)  # (stratum, rung) -> trial ids
        self._seen: set[str] = set()  # trial ids Tune has added (a retry adds its trial again)
        self.completed: Counter = Counter()  # stratum -> trials that ended by themselves (their budget)
        self._done: set[str] = set()
        self.ended_badly: set[str] = set()  # failed, or bad in an earlier attempt (seeded): never ranked again
        self.waiting: dict[str, float] = {}  # paused trial id -> the rung it waits at
        self.paused_steps: dict[str, set[int]] = defaultdict(set)  # trial id -> steps it was paused at
        self.n_pauses = 0

    # ------------------------------------------------------------------ bookkeeping
    def expect(self, strata: Iterable[Stratum]) -> None:
        """Name the stratum of every trial the Tune run will create (Tune may create them lazily)."""
        self.expected.update(strata)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.trial_id in self._seen:  # Tune requeues a failed trial it retries: on_trial_error, then this
            self.ended_badly.discard(trial.trial_id)
            return
        self._seen.add(trial.trial_id)
        self._added[self._bracket_of(trial)[0]] += 1

    def _finished(self, stratum: Stratum, trial_id: str) -> None:
        if trial_id not in self._done:
            self._done.add(trial_id)
            self.completed[stratum] += 1

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: Dict) -> None:
        """A trial that ended by itself (its budget, or early stopping) counts as its stratum's finished one."""
        tid = trial.trial_id
        self.waiting.pop(tid, None)
        if not self._out(tid) and tid not in self.pruned_trial_ids:
            self._finished(self._bracket_of(trial)[0], tid)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.waiting.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        """A failed trial: out of the ranking, unless Tune retries it (on_trial_add then takes it back)."""
        self.ended_badly.add(trial.trial_id)
        self.waiting.pop(trial.trial_id, None)

    def seed(self, trial_id: str, config: Dict[str, Any], history: Sequence[tuple[float, float]],
             bad: bool = False, finished: bool = False) -> int:
        """Record a trial an earlier attempt finished (see StratifiedASHA.seed), and what it was granted:
        it went past every rung below the highest it was recorded at, and past all if it ended by itself."""
        n = super().seed(trial_id, config, history, bad=bad, finished=finished)
        stratum, bracket = self._bracket_for(trial_id, config)
        reached = [m for m, rec in bracket._rungs if trial_id in rec]
        top = math.inf if finished and not bad else max(reached, default=-math.inf)
        for m in reached:
            if m < top:
                self.promoted[stratum, m].add(trial_id)
        if bad:
            self.ended_badly.add(trial_id)
        elif finished:
            self._finished(stratum, trial_id)
        return n

    # ------------------------------------------------------------------ ranking
    def _out(self, trial_id: str) -> bool:
        """True for a trial that diverged or failed: never ranked again."""
        return trial_id in self.diverged_trial_ids or trial_id in self.ended_badly

    def _rungs_of(self, stratum: Stratum) -> list[tuple[float, dict]]:
        """Return the stratum's rungs, highest first, as (rung, {trial id: signed value})."""
        return self._brackets[stratum]._rungs if stratum in self._brackets else []

    def _earned(self, stratum: Stratum, rung: float, recorded: dict) -> list[str]:
        """Return the trials in the top floor(n / rf) at `rung` not promoted from it yet, best first
        (the trials that ended badly are left out of the ranking, so their places pass on)."""
        quota = int(len(recorded) // self._rf)
        ranked = sorted((t for t, v in recorded.items() if math.isfinite(v) and not self._out(t)),
                        key=lambda t: -recorded[t])
        return [t for t in ranked[:quota] if t not in self.promoted[stratum, rung]]

    def _best_waiting(self, stratum: Stratum, also: Optional[str] = None) -> Optional[str]:
        """Return the best trial waiting at the stratum's highest rung that has one (`also` counted
        as waiting), or None."""
        for rung, recorded in self._rungs_of(stratum):
            waiting = [t for t in recorded if (self.waiting.get(t) == rung or t == also)
                       and not self._out(t) and math.isfinite(recorded[t])]
            if waiting:
                return max(waiting, key=lambda t: recorded[t])
        return None

    def _quiet(self, stratum: Stratum, trials: Sequence[Trial], but: Optional[Trial] = None) -> bool:
        """True when every trial of the stratum exists and none (but `but`) is pending or running.

        A trial told to pause counts as paused while Tune still saves it, so the trial to resume is
        chosen (and staged) before the pausing one's worker is let go: Tune keeps a worker for reuse
        only while a trial is staged, and a fresh one costs a process start (~3 s on 2 cores; one of
        two benchmark runs took 5 s longer without this)."""
        if self._added[stratum] < self.expected[stratum]:
            return False
        return not any(t is not but and t.status in (Trial.PENDING, Trial.RUNNING) and t.trial_id not in self.waiting
                       and self._strata.get(t.trial_id) == stratum for t in trials)

    # ------------------------------------------------------------------ decisions
    def on_trial_result(self, tune_controller: Any, trial: Trial, result: Dict) -> str:
        """Return STOP, CONTINUE or PAUSE for one result (see _decide); a trial stopped by its budget or
        its last report counts as its stratum's finished one."""
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and trial.trial_id not in self.diverged_trial_ids:
            self._finished(self._strata[trial.trial_id], trial.trial_id)
        return action

    def _decide(self, tune_controller: Any, trial: Trial, result: Dict, stratum: Stratum, rung: Optional[float],
                t: float, value: float, action: str) -> str:
        """A trial judged at a rung goes on only if it earned it (or closes its stratum), else waits there."""
        tid = trial.trial_id
        if result.get("trial_status", "running") != "running":  # its last report: it ends whatever is said
            if rung is None:
                self._finished(stratum, tid)
                return action
            # judged on the report that ends it (a budget of whole steps can end past the last rung)
            self.decisions.append(Decision(tid, stratum, rung, t, value, "continue"))
            return TrialScheduler.STOP
        if rung is None:  # a retry from a checkpoint below a rung it waits at waits there again
            unearned = self._unearned_rung(stratum, tid, t)
            return action if unearned is None else self._pause(tid, unearned, result)
        rungs = self._rungs_of(stratum)
        for lower, recorded in rungs:  # a report past several rungs went past the lower ones
            if lower < rung and tid in recorded:
                self.promoted[stratum, lower].add(tid)
        goes_on = tid in self._earned(stratum, rung, dict(rungs)[rung]) or (
            self.completed[stratum] == 0 and self._quiet(stratum, tune_controller.get_trials(), but=trial)
            and self._best_waiting(stratum, also=tid) == tid)
        self.decisions.append(Decision(tid, stratum, rung, t, value, "continue" if goes_on else "pause"))
        if goes_on:
            self.promoted[stratum, rung].add(tid)
            return TrialScheduler.CONTINUE
        return self._pause(tid, rung, result)

    def _pause(self, tid: str, rung: float, result: Dict) -> str:
        self.waiting[tid] = rung
        self.paused_steps[tid].add(int(result.get("step", -1)))
        self.n_pauses += 1
        return TrialScheduler.PAUSE

    def _unearned_rung(self, stratum: Stratum, tid: str, t: Any) -> Optional[float]:
        """Return the lowest rung at or below `t` that holds the trial's value but never promoted it."""
        if t is None:
            return None
        for rung, recorded in reversed(self._rungs_of(stratum)):  # ascending
            if rung <= t and tid in recorded and tid not in self.promoted[stratum, rung]:
                return rung
        return None

    def choose_trial_to_run(self, tune_controller: Any) -> Optional[Trial]:
        """Return a paused trial that earned its next rung (highest rung first), else, in a stratum
        with nothing left to run, its best waiting trial or none (stopping the rest), else a new one."""
        trials = tune_controller.get_trials()
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED and t.trial_id in self.waiting}
        if paused:
            for stratum in list(self._brackets):
                for rung, recorded in self._rungs_of(stratum):
                    earned = [t for t in self._earned(stratum, rung, recorded)
                              if t in paused and self.waiting[t] == rung]
                    if earned:
                        return self._resume(paused[earned[0]], stratum, rung)
            saving = {t.trial_id for t in trials if t.status == Trial.RUNNING and t.trial_id in self.waiting}
            for stratum in list(self._brackets):
                if not any(self._strata.get(t) == stratum for t in paused) or not self._quiet(stratum, trials):
                    continue
                best = self._best_waiting(stratum) if self.completed[stratum] == 0 else None
                if best is not None:
                    if best in paused:  # else it is still being saved: resumed once it is paused
                        return self._resume(paused[best], stratum, self.waiting[best])
                elif not any(self._strata.get(t) == stratum for t in saving):
                    self._stop_waiting(tune_controller, stratum, paused)
        if not any(t.status == Trial.PENDING for t in trials):
            return None  # FIFOScheduler's fallback would resume any paused trial: here only a promotion does
        return super().choose_trial_to_run(tune_controller)

    def _resume(self, trial: Trial, stratum: Stratum, rung: float) -> Trial:
        self.promoted[stratum, rung].add(trial.trial_id)
        del self.waiting[trial.trial_id]
        self.decisions.append(Decision(trial.trial_id, stratum, rung, None, math.nan, "resume"))
        return trial

    def _stop_waiting(self, tune_controller: Any, stratum: Stratum, paused: dict[str, Trial]) -> None:
        """Stop the stratum's waiting trials: its budget went to better ones (status `pruned`)."""
        for tid, trial in list(paused.items()):
            if self._strata.get(tid) != stratum:
                continue
            rung = self.waiting.pop(tid)
            self.pruned_trial_ids.add(tid)
            self.decisions.append(Decision(tid, stratum, rung, None, math.nan, "stop"))
            tune_controller.stop_trial(trial)

    def debug_string(self) -> str:
        return super().debug_string().replace("StratifiedASHA", "PromotingASHA", 1) + (
            f"\n  paused {self.n_pauses} times; waiting now {len(self.waiting)}")
