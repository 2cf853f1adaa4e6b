"""Hyperparameter search under ``kubetune train``: trials one after another, the best one kept.

In a cluster the operator runs each trial as a child FineTuneJob; locally this module does the
same with the same pieces (``kubetune.api.searching``: optuna's sampler proposes values from the
trials before, ``trial_manifest`` builds each trial's manifest), so a search proposes the same
trials in both places. Each trial is an ordinary run in ``<run>/trials/<trial-name>/``; its
``trial.json`` keeps what the search learnt from it (values, state, metric, the metric at each
evaluation and the pruner's notes), written after every evaluation. A trial that already finished
(Succeeded or Pruned there) is not run again, so re-running the command continues an interrupted
search with the same study. With ``pruner`` set, the search asks optuna's pruner after each
evaluation of a trial whether to go on (``kubetune.api.searching.should_prune``); a pruned trial
stops there, as early stopping would, and counts as Pruned. At the end the best trial's model is
copied to the output folder and ``<run>/status.json`` lists the trials and the best one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJob, SpecError, parse_job
from kubetune.api.searching import (
    PastTrial,
    kept_trials,
    metric_value,
    propose_trial,
    should_prune,
    trial_count,
    trial_manifest,
    trial_metric,
)
from kubetune.api.statuses import MAX_TRIALS_IN_STATUS, FineTuneJobStatus, TrialRecord
from kubetune.trainer.running import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_TERMINATED, RunOptions, RunPaths, configure_logging, run

log = logging.getLogger("kubetune.trainer")

#: The stop reason of a pruned trial starts with this (after the early-stop prefix).
PRUNED = "pruned by the search"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(path)


def _write_status(run_dir: Path, status: FineTuneJobStatus) -> None:
    _write_json(run_dir / "status.json", status.model_dump(mode="json", by_alias=True, exclude_none=True))


def _save_trial(trial_dir: Path, past: PastTrial) -> None:
    _write_json(trial_dir / "trial.json", {
        "values": past.values, "state": past.state, "metric": past.metric,
        "intermediate": {str(k): v for k, v in sorted(past.intermediate.items())}, "prunerState": past.pruner_state,
    })


def _load_trial(trial_dir: Path, values: dict[str, Any]) -> PastTrial | None:
    """What an earlier run of this command learnt from this trial (None if nothing, or other values)."""
    saved = _read_json(trial_dir / "trial.json")
    if saved.get("values") != values or saved.get("state") not in ("Running", "Succeeded", "Pruned", "Failed"):
        return None
    try:
        intermediate = {int(k): float(v) for k, v in (saved.get("intermediate") or {}).items()}
    except (TypeError, ValueError):
        intermediate = {}
    metric = saved.get("metric")
    return PastTrial(values, float(metric) if isinstance(metric, (int, float)) else None, saved["state"], intermediate,
                     dict(saved.get("prunerState") or {}))


def run_search(job: FineTuneJob, paths: RunPaths, options: RunOptions) -> int:
    """Run every trial of ``job``'s search; returns the exit code of the whole search."""
    search = job.spec.techniques.hyperparameter_search
    assert search is not None
    parent = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    total = trial_count(search)
    history: list[PastTrial] = []
    records: list[TrialRecord] = []
    best: tuple[float, int, Path] | None = None
    configure_logging(int(os.environ.get("RANK", "0")))
    log.info("%s: hyperparameter search, %d trials, sampler %s, pruner %s, %s %s", job.name, total, search.sampler,
             search.pruner, search.mode, search.metric)
    for index in range(total):
        values = propose_trial(search, index, history, seed=job.spec.training.seed)
        manifest = trial_manifest(parent, index, values)
        shown = {k: str(v) for k, v in values.items()}
        try:
            trial = parse_job(manifest)
        except SpecError as exc:  # values that break a rule: the trial fails, the search goes on
            log.warning("trial %d %s is invalid: %s", index, shown, exc)
            records.append(TrialRecord(index=index, parameters=shown, state="Failed"))
            history.append(PastTrial(values, None, "Failed"))
            continue
        trial_dir = paths.run_dir / "trials" / trial.name
        trial_paths = RunPaths(
            base_dir=paths.base_dir,
            output_dir=trial_dir / "output",
            checkpoint_dir=trial_dir / "checkpoints",
            run_dir=trial_dir,
        )
        past = _load_trial(trial_dir, values)
        if past is None or past.state not in ("Succeeded", "Pruned"):
            log.info("trial %d/%d: %s", index + 1, total, shown)
            code, past = _run_trial(search, trial, trial_paths, options, history, values, past)
            if code in (EXIT_BAD_INPUT, EXIT_TERMINATED):
                return code  # bad data or model (every trial would fail alike), or stopped: resume later
        history.append(past)
        records.append(TrialRecord(index=index, parameters=shown, metric=past.metric, state=past.state))
        if past.state == "Succeeded":
            assert past.metric is not None
            better = best is None or (past.metric < best[0] if search.mode == "min" else past.metric > best[0])
            if better:
                best = (past.metric, index, trial_paths.output_dir)
        log.info("trial %d: %s = %s%s", index, search.metric, past.metric, " (pruned)" if past.state == "Pruned" else "")
        _write_status(paths.run_dir, _search_status(records, best, search.mode, total))
    if best is None:
        log.error("%s: no trial produced %s", job.name, search.metric)
        _write_status(paths.run_dir, _search_status(records, None, search.mode, total, failed=True))
        return EXIT_FAILED
    if paths.output_dir.exists():
        shutil.rmtree(paths.output_dir)
    shutil.copytree(best[2], paths.output_dir)
    status = _search_status(records, best, search.mode, total, output=str(paths.output_dir))
    _write_status(paths.run_dir, status)
    log.info("best trial %d: %s = %.4g; model in %s", best[1], search.metric, best[0], paths.output_dir)
    return EXIT_OK


def _run_trial(search: Any, trial: FineTuneJob, paths: RunPaths, options: RunOptions, history: list[PastTrial],
               values: dict[str, Any], resumed: PastTrial | None) -> tuple[int, PastTrial]:
    """Train one trial, asking the pruner after each evaluation; its exit code and what it taught."""
    intermediate = dict(resumed.intermediate) if resumed and resumed.state == "Running" else {}
    notes: dict[str, Any] = dict(resumed.pruner_state) if resumed and resumed.state == "Running" else {}

    def after_evaluation(step: int, metrics: dict[str, float]) -> str | None:
        value = metric_value(metrics, search.metric)
        if value is None:
            return None
        intermediate[step] = value
        pruned, new_notes = should_prune(search, history, values, intermediate, notes)
        notes.clear()
        notes.update(new_notes)
        _save_trial(paths.run_dir, PastTrial(values, None, "Running", intermediate, notes))
        if pruned:
            log.info("trial %s: %s %.4g at step %d is worse than the other trials there: pruned", trial.name, search.metric, value, step)
            return f"{PRUNED} ({search.pruner} pruner) at step {step}: {search.metric} {value:.4g}"
        return None

    paths.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        code = run(trial, paths, replace(options, after_evaluation=after_evaluation))
    except Exception:  # noqa: BLE001 — one trial's crash (NaN, OOM…) fails that trial only
        log.exception("trial %s failed", trial.name)
        code = EXIT_FAILED
    done = _read_json(paths.run_dir / "status.json") if code == EXIT_OK else {"phase": "Failed"}
    metric = trial_metric(done, search.metric)
    if PRUNED in str((done.get("progress") or {}).get("stopReason") or ""):
        past = PastTrial(values, intermediate[max(intermediate)] if intermediate else metric, "Pruned", intermediate, notes)
    elif done.get("phase") == "Succeeded" and metric is not None:
        past = PastTrial(values, metric, "Succeeded", intermediate, notes)
    else:
        past = PastTrial(values, None, "Failed", intermediate, notes)
    if code not in (EXIT_BAD_INPUT, EXIT_TERMINATED):
        _save_trial(paths.run_dir, past)
    return code, past


def _search_status(
    records: list[TrialRecord], best: tuple[float, int, Path] | None, mode: str, total: int, output: str | None = None,
    failed: bool = False,
) -> FineTuneJobStatus:
    best_record = next((r for r in records if best and r.index == best[1]), None)
    done = len(records)
    finished = output is not None
    return FineTuneJobStatus.model_validate(
        {
            "phase": "Failed" if failed else "Succeeded" if finished else "Running",
            "message": f"{done}/{total} trials done" + (f"; best trial {best[1]}" if best else ""),
            "trials": [r.model_dump(mode="json", by_alias=True) for r in kept_trials(records, mode, MAX_TRIALS_IN_STATUS)],
            "bestTrial": best_record.model_dump(mode="json", by_alias=True) if best_record else None,
            "outputPath": output,
            "progress": {"step": done, "totalSteps": total, "percent": round(100.0 * done / max(total, 1), 1)},
        }
    )
