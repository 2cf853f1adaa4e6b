"""The fetch step in the trainer pods: an init container for jobs with s3:// or hf:// sources, the
S3 credentials only as Secret references, and the phase while it runs.

Builders stay pure and every object passes kubernetes-validate (as in ``test_building.py``).
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api import SpecError, parse_job
from kubetune.operator import building, phases
from tests.operator.test_building import env_of, job_of, manifest, validate

S3_SPEC = {
    "model": {"source": "s3://models/llama", "credentialsSecret": {"name": "store"}},
    "data": {"datasets": [{"source": "s3://data/train.jsonl", "format": "text"}]},
    "output": {"path": "s3://results/llama-sft"},
    "s3": {"endpointUrl": "http://minio.storage:9000", "region": "eu-west-1"},
    "resources": {"gpusPerNode": 1, "cpu": "4", "memory": "16Gi"},
}


def pod_of(job: Any) -> dict[str, Any]:
    built = building.build_job(job)
    validate(built)
    return dict(built["spec"]["template"]["spec"])


class TestFetchInitContainer:
    def test_s3_sources_are_fetched_once_into_the_volume_by_an_init_container(self) -> None:
        job = job_of(**S3_SPEC)
        pod = pod_of(job)
        [fetch] = pod["initContainers"]
        assert fetch["name"] == building.FETCH_CONTAINER_NAME
        assert fetch["command"] == ["python", "-m", "kubetune.trainer.fetching", "--config", building.CONFIG_PATH]
        assert fetch["image"] == pod["containers"][0]["image"]
        mounts = {m["mountPath"]: m for m in fetch["volumeMounts"]}
        assert "/workspace" in mounts and not mounts["/workspace"].get("readOnly")
        fetch_env = {e["name"]: e.get("value", e.get("valueFrom")) for e in fetch["env"]}
        assert fetch_env["KUBETUNE_FETCH_DIR"] == building.FETCH_DIR and building.FETCH_DIR.startswith("/workspace/")
        assert env_of(building.build_job(job))["KUBETUNE_FETCH_DIR"] == building.FETCH_DIR  # the trainer reads the same
        assert fetch["securityContext"] == pod["containers"][0]["securityContext"]
        assert "nvidia.com/gpu" not in fetch["resources"]["requests"]  # downloading needs no GPU
        assert fetch["resources"]["requests"] == {"cpu": "4", "memory": "16Gi"}

    def test_a_bad_source_in_the_fetch_step_fails_the_job_at_once(self) -> None:
        rules = building.build_job(job_of(**S3_SPEC))["spec"]["podFailurePolicy"]["rules"]
        assert {r["onExitCodes"]["containerName"] for r in rules} == {building.CONTAINER_NAME, building.FETCH_CONTAINER_NAME}
        assert all(r["action"] == "FailJob" and r["onExitCodes"]["values"] == [2] for r in rules)

    def test_hub_sources_are_fetched_too_and_the_trainer_stays_offline(self) -> None:
        pod = pod_of(job_of())  # hf://meta-llama/Llama-3.2-1B
        assert [c["name"] for c in pod["initContainers"]] == [building.FETCH_CONTAINER_NAME]
        fetch_env = {e["name"] for e in pod["initContainers"][0]["env"]}
        assert "HF_HUB_OFFLINE" not in fetch_env  # the fetcher downloads
        assert env_of(building.build_job(job_of()))["HF_HUB_OFFLINE"] == "1"
        # docs/sources.md: the caches on the job's volume, where the next node and a restarted pod find them
        fetch_values = {e["name"]: e.get("value") for e in pod["initContainers"][0]["env"]}
        assert fetch_values["HF_HOME"] == env_of(building.build_job(job_of()))["HF_HOME"] == "/workspace/cache/huggingface"
        assert building.FETCH_DIR == "/workspace/cache/sources"

    def test_local_sources_need_no_fetch_step(self) -> None:
        job = job_of(model={"source": "pvc://models/llama"})
        pod = pod_of(job)
        assert "initContainers" not in pod
        assert [r["onExitCodes"]["containerName"] for r in building.build_job(job)["spec"]["podFailurePolicy"]["rules"]] == ["trainer"]

    def test_builders_are_pure(self) -> None:
        job = job_of(**S3_SPEC)
        assert building.plan(job) == building.plan(job)
        for obj in building.plan(job):
            validate(obj)


class TestS3Credentials:
    def test_keys_of_the_credentials_secret_reach_the_pod_only_as_references(self) -> None:
        env = env_of(building.build_job(job_of(**S3_SPEC)))
        assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "store", "key": "AWS_ACCESS_KEY_ID"}}
        assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "store", "key": "AWS_SECRET_ACCESS_KEY"}}
        assert env["AWS_SESSION_TOKEN"] == {"secretKeyRef": {"name": "store", "key": "AWS_SESSION_TOKEN", "optional": True}}
        assert "HF_TOKEN" not in env  # no hf:// source: the Secret need not hold a token key

    def test_without_a_secret_the_pod_uses_its_workload_identity(self) -> None:
        spec = {**S3_SPEC, "model": {"source": "s3://models/llama"}}
        env = env_of(building.build_job(job_of(**spec)))
        assert not any(name.startswith("AWS_ACCESS") or name.startswith("AWS_SECRET") for name in env)

    def test_hub_and_s3_sources_together_get_both(self) -> None:
        spec = {**S3_SPEC, "model": {"source": "hf://org/model", "credentialsSecret": {"name": "store", "key": "hf"}}}
        env = env_of(building.build_job(job_of(**spec)))
        assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "store", "key": "hf"}}
        assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "store", "key": "AWS_SECRET_ACCESS_KEY"}}

    def test_an_s3_output_alone_gets_the_keys_but_no_fetch_step(self) -> None:
        spec = {"model": {"source": "pvc://models/llama", "credentialsSecret": {"name": "store"}},
                "output": {"path": "s3://results/x"}}
        job = job_of(**spec)
        assert "initContainers" not in pod_of(job)
        assert env_of(building.build_job(job))["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "store"


@pytest.mark.parametrize("bad, field", [
    ({"endpointUrl": "minio:9000"}, "spec.s3.endpointUrl"),
    ({"region": "EU West"}, "spec.s3.region"),
    ({"endpoint": "http://x"}, "spec.s3.endpoint"),
])
def test_a_bad_s3_block_is_refused_with_its_field_path(bad: dict[str, str], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_job(manifest(**{**S3_SPEC, "s3": bad}))
    assert field in str(caught.value), str(caught.value)


def _job(active: int = 1, failed: dict[str, Any] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"active": active, "startTime": "2026-12-06T10:00:00Z"}
    if failed:
        status["conditions"] = [failed]
    return {"metadata": {"name": "j"}, "spec": {"completions": 2}, "status": status}


def _pod(init_state: dict[str, Any], phase: str = "Pending") -> dict[str, Any]:
    return {"metadata": {"name": "j-0-abc", "creationTimestamp": "2026-12-06T10:00:00Z"},
            "status": {"phase": phase, "initContainerStatuses": [{"name": "fetch", "state": init_state}],
                       "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "PodInitializing"}}}]}}


def test_the_phase_stays_initializing_while_the_fetch_step_runs() -> None:
    obs = phases.observe(_job(), [_pod({"running": {"startedAt": "2026-12-06T10:00:05Z"}})], user_suspended=False, queue=None)
    assert obs is not None and obs.phase == "Initializing"
    patch = phases.status_patch({}, obs, generation=1)
    assert patch["phase"] == "Initializing"


def test_a_fetch_step_that_cannot_read_a_source_fails_the_job_with_its_message() -> None:
    message = "spec.model.source: bucket 'models' does not exist (from 's3://models/llama')"
    pod = _pod({"terminated": {"exitCode": 2, "reason": "Error", "message": message}}, phase="Failed")
    failed = {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "Container fetch ... exit code 2",
              "lastTransitionTime": "2026-12-06T10:01:00Z"}
    obs = phases.observe(_job(active=0, failed=failed), [pod], user_suspended=False, queue=None)
    assert obs is not None and obs.phase == "Failed"
    assert message in obs.message
