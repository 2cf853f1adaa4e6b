"""Hyperparameter search under ``kubetune train``: trials one after another, the best one kept.

In a cluster the operator runs each trial as a child FineTuneJob; locally this module does the
same with the same pieces (``kubetune.api.searching``: the sampler proposes values from the
finished trials, ``trial_manifest`` builds each trial's manifest), so a search proposes the same
trials in both places. Each trial is an ordinary run in ``<run>/trials/<trial-name>/``; a trial
that already finished (its status.json says Succeeded) is not run again, so re-running the command
continues an interrupted search. At the end the best trial's model is copied to the output
folder and ``<run>/status.json`` lists the trials and the best one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from kubetune.api import FineTuneJob, SpecError, parse_job
from kubetune.api.searching import kept_trials, propose_trial, trial_count, trial_manifest, trial_metric
from kubetune.api.statuses import MAX_TRIALS_IN_STATUS, FineTuneJobStatus, TrialRecord
from kubetune.trainer.running import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_TERMINATED, RunOptions, RunPaths, configure_logging, run

log = logging.getLogger("kubetune.trainer")


def _read_status(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_status(run_dir: Path, status: FineTuneJobStatus) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "status.json.tmp"
    tmp.write_text(json.dumps(status.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2), encoding="utf-8")
    tmp.replace(run_dir / "status.json")


def run_search(job: FineTuneJob, paths: RunPaths, options: RunOptions) -> int:
    """Run every trial of ``job``'s search; returns the exit code of the whole search."""
    search = job.spec.techniques.hyperparameter_search
    assert search is not None
    parent = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    total = trial_count(search)
    history: list[tuple[dict[str, Any], float]] = []
    records: list[TrialRecord] = []
    best: tuple[float, int, Path] | None = None
    configure_logging(int(os.environ.get("RANK", "0")))
    log.info("%s: hyperparameter search, %d trials, sampler %s, %s %s", job.name, total, search.sampler, search.mode, search.metric)
    for index in range(total):
        values = propose_trial(search, index, history, seed=job.spec.training.seed)
        manifest = trial_manifest(parent, index, values)
        shown = {k: str(v) for k, v in values.items()}
        try:
            trial = parse_job(manifest)
        except SpecError as exc:  # values that break a rule: the trial fails, the search goes on
            log.warning("trial %d %s is invalid: %s", index, shown, exc)
            records.append(TrialRecord(index=index, parameters=shown, state="Failed"))
            continue
        trial_dir = paths.run_dir / "trials" / trial.name
        trial_paths = RunPaths(
            base_dir=paths.base_dir,
            output_dir=trial_dir / "output",
            checkpoint_dir=trial_dir / "checkpoints",
            run_dir=trial_dir,
        )
        done = _read_status(trial_dir)
        if done.get("phase") != "Succeeded":
            log.info("trial %d/%d: %s", index + 1, total, shown)
            trial_dir.mkdir(parents=True, exist_ok=True)
            try:
                code = run(trial, trial_paths, options)
            except Exception:  # noqa: BLE001 — one trial's crash (NaN, OOM…) fails that trial only
                log.exception("trial %d failed", index)
                code = EXIT_FAILED
            if code in (EXIT_BAD_INPUT, EXIT_TERMINATED):
                return code  # bad data or model (every trial would fail alike), or stopped: resume later
            done = _read_status(trial_dir) if code == EXIT_OK else {"phase": "Failed"}
        metric = trial_metric(done, search.metric)
        state = "Succeeded" if done.get("phase") == "Succeeded" and metric is not None else "Failed"
        records.append(TrialRecord(index=index, parameters=shown, metric=metric, state=state))
        if state == "Succeeded":
            assert metric is not None
            history.append((values, metric))
            better = best is None or (metric < best[0] if search.mode == "min" else metric > best[0])
            if better:
                best = (metric, index, trial_paths.output_dir)
        log.info("trial %d: %s = %s", index, search.metric, metric)
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
