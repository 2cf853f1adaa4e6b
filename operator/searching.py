"""Hyperparameter search in the cluster: trials as child FineTuneJobs, the best one kept.

Called by the kopf handlers (``kubetune.operator.handlers``): when a FineTuneJob with
``spec.techniques.hyperparameterSearch`` is created or the operator starts (:func:`ensure_trials`),
and on every event of a trial — a FineTuneJob labelled ``kubetune.io/search`` — for its parent
(:func:`reconcile`). A search parent gets no trainer pods of its own. Each trial is an ordinary
FineTuneJob (``kubetune.api.searching.trial_manifest``: the parent's spec with the trial's values,
no search block, ``maxStepsPerTrial`` applied) owned by the parent, so the usual machinery trains
it and deleting the parent removes its trials. At most ``parallelism`` trials run at once; when one
finishes, optuna's sampler proposes the next (``kubetune.api.searching.propose_trial``, ask/tell):
its study is rebuilt in memory for every proposal from the trials before it — their values, kept
on each trial in the ``kubetune.io/trial-parameters`` annotation, and their state and metric
(``trial_metric`` of their status) — so nothing but the FineTuneJobs holds the search's state,
and a restarted operator continues it as if it had never stopped.

Pruning (``pruner``: median or successive-halving), as ``kubetune train`` does it: the trainer
reports each evaluation's metrics with their step (``status.progress.evalStep``); on a trial's
event with a step not seen before, the operator adds the value to the trial's intermediate values,
asks optuna's pruner (``kubetune.api.searching.should_prune``, the other trials' intermediate
values and the pruner's notes as history) and writes the values, the notes and, when pruned, the
step to the trial's ``kubetune.io/trial-pruning`` annotation — in the same patch that suspends a
pruned trial (``runPolicy.suspend``: its pods stop, its checkpoints and status stay). So a
restarted operator neither loses a value nor prunes twice. A pruned trial counts as finished (the
next one starts), reports its last intermediate value as its metric, as optuna's pruned trials do,
and is never the best trial (optuna's best is among complete trials only). Values the trainer
reported while no operator ran are not seen (status holds only the latest evaluation).

Idempotent by construction: trial ``i`` is always named ``<parent>-trial-00i``, the trials that
exist are listed from the API server before anything is proposed, and creating one that exists is
"already there" — a restarted operator, or two events racing, never makes a trial twice. A trial
whose values make an invalid spec is not created: it counts as Failed, with the reason in a Warning
Event and in an annotation on the parent (``kubetune.io/rejected-trial-<i>``), which keeps it from
being proposed again. The parent's status: ``trials`` (bounded, the best kept), ``bestTrial``,
phase Running while trials run, Succeeded when all are done (``outputPath`` = the best trial's),
Failed when none succeeded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections import defaultdict
from typing import Any, Literal, NamedTuple

import kopf

from kubetune.api import GROUP, TERMINAL_PHASES, ConditionType, FineTuneJob, Reason, SpecError, parse_job
from kubetune.api.searching import (
    SEARCH_LABEL,
    PastTrial,
    TRIAL_INDEX_LABEL,
    kept_trials,
    propose_trial,
    should_prune,
    search_label_value,
    trial_count,
    trial_manifest,
    evaluation_step,
    trial_metric,
)
from kubetune.api.statuses import (
    MAX_INTERMEDIATE_IN_STATUS,
    MAX_TRIALS_IN_STATUS,
    Progress,
    TrialRecord,
    status_fields,
    status_key,
)
from kubetune.techniques.hyperparameter_search import HyperparameterSearchSpec
from kubetune.operator import building, creating, kubeapi, phases, retrying, statusing
from kubetune.operator.settings import Settings

logger = logging.getLogger(__name__)

#: The trial's values (JSON, by spec path) on each trial FineTuneJob: the sampler's history.
PARAMETERS_ANNOTATION = f"{GROUP}/trial-parameters"
#: ``<prefix><index>`` on the parent: a trial whose values made an invalid spec (JSON parameters + message).
REJECTED_ANNOTATION_PREFIX = f"{GROUP}/rejected-trial-"
#: Marks a trial suspended because its search was (so unsuspending the search resumes only those).
SUSPENDED_BY_SEARCH_ANNOTATION = f"{GROUP}/suspended-by-search"
#: On each trial, once it reported an evaluation and a pruner is set: its metric at each evaluation,
#: the pruner's notes and, when pruned, the step (JSON; see :class:`Pruning`).
PRUNING_ANNOTATION = f"{GROUP}/trial-pruning"
#: The most intermediate values kept per trial (the newest): an annotation stays small.
MAX_INTERMEDIATE_VALUES = 100

TRIALS_RUNNING = "TrialsRunning"
SEARCH_SUCCEEDED = "SearchSucceeded"
ALL_TRIALS_FAILED = "AllTrialsFailed"
TRIAL_CREATED = "TrialCreated"
TRIAL_REJECTED = "TrialRejected"
TRIAL_PRUNED = "TrialPruned"

# One lock per search (per event loop, as in statusing): trial events and handlers take turns.
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, defaultdict[tuple[str, str], asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


def _lock(namespace: str, name: str) -> asyncio.Lock:
    return _locks.setdefault(asyncio.get_running_loop(), defaultdict(asyncio.Lock))[(namespace, name)]


def is_search(body: dict[str, Any]) -> bool:
    """Whether a FineTuneJob body asks for a search (read raw: the spec may still be invalid)."""
    techniques = (body.get("spec") or {}).get("techniques") or {}
    return isinstance(techniques, dict) and techniques.get("hyperparameterSearch") is not None


def parent_name(trial: dict[str, Any]) -> str | None:
    """The search a trial belongs to: its FineTuneJob owner."""
    for ref in trial.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "FineTuneJob" and ref.get("controller"):
            return str(ref["name"])
    return None


# ------------------------------------------------------------------------------ pure parts


def _shown(values: dict[str, Any]) -> dict[str, str]:
    return {path: json.dumps(v) if isinstance(v, bool) or v is None else str(v) for path, v in values.items()}


def trial_values(trial: dict[str, Any]) -> dict[str, Any]:
    """The values a trial FineTuneJob was made with (empty if its annotation is unreadable)."""
    try:
        values = json.loads((trial["metadata"].get("annotations") or {})[PARAMETERS_ANNOTATION])
    except (KeyError, ValueError, TypeError):
        return {}
    return values if isinstance(values, dict) else {}


class Pruning(NamedTuple):
    """What the pruner has seen of a trial, kept in its ``kubetune.io/trial-pruning`` annotation."""

    intermediate: dict[int, float] = {}
    pruner_state: dict[str, Any] = {}
    pruned_at_step: int | None = None

    def annotation(self) -> str:
        return json.dumps({"intermediate": {str(k): v for k, v in sorted(self.intermediate.items())},
                           "prunerState": self.pruner_state, "prunedStep": self.pruned_at_step})


def trial_pruning(trial: dict[str, Any]) -> Pruning:
    """A trial's :class:`Pruning` (empty when it has none or the annotation is unreadable)."""
    try:
        saved = json.loads((trial["metadata"].get("annotations") or {})[PRUNING_ANNOTATION])
        intermediate = {int(k): float(v) for k, v in (saved.get("intermediate") or {}).items()}
        step = saved.get("prunedStep")
        return Pruning(intermediate, dict(saved.get("prunerState") or {}),
                       int(step) if isinstance(step, int) and step in intermediate else None)
    except (KeyError, ValueError, TypeError, AttributeError):
        return Pruning()


def new_evaluation(trial: dict[str, Any], metric_name: str) -> tuple[int, float] | None:
    """The step and metric of the trial's latest evaluation when the pruner has not seen it yet."""
    status = trial.get("status") or {}
    step = evaluation_step(status)
    value = trial_metric(status, metric_name)
    if step is None or value is None or step in trial_pruning(trial).intermediate:
        return None
    return step, value


def trial_record(index: int, trial: dict[str, Any], metric_name: str) -> TrialRecord:
    """A trial's line in the parent's status, from the trial FineTuneJob."""
    status = trial.get("status") or {}
    phase = status.get("phase")
    metric = trial_metric(status, metric_name)
    pruning = trial_pruning(trial)
    shown = {str(k): v for k, v in sorted(pruning.intermediate.items())[-MAX_INTERMEDIATE_IN_STATUS:]} or None
    if pruning.pruned_at_step is not None:  # optuna's pruned trial: its last intermediate value
        return TrialRecord(index=index, parameters=_shown(trial_values(trial)), state="Pruned", intermediate=shown,
                           metric=pruning.intermediate[pruning.pruned_at_step], pruned_at_step=pruning.pruned_at_step)
    state: Literal["Pending", "Running", "Succeeded", "Failed"]
    if phase == "Succeeded":
        state = "Succeeded" if metric is not None else "Failed"  # finished without the metric: no use
    elif phase == "Failed":
        state = "Failed"
    elif phase in ("Running", "Initializing"):
        state = "Running"
    else:
        state = "Pending"
    return TrialRecord(index=index, parameters=_shown(trial_values(trial)), intermediate=shown,
                       metric=metric if state == "Succeeded" else None, state=state)


def past_trial(trial: dict[str, Any], metric: str) -> PastTrial:
    """A trial FineTuneJob as the sampler and pruner learn from it."""
    record = trial_record(0, trial, metric)
    pruning = trial_pruning(trial)
    return PastTrial(trial_values(trial), record.metric, record.state, pruning.intermediate, pruning.pruner_state)


def past_trials(index: int, trials: dict[int, dict[str, Any]], metric: str) -> list[PastTrial]:
    """What the sampler learns before proposing trial ``index``: trials 0 … index-1 as the trial
    FineTuneJobs say (values from their annotation, state and metric from their status), one that
    was rejected (its values made an invalid spec) or is gone as failed. Read from the cluster every time, so a restarted operator rebuilds
    the same study, and the same trials in the same order give the same proposal, whichever event
    got here first."""
    out: list[PastTrial] = []
    for i in range(index):
        if i not in trials:
            out.append(PastTrial({}, None, "Failed"))
            continue
        out.append(past_trial(trials[i], metric))
    return out


def is_pruned(trial: dict[str, Any]) -> bool:
    return trial_pruning(trial).pruned_at_step is not None


def is_running(trial: dict[str, Any]) -> bool:
    """Whether a trial still takes one of the search's ``parallelism`` places."""
    return (trial.get("status") or {}).get("phase") not in TERMINAL_PHASES and not is_pruned(trial)


def best_of(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    """The succeeded trial with the best metric (the lower index on a tie)."""
    scored = [r for r in records if r.state == "Succeeded" and r.metric is not None]
    if not scored:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(scored, key=lambda r: (sign * r.metric, r.index))  # type: ignore[operator]


def search_observation(records: list[TrialRecord], total: int, search: HyperparameterSearchSpec,
                       suspended: bool = False) -> phases.Observation:
    """The parent's phase, reason and message from its trials (and its own runPolicy.suspend)."""
    finished = sum(1 for r in records if r.state in ("Succeeded", "Failed", "Pruned"))
    running = sum(1 for r in records if r.state in ("Pending", "Running"))
    best = best_of(records, search.mode)
    pruned = sum(1 for r in records if r.state == "Pruned")
    shown = (f" ({pruned} pruned)" if pruned else "") + (f"; best trial {best.index} ({search.metric} {best.metric:.4g})" if best else "")
    if finished >= total:
        if best is None:
            return phases.Observation("Failed", ALL_TRIALS_FAILED, f"all {total} trials failed", completion_time=phases.now())
        return phases.Observation("Succeeded", SEARCH_SUCCEEDED, f"{total}/{total} trials finished{shown}",
                                  completion_time=phases.now())
    if suspended:
        return phases.Observation("Suspended", Reason.SUSPENDED,
                                  f"suspended: {finished}/{total} trials finished; no trial starts and unfinished trials are suspended{shown}")
    return phases.Observation("Running", TRIALS_RUNNING, f"{finished}/{total} trials finished, {running} running{shown}")


def search_status_patch(status: dict[str, Any], records: list[TrialRecord], total: int, search: HyperparameterSearchSpec,
                        *, best_output: str | None, generation: int | None, techniques: str,
                        suspended: bool = False) -> tuple[dict[str, Any], phases.Observation]:
    """The parent's status fields to write (empty when nothing changes), and the observation."""
    obs = search_observation(records, total, search, suspended)
    best = best_of(records, search.mode)
    timestamp = phases.now()
    conditions = status.get("conditions") or []
    if not any(c.get("type") == ConditionType.CREATED for c in conditions):
        conditions = phases.set_condition(conditions, ConditionType.CREATED, "True", Reason.RESOURCES_CREATED,
                                          f"runs {total} trials as child FineTuneJobs, {search.parallelism} at a time",
                                          generation, timestamp)
    conditions = phases.conditions_for(conditions, obs, generation, timestamp)
    finished = sum(1 for r in records if r.state in ("Succeeded", "Failed", "Pruned"))
    fields: dict[str, Any] = {
        "phase": obs.phase, "message": obs.message, "techniques": techniques,
        # Set once here; a spec change moves it (``updating``): kopf's diff base reads it (``persistence``).
        "observed_generation": status.get(status_key("observed_generation")) or generation,
        "trials": kept_trials(records, search.mode, MAX_TRIALS_IN_STATUS), "best_trial": best,
        "progress": Progress(step=finished, total_steps=total, percent=round(100.0 * finished / max(total, 1), 1)),
        "start_time": status.get(status_key("start_time")) or timestamp,
    }
    if obs.phase in TERMINAL_PHASES:
        fields["completion_time"] = status.get(status_key("completion_time")) or timestamp
        if obs.phase == "Succeeded":
            fields["output_path"] = best_output
    wanted = status_fields(**fields)
    patch = {k: v for k, v in wanted.items() if v is not None and status.get(k) != v}
    if conditions != (status.get("conditions") or []):
        patch["conditions"] = conditions
    return patch, obs


def trial_body(job: FineTuneJob, index: int, values: dict[str, Any]) -> dict[str, Any]:
    """Trial ``index`` of ``job``'s search as the FineTuneJob the operator creates: the manifest
    ``kubetune train`` runs for that trial too, plus its values and owner. SpecError when the
    values make an invalid spec."""
    manifest = trial_manifest(job.model_dump(mode="json", by_alias=True, exclude_none=True), index, values)
    parse_job(manifest)
    manifest["metadata"]["annotations"] = {PARAMETERS_ANNOTATION: json.dumps(values)}
    if job.metadata.uid:
        manifest["metadata"]["ownerReferences"] = [building.owner_reference(job)]
    return manifest


def first_trials(job: FineTuneJob) -> list[dict[str, Any]]:
    """The trials a new search starts with (``parallelism`` of them, proposed from no history),
    for ``kubetune render``; values that make an invalid spec are skipped, as the operator does."""
    search = job.spec.techniques.hyperparameter_search
    assert search is not None
    out: list[dict[str, Any]] = []
    for index in range(trial_count(search)):
        if len(out) >= search.parallelism:
            break
        try:
            out.append(trial_body(job, index, propose_trial(search, index, [], seed=job.spec.training.seed)))
        except SpecError:
            continue
    return out


def output_location(trial: dict[str, Any]) -> str | None:
    """Where a trial's model is, for the parent's ``outputPath``. Every trial writes to
    ``/workspace/…`` — its own claim, or its own folder of a shared one — so a path there becomes
    ``pvc://<claim>/[<trial>/]…`` (a source a
    next FineTuneJob can start from); any other path is kept as the trainer reported it."""
    path = (trial.get("status") or {}).get(status_key("output_path"))
    if not path or not str(path).startswith(building.WORKSPACE_DIR + "/"):
        return path
    try:
        job = creating.parse_body(trial)
    except SpecError:
        return str(path)
    folder = building.workspace_sub_path(job)
    relative = str(path)[len(building.WORKSPACE_DIR) + 1:]
    return f"pvc://{building.workspace_claim(job)}/{folder + '/' if folder else ''}{relative}"


# ------------------------------------------------------------------------------ applying


async def ensure_trials(body: dict[str, Any], settings: Settings) -> None:
    """Create and resume handlers: validate the parent (a bad spec is rejected as for any job),
    then start or continue its trials."""
    job = await creating.parse_or_reject(body, fail=True)
    if statusing.is_finished(body):
        return
    await reconcile(job.namespace, job.name, settings)


def _rejected(parent: dict[str, Any]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for key, value in (parent["metadata"].get("annotations") or {}).items():
        if key.startswith(REJECTED_ANNOTATION_PREFIX) and key[len(REJECTED_ANNOTATION_PREFIX):].isdigit():
            try:
                out[int(key[len(REJECTED_ANNOTATION_PREFIX):])] = json.loads(value)
            except ValueError:
                out[int(key[len(REJECTED_ANNOTATION_PREFIX):])] = {}
    return out


async def _trials(job: FineTuneJob) -> dict[int, dict[str, Any]]:
    """The trial FineTuneJobs of this search (this parent's, by owner uid), by index."""
    found = await kubeapi.list_objects("FineTuneJob", job.namespace, label_selector=f"{SEARCH_LABEL}={search_label_value(job.name)}")
    out: dict[int, dict[str, Any]] = {}
    for trial in found:
        meta = trial.get("metadata") or {}
        index = (meta.get("labels") or {}).get(TRIAL_INDEX_LABEL, "")
        owned = any(ref.get("uid") == job.metadata.uid for ref in meta.get("ownerReferences") or [])
        if owned and index.isdigit():
            out[int(index)] = trial
    return out


async def reconcile(namespace: str, name: str, settings: Settings | None = None) -> str | None:
    """Bring one search in line: create the trials that may start, then write the parent's status.
    Returns the parent's phase (None when it is gone, invalid or not a search)."""
    async with _lock(namespace, name):
        return await retrying.until_written(lambda: _reconcile_once(namespace, name, settings))


async def _reconcile_once(namespace: str, name: str, settings: Settings | None) -> str | None:
    parent = await kubeapi.get("FineTuneJob", namespace, name)
    if parent is None or parent["metadata"].get("deletionTimestamp") or not is_search(parent):
        return None
    if statusing.is_finished(parent):
        return str(parent["status"]["phase"])
    try:
        job = creating.parse_body(parent)
    except SpecError:
        return None  # the create handler rejects it
    search = job.spec.techniques.hyperparameter_search
    assert search is not None
    total = trial_count(search)
    trials = await _trials(job)
    rejected = _rejected(parent)
    suspended = job.spec.run_policy.suspend
    await _prune_trials(job, parent, search, trials)
    if not suspended:
        await _start_trials(job, parent, search, total, trials, rejected, settings)
    await _suspend_trials(job, trials, suspended)
    return await _write_search_status(job, search, total, trials, rejected, suspended)


async def _suspend_trials(job: FineTuneJob, trials: dict[int, dict[str, Any]], suspended: bool) -> None:
    """Pass the parent's ``runPolicy.suspend`` on to its unfinished trials. Unsuspending resumes only
    the trials the search suspended (marked with an annotation), never one a user suspended."""
    for trial in trials.values():
        if not is_running(trial):  # finished or pruned: a pruned trial stays suspended
            continue
        meta = trial["metadata"]
        current = bool(((trial.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
        ours = (meta.get("annotations") or {}).get(SUSPENDED_BY_SEARCH_ANNOTATION) == "true"
        if suspended and not current:
            patch = {"metadata": {"annotations": {SUSPENDED_BY_SEARCH_ANNOTATION: "true"}}, "spec": {"runPolicy": {"suspend": True}}}
        elif not suspended and current and ours:
            patch = {"metadata": {"annotations": {SUSPENDED_BY_SEARCH_ANNOTATION: None}}, "spec": {"runPolicy": {"suspend": False}}}
        else:
            continue
        updated = await kubeapi.patch("FineTuneJob", job.namespace, meta["name"], patch)
        if updated is not None:
            trial.update(updated)


async def _prune_trials(job: FineTuneJob, parent: dict[str, Any], search: HyperparameterSearchSpec,
                        trials: dict[int, dict[str, Any]]) -> None:
    """Record each running trial's new evaluation and ask the pruner about it; suspend a pruned
    trial in the same patch that records the verdict (so a restart never asks again)."""
    if search.pruner == "none":
        return
    for index, trial in sorted(trials.items()):
        evaluation = new_evaluation(trial, search.metric) if is_running(trial) else None
        if evaluation is None:
            continue
        step, value = evaluation
        seen = trial_pruning(trial)
        intermediate = dict(sorted({**seen.intermediate, step: value}.items())[-MAX_INTERMEDIATE_VALUES:])
        # The history: every other trial of the search, with what the pruner saw of it.
        history = [past_trial(t, search.metric) for i, t in sorted(trials.items()) if i != index]
        pruned, notes = await asyncio.to_thread(should_prune, search, history, trial_values(trial), intermediate,
                                                seen.pruner_state)
        patch: dict[str, Any] = {"metadata": {"annotations": {
            PRUNING_ANNOTATION: Pruning(intermediate, notes, step if pruned else None).annotation()}}}
        if pruned:
            patch["spec"] = {"runPolicy": {"suspend": True}}
        updated = await kubeapi.patch("FineTuneJob", job.namespace, trial["metadata"]["name"], patch)
        if updated is None:
            continue
        trial.update(updated)
        if pruned:
            logger.info("search %s/%s: trial %d pruned at step %d (%s %s)", job.namespace, job.name, index, step,
                        search.metric, value)
            await kubeapi.post_event(statusing.involved(parent), reason=TRIAL_PRUNED, message=(
                f"trial {index} ({trial['metadata']['name']}) pruned by the {search.pruner} pruner at step {step}: "
                f"{search.metric} {value:.4g}; suspended, its checkpoints kept"))


async def _start_trials(job: FineTuneJob, parent: dict[str, Any], search: HyperparameterSearchSpec, total: int,
                        trials: dict[int, dict[str, Any]], rejected: dict[int, dict[str, Any]],
                        settings: Settings | None) -> None:
    running = sum(1 for t in trials.values() if is_running(t))
    for index in range(total):
        if running >= search.parallelism:
            return
        if index in trials or index in rejected:
            continue
        # In a thread: rebuilding the study costs about a second per thousand trials before this
        # one (TPE), which must not stall the operator's event loop (the search's lock is held).
        values = await asyncio.to_thread(propose_trial, search, index, past_trials(index, trials, search.metric), job.spec.training.seed)
        try:
            manifest = trial_body(job, index, values)
        except SpecError as exc:
            message = "; ".join(str(p) for p in exc.problems)
            rejected[index] = {"parameters": _shown(values), "message": message[:1024]}
            await kubeapi.patch("FineTuneJob", job.namespace, job.name, {"metadata": {"annotations": {
                f"{REJECTED_ANNOTATION_PREFIX}{index}": json.dumps(rejected[index])}}})
            await kubeapi.post_event(statusing.involved(parent), reason=TRIAL_REJECTED, type="Warning",
                                     message=f"trial {index} {_shown(values)} makes an invalid spec and counts as failed: {message}")
            continue
        trial, created = await kubeapi.create(manifest)
        if not created and not any(ref.get("uid") == job.metadata.uid for ref in trial["metadata"].get("ownerReferences") or []):
            raise kopf.TemporaryError(
                f"FineTuneJob {trial['metadata']['name']} still belongs to an earlier search of this name; "
                "waiting for the garbage collector to remove it", delay=settings.retry_delay if settings else 10)
        trials[index] = trial
        if is_running(trial):
            running += 1
        if created:
            logger.info("search %s/%s: created trial %d %s", job.namespace, job.name, index, values)
            await kubeapi.post_event(statusing.involved(parent), reason=TRIAL_CREATED,
                                     message=f"trial {index}: {trial['metadata']['name']} with {_shown(values)}")


async def _write_search_status(job: FineTuneJob, search: HyperparameterSearchSpec, total: int,
                               trials: dict[int, dict[str, Any]], rejected: dict[int, dict[str, Any]],
                               suspended: bool = False) -> str | None:
    records = [trial_record(i, t, search.metric) for i, t in trials.items()]
    records += [TrialRecord(index=i, parameters=r.get("parameters") or {}, state="Failed") for i, r in rejected.items()]
    records.sort(key=lambda r: r.index)
    best = best_of(records, search.mode)
    best_output = output_location(trials[best.index]) if best else None
    parent = await kubeapi.get("FineTuneJob", job.namespace, job.name)
    if parent is None:
        return None
    status = parent.get("status") or {}
    patch, obs = search_status_patch(status, records, total, search, best_output=best_output,
                                     generation=parent["metadata"].get("generation"),
                                     techniques=building.techniques_summary(job), suspended=suspended)
    if not patch:
        return status.get("phase")
    await statusing.write_status(parent, patch)  # a 409 (written in between): reconcile reads all again
    if phases.transitioned(status, obs):
        await kubeapi.post_event(statusing.involved(parent), reason=obs.reason, message=obs.message,
                                 type="Warning" if obs.phase == "Failed" else "Normal")
    return obs.phase


# --- the operator hook of technique 8 (kubetune.techniques.declarations.RunArranger) ---------------
#: Runs of a search carry this label; the handlers send their events to :func:`reconcile`.
CHILD_LABEL = SEARCH_LABEL
RENDER_NOTE = "a hyperparameter search: the first trials it starts; later ones follow from their results."
first_runs = first_trials
ensure_runs = ensure_trials
