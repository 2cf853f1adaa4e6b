"""How a Job and its pods become a FineTuneJob's phase, conditions and message (pure, no cluster)."""

from __future__ import annotations

from typing import Any

from kubetune.api import ConditionType, Reason
from kubetune.operator import phases


def job(suspend: bool = False, completions: int = 1, **status: Any) -> dict[str, Any]:
    return {"spec": {"suspend": suspend, "completions": completions}, "status": status}


def pod(name: str, phase: str = "Pending", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {"phase": phase, **status}}


def cond(kind: str, reason: str = "", message: str = "", status: str = "True") -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": "2026-01-01T01:00:00Z"}


def observe(j: dict[str, Any] | None, pods: list[dict[str, Any]] = (), *, suspended: bool = False, queue: str | None = None) -> phases.Observation | None:  # type: ignore[assignment]
    return phases.observe(j, list(pods), user_suspended=suspended, queue=queue)


class TestObserve:
    def test_no_job_says_nothing(self) -> None:
        assert observe(None) is None

    def test_new_job_is_initializing(self) -> None:
        obs = observe(job())
        assert obs is not None and (obs.phase, obs.reason) == ("Initializing", Reason.JOB_CREATED)

    def test_pending_pod_explains_why(self) -> None:
        waiting = pod("p-0", containerStatuses=[{"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}])
        obs = observe(job(active=1), [waiting])
        assert obs is not None and obs.phase == "Initializing" and "ImagePullBackOff: not found" in obs.message
        assert obs.reason == Reason.PODS_PENDING  # docs/troubleshooting.md: `Initializing`, reason `PodsPending`
        unschedulable = pod("p-0", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                "message": "0/3 nodes have nvidia.com/gpu"}])
        obs = observe(job(active=1), [unschedulable])
        assert obs is not None and "Unschedulable: 0/3 nodes have nvidia.com/gpu" in obs.message
        assert (obs.phase, obs.reason) == ("Initializing", Reason.PODS_PENDING)

    def test_a_claim_no_storage_class_can_bind_shows_as_the_schedulers_reason(self) -> None:
        """docs/troubleshooting.md: a checkpoint claim left Pending shows as the pods' Unschedulable reason."""
        message = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims. preemption: 0/3 nodes are available"
        stuck = pod("p-0", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}])
        obs = observe(job(active=1), [stuck])
        assert obs is not None and (obs.phase, obs.reason) == ("Initializing", Reason.PODS_PENDING)
        assert "pod p-0: Unschedulable: 0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims" in obs.message

    def test_ready_pods_are_running(self) -> None:
        obs = observe(job(completions=2, active=2, ready=2, startTime="2026-01-01T00:00:05Z"))
        assert obs is not None and (obs.phase, obs.reason, obs.start_time) == ("Running", Reason.PODS_RUNNING, "2026-01-01T00:00:05Z")
        assert obs.message == "2/2 trainer pods running"

    def test_a_pod_that_finished_before_the_job_counts_it_is_still_running(self) -> None:
        # The pod succeeded and the Job dropped ``ready``, but has not counted the success yet: the
        # run is finishing, not waiting for its pods to start; the status stays as it was (no write).
        ended = pod("p-0", "Succeeded", containerStatuses=[{"name": "trainer", "restartCount": 0,
                                                            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}])
        running = observe(job(active=1, ready=1), [pod("p-0", "Running")])
        finishing = observe(job(active=1, ready=0), [ended])
        assert running is not None and finishing is not None
        assert (finishing.phase, finishing.reason, finishing.message) == (running.phase, running.reason, running.message)
        status = phases.status_patch({}, running, generation=1, timestamp="2026-01-01T00:00:00Z")
        assert phases.status_patch(status, finishing, generation=1, timestamp="2026-01-01T00:01:00Z") == {}
        # two nodes, one done and one still running: both ran, the message stays "2/2"
        two = observe(job(completions=2, active=1, ready=1, succeeded=1), [ended, pod("p-1", "Running")])
        assert two is not None and (two.phase, two.message) == ("Running", "2/2 trainer pods running")

    def test_a_running_pod_seen_before_the_jobs_start_time_gives_the_start_time(self) -> None:
        early = observe(job(active=1), [pod("p-0", "Running", startTime="2026-01-01T00:00:03Z")])
        assert early is not None and (early.phase, early.start_time) == ("Running", "2026-01-01T00:00:03Z")
        status = phases.status_patch({}, early, generation=1, timestamp="2026-01-01T00:00:04Z")
        assert status["startTime"] == "2026-01-01T00:00:03Z"
        # the Job's own startTime arrives next: no write for it (the run's start is already shown)
        later = observe(job(active=1, ready=1, startTime="2026-01-01T00:00:01Z"), [pod("p-0", "Running")])
        assert later is not None and phases.status_patch(status, later, generation=1, timestamp="2026-01-01T00:00:05Z") == {}

    def test_complete_is_succeeded(self) -> None:
        obs = observe(job(succeeded=1, completionTime="2026-01-01T02:00:00Z", conditions=[cond("Complete")]))
        assert obs is not None and (obs.phase, obs.completion_time) == ("Succeeded", "2026-01-01T02:00:00Z")

    def test_oom_killed_pod_is_the_failure_reason(self) -> None:
        oom = pod("p-0", "Failed", containerStatuses=[{"name": "trainer", "restartCount": 0,
                                                       "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}])
        obs = observe(job(failed=4, conditions=[cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]), [oom])
        assert obs is not None and (obs.phase, obs.reason) == ("Failed", Reason.OOM_KILLED)
        assert "OOMKilled" in obs.message and "spec.resources.memory" in obs.message
        assert obs.restarts == 4

    def test_termination_message_is_carried(self) -> None:
        crashed = pod("p-0", "Failed", containerStatuses=[{"name": "trainer", "state": {"terminated": {
            "exitCode": 1, "reason": "Error", "message": "spec.peft.targetModules: no module matches 'q_proj'"}}}])
        obs = observe(job(conditions=[cond("Failed", "BackoffLimitExceeded", "backoff limit")]), [crashed])
        assert obs is not None and obs.reason == Reason.BACKOFF_LIMIT_EXCEEDED
        assert "exited with code 1: spec.peft.targetModules: no module matches 'q_proj'" in obs.message

    def test_deadline(self) -> None:
        obs = observe(job(conditions=[cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")]))
        assert obs is not None and (obs.phase, obs.reason) == ("Failed", Reason.DEADLINE_EXCEEDED)

    def test_suspended_by_the_user_or_queued_by_kueue(self) -> None:
        obs = observe(job(suspend=True), suspended=True)
        assert obs is not None and (obs.phase, obs.reason) == ("Suspended", Reason.SUSPENDED)
        obs = observe(job(suspend=True), queue="team-a")
        assert obs is not None and (obs.phase, obs.reason) == ("Pending", Reason.QUEUED) and "team-a" in obs.message


class TestEvents:
    def test_transitions_worth_acting_on_get_an_event_the_routine_start_does_not(self) -> None:
        """docs/troubleshooting.md: Events for running, finished or failed, suspended or resumed, pods that
        wait for a reason; the routine start (Created, Initializing) is in the conditions only."""
        status: dict[str, Any] = {}
        seen = []
        waiting = pod("p-0", conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no GPU"}])
        for j, pods, suspended in [(job(), [], False), (job(active=1), [], False), (job(active=1), [waiting], False),
                                   (job(active=1, ready=1), [], False), (job(active=1, ready=1), [], False),
                                   (job(suspend=True), [], True), (job(active=1, ready=1), [], False),
                                   (job(conditions=[cond("Failed", "BackoffLimitExceeded")]), [], False)]:
            obs = observe(j, pods, suspended=suspended)
            assert obs is not None
            if phases.worth_an_event(status, obs):
                seen.append(obs.reason)
            status = {**status, **phases.status_patch(status, obs, generation=1, timestamp="2026-01-01T03:00:00Z")}
        assert seen == [Reason.PODS_PENDING, Reason.PODS_RUNNING, Reason.SUSPENDED, Reason.PODS_RUNNING,
                        Reason.BACKOFF_LIMIT_EXCEEDED]


class TestStatusPatch:
    def test_conditions_follow_the_lifecycle(self) -> None:
        status: dict[str, Any] = {"phase": "Pending", "conditions": [cond(ConditionType.CREATED, Reason.RESOURCES_CREATED)]}
        for j, expected in [(job(active=1), "Initializing"), (job(active=1, ready=1), "Running"),
                            (job(conditions=[cond("Complete")]), "Succeeded")]:
            patch = phases.status_patch(status, observe(j), generation=1, timestamp="2026-01-01T03:00:00Z")
            status = {**status, **patch}
            assert status["phase"] == expected
        by_type = {c["type"]: c for c in status["conditions"]}
        assert by_type["Created"]["status"] == "True"
        assert by_type["Initializing"]["status"] == "False" and by_type["Running"]["status"] == "False"
        assert by_type["Succeeded"]["status"] == "True" and by_type["Succeeded"]["observedGeneration"] == 1
        assert "Failed" not in by_type

    def test_unchanged_status_gives_an_empty_patch_and_keeps_transition_times(self) -> None:
        first = phases.status_patch({}, observe(job(active=1, ready=1)), generation=1, timestamp="2026-01-01T03:00:00Z")
        again = phases.status_patch(first, observe(job(active=1, ready=1)), generation=1, timestamp="2026-01-01T04:00:00Z")
        assert again == {}

    def test_trainer_fields_are_never_in_the_patch(self) -> None:
        status = {"progress": {"step": 10}, "checkpoints": [{"step": 5, "path": "/x"}], "latestCheckpoint": "/x",
                  "conditions": [cond(ConditionType.EARLY_STOPPED, Reason.METRIC_PLATEAU)]}
        patch = phases.status_patch(status, observe(job(conditions=[cond("Complete")])), generation=1)
        assert not {"progress", "checkpoints", "latestCheckpoint", "bestCheckpoint", "trials"} & set(patch)
        assert any(c["type"] == ConditionType.EARLY_STOPPED for c in patch["conditions"])  # kept, not dropped

    def test_the_trainers_early_stop_becomes_the_early_stopped_condition(self) -> None:
        why = "eval_loss did not improve by more than 0.01 for 3 evaluations (best 2.1 at step 2)"
        status = {"progress": {"step": 8, "totalSteps": 40, "stopReason": f"early-stopped: {why}"}}
        patch = phases.status_patch(status, observe(job(conditions=[cond("Complete")])), generation=1)
        stopped = next(c for c in patch["conditions"] if c["type"] == ConditionType.EARLY_STOPPED)
        assert (stopped["status"], stopped["reason"]) == ("True", Reason.METRIC_PLATEAU)
        assert why in stopped["message"]
        assert patch["phase"] == "Succeeded"  # an early stop is a success
        assert phases.status_patch({**status, **patch}, observe(job(conditions=[cond("Complete")])), generation=1) == {}

    def test_a_run_that_did_all_its_steps_has_no_early_stopped_condition(self) -> None:
        for reason in ("completed", "max-steps", None):
            status = {"progress": {"step": 40, "totalSteps": 40, "stopReason": reason}}
            patch = phases.status_patch(status, observe(job(conditions=[cond("Complete")])), generation=1)
            assert ConditionType.EARLY_STOPPED not in {c["type"] for c in patch["conditions"]}, reason

    def test_a_finished_job_stays_finished(self) -> None:
        assert phases.status_patch({"phase": "Succeeded"}, observe(job(active=1)), generation=1) == {}

    def test_a_finished_status_is_kept_when_its_pods_or_job_go(self) -> None:
        """Found by tests/operator/test_children_deleted.py: deleting a failed run's pod rewrote its
        message (the pod's exit detail was gone) and posted a new Event."""
        failed = job(conditions=[cond("Failed", reason="BackoffLimitExceeded", message="backoff limit")])
        crashed = {"metadata": {"name": "p-0"}, "status": {"containerStatuses": [
            {"state": {"terminated": {"exitCode": 1, "message": "loss is nan at step 7"}}}]}}
        status = phases.status_patch({}, phases.observe(failed, [crashed], user_suspended=False, queue=None), generation=1)
        assert "loss is nan" in status["message"]
        assert phases.status_patch(status, observe(failed), generation=1) == {}  # the pod is gone: nothing changes
        assert phases.status_patch(status, observe(job(conditions=[cond("Complete")])), generation=1) == {}

    def test_resume_marks_suspended_false(self) -> None:
        status = phases.status_patch({}, observe(job(suspend=True), suspended=True), generation=1)
        status = {**status, **phases.status_patch(status, observe(job(active=1, ready=1)), generation=2)}
        suspended = next(c for c in status["conditions"] if c["type"] == "Suspended")
        assert (suspended["status"], suspended["reason"]) == ("False", Reason.RESUMED)
