"""`StudySearcher`: the Ray Tune searcher that lets Optuna decide and Ray execute.

A thin adapter over the ask/tell conventions of `nas.study.SearchStudy`, shaped like Ray's stock
`ray.tune.search.optuna.OptunaSearch` (suggest = ask, on_trial_complete = tell), with the
differences a multi-objective, multi-fidelity, resumable architecture search needs:

* a sample that breaks a constraint: OptunaSearch launches and trains it; here it is rejected
  before launch (analytic cost), told FAIL with user attr `infeasible` and re-proposed, a bounded
  number of times, then a clear error;
* an early-stopped (ASHA) trial: OptunaSearch tells it COMPLETE with its last values, so a
  half-trained candidate can enter the front; here it is PRUNED with its `fidelity`;
* a crashed trial: FAIL with `fail_reason` from the trial's failure.json or Ray's error text;
* objectives: `val_acc` is reported by the trial, `gflops` and `params` come from the cost model
  (OptunaSearch only knows reported metrics);
* names: the Optuna trial number names the Tune trial and its folder `trials/NNNN`;
* resume: OptunaSearch pickles its in-memory study into Tune's state; here the persistent study
  is the truth, COMPLETE trials are never retrained and RUNNING ones of a dead driver continue
  under their own numbers;
* budget: `--trials` counts launched trials only (Tune's `num_samples` would count rejections);
* failures: the search stops after M failed trials in a row;
* promotion (`promotions`, the MOASHA scheduler): a trial the scheduler pauses at a rung stays
  RUNNING in the study; when the scheduler later promotes it, the searcher launches it again on
  its own folder, where it resumes from its checkpoint; trials still paused when the budget is
  spent and nothing runs are told PRUNED.

`TrialErrors` is a Tune callback that gives the searcher the error text of a failed trial (Tune
tells the searcher before its callbacks, but writes the trial's error file first).

Ray is imported when `StudySearcher` or `TrialErrors` is first looked up (the module's
`__getattr__` then puts Ray Tune's base classes under `_StudySearcher` / `_TrialErrors`, which
hold all the logic), so importing this module, or `summarize_error`, does not import Ray.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from nas import optuna_compat
from nas.study import Candidate, SearchStudy, read_failure_reason
from search_spaces.search_defaults import DEFAULT_MAX_CONSECUTIVE_FAILURES
from spvit.errors import ConfigError

logger = logging.getLogger(__name__)

MAX_REASON_CHARS = 500
# Tell retries: attempts and the first wait (doubled each time).
RECORD_ATTEMPTS = 4
RECORD_BACKOFF_S = 0.5
# Sentences of Ray's error dumps that say what happened to a trial's process, when the
# exception line alone does not (an actor error's first line is generic).
_RAY_CAUSES = ("never ran", "cancelled before it started", "node", "out of memory", "OOM",
               "killed", "unschedulable", "cannot be scheduled", "placement group",
               "exited unexpectedly", "SIGKILL", "SIGSEGV")
# What `suggest` returns once the search is over (Ray Tune's `Searcher.FINISHED`).
FINISHED = "FINISHED"


def summarize_error(text: str) -> str:
    """The telling line of a Python/Ray error dump: the last `...Error: ...` line, else the
    last non-empty one; for Ray's actor and task errors also the sentence that says what
    happened (the actor never ran, its node died, it ran out of memory)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    lines = [line for line in lines if not line.startswith("Failure # ")] or lines
    found = lines[-1]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            found = line
            break
    cause = next((line for line in lines if line != found
                  and any(word.lower() in line.lower() for word in _RAY_CAUSES)
                  and not line.startswith(("File ", "Traceback"))), None)
    if cause is not None and cause not in found:
        found = f"{found} ({cause})"
    return found[:MAX_REASON_CHARS]


class RecordFailed(RuntimeError):
    """A trial's result could not be written to the study, even after retries."""


class _TrialErrors:
    """Tune callback (`TrialErrors`, a `ray.tune.Callback`) that remembers each trial, so the
    error Tune wrote for a failed trial can be read when the searcher is told of the failure."""

    def __init__(self) -> None:
        self._trials: dict[str, Any] = {}

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        # Every trial, also those whose actor never starts (no on_trial_start for them).
        for trial in trials:
            self._trials[trial.trial_id] = trial

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trials[trial.trial_id] = trial

    def error_of(self, trial_id: str) -> str | None:
        trial = self._trials.get(trial_id)
        path = getattr(trial, "error_file", None) if trial is not None else None
        if not path:
            return None
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        return summarize_error(text) or None


class _StudySearcher:
    """Ray Tune searcher (`StudySearcher`, a `ray.tune.search.Searcher`) over a `SearchStudy`
    (see the module docstring).

    Args:
        study: the run's `SearchStudy` (owns the Optuna study, the space and the cost model).
        trials: the search's budget of launched trials (`--trials`); trials already counted in
            the study (finished or running) are deducted, constraint rejections are not counted.
        base_config: config keys every trial gets besides `arch` and `trial_dir`
            (`training`, `workers`, `use_gpu`).
        adopt: RUNNING trials of a dead driver to run again first, under their own numbers.
        max_consecutive_failures: stop proposing after this many failed trials in a row.
        error_lookup: returns Ray's error line for a Tune trial id (`TrialErrors.error_of`).
        clock: monotonic clock (seconds), injectable for tests.
        sleep: waits between attempts to record a result (injectable for tests).
        record_attempts: how often writing a trial's result to the study is tried (with
            doubling waits from `RECORD_BACKOFF_S`) before the search stops.
        promotions: the scheduler that pauses and promotes trials (`is_paused(key)`,
            `take_promotion(ready)`, keyed by trial folder; `launch.moasha.MOASHAScheduler`), or
            None.
    """

    def __init__(self, study: SearchStudy, *, trials: int, base_config: Mapping[str, Any],
                 adopt: Sequence[FrozenTrial] = (),
                 max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES,
                 error_lookup: Callable[[str], str | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 record_attempts: int = RECORD_ATTEMPTS,
                 promotions: Any = None) -> None:
        super().__init__(metric="val_acc", mode="max")
        if isinstance(max_consecutive_failures, bool) or not isinstance(
                max_consecutive_failures, int) or max_consecutive_failures < 1:
            raise ConfigError(f"max_consecutive_failures must be an integer >= 1, but got"
                              f" {max_consecutive_failures!r}. Pass e.g."
                              " --max-consecutive-failures 3.")
        self.study = study
        self.trials = trials
        self.base_config = dict(base_config)
        self.max_consecutive_failures = max_consecutive_failures
        self.error_lookup = error_lookup
        self.clock = clock
        self.sleep = sleep
        self.record_attempts = max(1, int(record_attempts))
        self._adopt = list(adopt)
        # Adopted trials are RUNNING in the study, so they are counted already.
        self._remaining = max(0, trials - study.counted_trials())
        self._live: dict[str, tuple[Candidate, float]] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self.launched: list[int] = []
        self.outcomes: Counter[str] = Counter()
        self.stop_reason: str | None = None
        self.error: ConfigError | None = None
        self.last_failure: str | None = None
        self.first_failure: str | None = None
        self.record_error: str | None = None
        self._record_attempted: dict[int, bool] = {}
        self.promotions = promotions
        # trial folder -> (paused candidate, its last metrics): waiting for a promotion
        self._paused: dict[str, tuple[Candidate, dict[str, Any]]] = {}
        self.resumed_promotions: list[int] = []

    # ------------------------------------------------------------------ Tune protocol
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        # Objectives are fixed by the study; Tune's metric/mode (if any) only drive schedulers.
        return True

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    @property
    def live_numbers(self) -> list[int]:
        return sorted(c.number for c, _ in self._live.values())

    @property
    def pending_adoptions(self) -> int:
        return len(self._adopt)

    @property
    def remaining(self) -> int:
        """New trials still to launch in this session."""
        return self._remaining

    @property
    def paused_numbers(self) -> list[int]:
        return sorted(c.number for c, _ in self._paused.values())

    def _key(self, candidate: Candidate) -> str:
        return candidate.config(self.study.run_dir)["trial_dir"]

    def _promotion(self) -> Candidate | None:
        if self.promotions is None or not self._paused:
            return None
        key = self.promotions.take_promotion(ready=self._paused.keys())
        if key is None:
            return None
        candidate, _ = self._paused.pop(key)
        self.resumed_promotions.append(candidate.number)
        return dataclasses.replace(candidate, resumed=True)

    def _finish_paused(self) -> None:
        """Tell every trial still paused PRUNED with the epochs it trained."""
        for key in list(self._paused):
            candidate, metrics = self._paused.pop(key)
            try:
                state = self._record(candidate, "the result of",
                                     lambda c=candidate, m=metrics: self.study.tell_result(c, m))
            except RecordFailed:
                return
            self.outcomes[state.name] += 1

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.stopped:
            return FINISHED
        try:
            candidate = self._promotion()
            while self._adopt and candidate is None:
                candidate = self.study.adopt(self._adopt.pop(0))
            if candidate is None:
                from nas.storage import study_mutex

                # The budget is the study's, shared by every driver on it: count and ask as
                # one step under the study's lock.
                with study_mutex(self.study.study, self.study.run_dir):
                    if self._remaining <= 0 or self.study.counted_trials() >= self.trials:
                        self._remaining = 0  # the budget is spent (by this or another driver)
                        if self._paused and self._live:
                            return None  # a running trial may still promote a paused one
                        self._finish_paused()
                        return FINISHED
                    candidate = self.study.ask()
                self._remaining -= 1
        except ConfigError as e:
            self.error = e
            self.stop_reason = str(e)
            return FINISHED
        self._live[trial_id] = (candidate, self.clock())
        self.launched.append(candidate.number)
        config = dict(self.base_config)
        config.update(candidate.config(self.study.run_dir))
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        entry = self._live.get(trial_id)
        if entry is None:
            return
        self._last[trial_id] = dict(result)
        try:
            self._record(entry[0], "an epoch of", lambda: self.study.record_epoch(entry[0],
                                                                                   result))
        except RecordFailed:
            return  # the search stops (stop_reason); the epoch is in metrics.jsonl

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return
        candidate, started = entry
        last = self._last.pop(trial_id, None)
        metrics = result if result else last
        wall_s = self.clock() - started
        fidelity = (metrics or {}).get("epoch")
        key = self._key(candidate)
        if (not error and metrics and self.promotions is not None
                and self.promotions.is_paused(key)):
            try:
                self._record(candidate, "the pause of", lambda: self.study.note_pause(
                    candidate, metrics, wall_s=wall_s))
            except RecordFailed:
                return
            self._paused[key] = (dataclasses.replace(candidate, resumed=True), dict(metrics))
            return
        try:
            state = self._record(candidate, "the result of",
                                 lambda: self._tell(trial_id, candidate, result, metrics,
                                                    error, fidelity, wall_s))
        except RecordFailed:
            return  # the trial stays RUNNING; --resume records it from its folder
        self.outcomes[state.name] += 1
        if state == TrialState.FAIL and self.first_failure is None:
            self.first_failure = self.last_failure
        if (state == TrialState.FAIL
                and self.study.consecutive_failures >= self.max_consecutive_failures):
            self.stop_reason = (
                f"{self.study.consecutive_failures} trials failed in a row (last:"
                f" {self.last_failure})")

    def _tell(self, trial_id: str, candidate: Candidate, result: dict | None,
              metrics: dict | None, error: bool, fidelity: Any, wall_s: float) -> TrialState:
        if self._record_attempted.get(candidate.number):
            # A retry: an earlier attempt may have reached the study before it failed.
            storage = optuna_compat.study_storage(self.study.study)
            stored = storage.get_trial(candidate.trial_id).state
            if stored.is_finished():
                return stored
        self._record_attempted[candidate.number] = True
        if result:
            # Tune skips on_trial_result for the result on which a scheduler stops a trial.
            self.study.record_epoch(candidate, result)
        if error:
            reason = self._failure_reason(trial_id, candidate)
            state = self.study.tell_fail(candidate, reason, fidelity=fidelity, wall_s=wall_s)
            self.last_failure = f"trial {candidate.number}: {reason}"
        elif not metrics:
            reason = "stopped before it reported an epoch"
            state = self.study.tell_fail(candidate, reason, wall_s=wall_s)
            self.last_failure = f"trial {candidate.number}: {reason}"
        elif (written := read_failure_reason(self.study.run_dir / candidate.trial_dir)):
            # The trial wrote why it failed but returned normally (e.g. a diverged loss
            # that must not use up Ray's retries): a failure all the same, never PRUNED.
            state = self.study.tell_fail(candidate, written, fidelity=fidelity, wall_s=wall_s)
            self.last_failure = f"trial {candidate.number}: {written}"
        else:
            state = self.study.tell_result(candidate, metrics, wall_s=wall_s)
            if state == TrialState.FAIL:
                self.last_failure = (f"trial {candidate.number}:"
                                     f" val_acc {metrics.get('val_acc')!r}")
        return state

    def _record(self, candidate: Candidate, what: str, write: Callable[[], Any]) -> Any:
        """`write()` to the study, retried with doubling waits; if it keeps failing, stop the
        search (`record_error`, `stop_reason`) and raise `RecordFailed`."""
        wait = RECORD_BACKOFF_S
        for attempt in range(1, self.record_attempts + 1):
            try:
                return write()
            except ConfigError:
                raise  # bad input, not a storage hiccup
            except Exception as e:
                cause = f"{type(e).__name__}: {' '.join(str(e).split())}"[:MAX_REASON_CHARS]
                if attempt < self.record_attempts:
                    logger.warning("recording trial %d failed (%s); retrying in %.1fs",
                                   candidate.number, cause, wait)
                    self.sleep(wait)
                    wait *= 2
                    continue
                folder = Path(self.study.run_dir) / candidate.trial_dir
                self.record_error = (
                    f"could not record {what} trial {candidate.number} in the study after"
                    f" {attempt} attempts: {cause}. Its metrics stay in {folder}; fix the"
                    " storage and continue with --resume, which records them")
                self.stop_reason = self.record_error
                raise RecordFailed(self.record_error) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _failure_reason(self, trial_id: str, candidate: Candidate) -> str:
        reason = read_failure_reason(Path(self.study.run_dir) / candidate.trial_dir)
        if reason:
            return reason
        ray_error = self.error_lookup(trial_id) if self.error_lookup else None
        if ray_error:
            return ray_error
        return ("the trial process died without a failure.json (killed, e.g. for exceeding"
                " memory); see its error.txt under RUN_DIR/tune")

    # ------------------------------------------------------------------ Tune's state files
    def save(self, checkpoint_path: str) -> None:
        # Informational only: the Optuna study, not this file, is what a resume reads.
        from spvit.io import atomic_write_text

        state = {"live": {tid: c.number for tid, (c, _) in self._live.items()},
                 "launched": self.launched, "remaining": self._remaining}
        atomic_write_text(Path(checkpoint_path), json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        logger.info("searcher state %s is informational; resume reads the Optuna study",
                    checkpoint_path)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its configuration (tuner.pkl); the live study and its storage are not
        # picklable and not needed there.
        return {"trials": self.trials, "launched": list(self.launched),
                "_metric": self._metric, "_mode": self._mode}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@functools.cache
def _ray_classes() -> dict[str, type]:
    """`StudySearcher` and `TrialErrors`: the logic above on Ray Tune's base classes."""
    from ray.tune.callback import Callback
    from ray.tune.search import Searcher

    assert Searcher.FINISHED == FINISHED, Searcher.FINISHED

    class TrialErrors(_TrialErrors, Callback):
        __doc__ = _TrialErrors.__doc__

    class StudySearcher(_StudySearcher, Searcher):
        __doc__ = _StudySearcher.__doc__

    classes = {"StudySearcher": StudySearcher, "TrialErrors": TrialErrors}
    for cls in classes.values():  # importable (and picklable, as Tune does) by their names
        cls.__qualname__ = cls.__name__
    globals().update(classes)
    return classes


def __getattr__(name: str) -> Any:
    if name in ("StudySearcher", "TrialErrors"):
        return _ray_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
