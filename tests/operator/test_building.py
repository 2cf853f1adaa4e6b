"""The builders: one class per object the operator makes, checked as a user and the API server would.

Every rendered object must pass ``kubernetes-validate`` (the offline OpenAPI schemas of the
Kubernetes release the chart targets, strict: unknown fields are errors), and the contract the
trainer relies on (config path, env, volumes, launcher) is asserted field by field.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest

from kubetune.api import KUEUE_QUEUE_LABEL, FineTuneJob, parse_job
from kubetune.operator import building, naming
from kubetune.operator.building import BuildOptions

K8S_VERSION = "1.33.0"
UID = "0b8a6d1e-5a1c-4c3e-9d0e-2f1d2c3b4a59"


def manifest(name: str = "llama-sft", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"source": "hf://meta-llama/Llama-3.2-1B"},
        "data": {"datasets": [{"source": "data/train.jsonl", "format": "instruction"}]},
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ml", "uid": UID, "generation": 1},
        "spec": base,
    }


def job_of(name: str = "llama-sft", **spec: Any) -> FineTuneJob:
    if (spec.get("resources") or {}).get("nodes", 1) > 1:
        spec.setdefault("checkpointing", {"storage": {"accessMode": "ReadWriteMany"}})
    return parse_job(manifest(name, **spec))


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def env_of(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


class TestConfigMap:
    def test_holds_the_validated_manifest_the_trainer_parses(self) -> None:
        job = job_of(training={"maxSteps": 10, "learningRate": 1e-4}, peft={"method": "lora", "r": 8})
        cm = building.build_config_map(job)
        validate(cm)
        parsed = parse_job(json.loads(cm["data"][building.CONFIG_FILE]))
        assert parsed.spec == job.spec
        assert parsed.name == "llama-sft" and parsed.namespace == "ml" and parsed.metadata.uid == UID
        assert cm["immutable"] is True

    def test_owned_by_the_finetunejob(self) -> None:
        ref = building.build_config_map(job_of())["metadata"]["ownerReferences"][0]
        assert ref == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "llama-sft",
                       "uid": UID, "controller": True, "blockOwnerDeletion": True}


class TestService:
    def test_headless_and_selects_only_this_jobs_pods(self) -> None:
        job = job_of(resources={"nodes": 2})
        svc = building.build_service(job, BuildOptions(rendezvous_port=29400))
        assert svc is not None
        validate(svc)
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["publishNotReadyAddresses"] is True
        pod_labels = building.build_job(job)["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        other = building.build_service(job_of("other", resources={"nodes": 2}))
        assert other is not None and other["spec"]["selector"] != svc["spec"]["selector"]
        assert svc["spec"]["ports"][0]["port"] == 29400

    @pytest.mark.parametrize("processes", [1, 4])
    def test_one_node_meets_on_loopback_with_no_service(self, processes: int) -> None:
        # One pod: its processes (torchrun's static rendezvous on node rank 0, or a single process,
        # which uses no network at all) meet on 127.0.0.1; no Service, no subdomain, no DNS wait.
        job = job_of(resources={"nodes": 1, "processesPerNode": processes, "cpu": "4"})
        assert building.build_service(job) is None
        objects = building.plan(job)
        assert "Service" not in [o["kind"] for o in objects]
        built = objects[-1]
        assert env_of(built)["MASTER_ADDR"] == "127.0.0.1" and env_of(built)["NNODES"] == "1"
        assert "subdomain" not in built["spec"]["template"]["spec"]
        command = built["spec"]["template"]["spec"]["containers"][0]["command"]
        assert ("--master-addr=$(MASTER_ADDR)" in command) == (processes > 1)


class TestClaim:
    def test_survives_the_job_by_default(self) -> None:
        claim = building.build_claim(job_of(checkpointing={"storage": {"size": "50Gi", "storageClassName": "fast"}}))
        assert claim is not None
        validate(claim)
        assert "ownerReferences" not in claim["metadata"]
        assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
        assert claim["spec"]["storageClassName"] == "fast"
        assert claim["metadata"]["annotations"][naming.ANNOTATION_JOB_UID] == UID

    def test_owned_only_when_delete_with_job(self) -> None:
        claim = building.build_claim(job_of(checkpointing={"storage": {"deleteWithJob": True}}))
        assert claim is not None and claim["metadata"]["ownerReferences"][0]["uid"] == UID

    def test_existing_claim_is_used_not_created(self) -> None:
        job = job_of(checkpointing={"storage": {"existingClaim": "team-weights"}})
        assert building.build_claim(job) is None
        volumes = building.build_job(job)["spec"]["template"]["spec"]["volumes"]
        assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "team-weights"}} in volumes


class TestRbac:
    def test_trainer_may_only_read_and_patch_the_status_of_its_own_job(self) -> None:
        job = job_of()
        sa, role, binding = building.build_service_account(job), building.build_role(job), building.build_role_binding(job)
        for obj in (sa, role, binding):
            assert obj is not None
            validate(obj)
        assert role is not None and binding is not None and sa is not None
        rules = {(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["resourceNames"]), tuple(r["verbs"])) for r in role["rules"]}
        assert rules == {
            (("kubetune.io",), ("finetunejobs/status",), ("llama-sft",), ("get", "patch")),
            (("kubetune.io",), ("finetunejobs",), ("llama-sft",), ("get",)),
        }
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ml"}]
        pod = building.build_job(job)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == sa["metadata"]["name"]

    def test_a_named_service_account_replaces_the_per_job_rbac(self) -> None:
        job = job_of(resources={"serviceAccountName": "platform-trainer"})
        assert building.build_service_account(job) is None and building.build_role(job) is None
        assert building.build_role_binding(job) is None
        assert building.build_job(job)["spec"]["template"]["spec"]["serviceAccountName"] == "platform-trainer"


class TestJob:
    def test_single_process_runs_the_trainer_directly(self) -> None:
        job = building.build_job(job_of())
        validate(job)
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", "kubetune.trainer", "--config", "/etc/kubetune/job.json"]
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
        assert "resources" not in container  # no GPU request on CPU, nothing set

    def test_multi_node_gpu_job_launches_torchrun_with_the_rendezvous_on_node_zero(self) -> None:
        job = job_of(resources={"nodes": 4, "gpusPerNode": 8, "cpu": "32", "memory": "256Gi"})
        built = building.build_job(job)
        validate(built)
        pod = built["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["command"][:3] == ["python", "-m", "kubetune.trainer.launching"]
        assert "--node-rank=$(NODE_RANK)" in container["command"]
        assert container["command"][-4:] == ["-m", "kubetune.trainer", "--config", "/etc/kubetune/job.json"]
        env = env_of(built)
        names = naming.names_for("llama-sft")
        assert env["MASTER_ADDR"] == f"{names.job}-0.{names.service}"
        assert pod["subdomain"] == names.service
        assert env["NNODES"] == "4" and env["NPROC_PER_NODE"] == "8" and env["OMP_NUM_THREADS"] == "4"
        assert env["NODE_RANK"] == {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
        assert built["spec"]["completions"] == built["spec"]["parallelism"] == 4
        assert container["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"}
        assert container["resources"]["requests"] == container["resources"]["limits"]  # spec-reference: request and limit

    def test_cpu_processes_use_torchrun_without_gpu_requests(self) -> None:
        built = building.build_job(job_of(resources={"processesPerNode": 2, "cpu": "4"}))
        container = built["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][:3] == ["python", "-m", "kubetune.trainer.launching"]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert env_of(built)["OMP_NUM_THREADS"] == "2"

    def test_jobs_sharing_an_existing_claim_each_get_their_own_folder(self) -> None:
        """Two jobs on one claim never resume from or overwrite each other's checkpoints/output;
        an earlier job's output on the same claim is still readable as a pvc:// source."""
        storage = {"storage": {"existingClaim": "team-store"}}
        mounts = {}
        for name in ("first", "second"):
            built = building.build_job(job_of(name, checkpointing=storage, model={"source": "pvc://team-store/first/output"}))
            validate(built)
            pod = built["spec"]["template"]["spec"]
            container = pod["containers"][0]
            mounts[name] = {m["mountPath"]: m for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            workspace = mounts[name]["/workspace"]
            assert volumes[workspace["name"]]["persistentVolumeClaim"]["claimName"] == "team-store"
            assert workspace["subPath"] == name
            source = mounts[name]["/mnt/pvc/team-store"]
            assert source["readOnly"] and "subPath" not in source
        own = building.build_job(job_of("own"))["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        assert all("subPath" not in m for m in own), "a job's own claim is mounted whole"

    def test_trainer_environment_contract(self) -> None:
        env = env_of(building.build_job(job_of()))
        assert env["KUBETUNE_JOB_NAME"] == "llama-sft"
        assert env["KUBETUNE_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
        assert env["KUBETUNE_JOB_UID"] == {"fieldRef": {"fieldPath": "metadata.annotations['kubetune.io/job-uid']"}}
        assert env["KUBETUNE_OUTPUT_DIR"] == "/workspace/output"
        assert env["KUBETUNE_CHECKPOINT_DIR"] == "/workspace/checkpoints"
        assert env["KUBETUNE_BASE_DIR"] == "/opt/kubetune/examples"
        assert set(env) == set(building.TRAINER_ENV_DOC)
        annotations = building.build_job(job_of())["spec"]["template"]["metadata"]["annotations"]
        assert annotations[naming.ANNOTATION_JOB_UID] == UID

    def test_the_output_path_is_a_folder_of_the_workspace_volume(self) -> None:
        job = job_of(output={"path": "models/final"})
        assert env_of(building.build_job(job))["KUBETUNE_OUTPUT_DIR"] == "/workspace/models/final"
        mounts = building.build_job(job)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/workspace" and m["name"] == "workspace" for m in mounts)

    def test_hf_token_only_from_the_secret_reference(self) -> None:
        assert "HF_TOKEN" not in env_of(building.build_job(job_of()))
        job = job_of(model={"source": "hf://meta-llama/Llama-3.2-1B", "credentialsSecret": {"name": "hf", "key": "tok"}})
        assert env_of(building.build_job(job))["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}

    def test_pod_is_locked_down_and_has_time_to_checkpoint(self) -> None:
        built = building.build_job(job_of(resources={"shmSize": "16Gi"}), BuildOptions(termination_grace_seconds=600))
        pod = built["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000  # docs/operations.md: uid 1000 by default
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert {"/workspace", "/tmp", "/dev/shm"} <= writable  # caches live under HOME=/tmp and /workspace/cache
        env = env_of(built)
        assert env["HOME"].startswith("/tmp") and env["HF_HOME"].startswith("/workspace/")
        assert pod["terminationGracePeriodSeconds"] == 600
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts["/etc/kubetune"]["readOnly"] is True and "/workspace" in mounts and "/dev/shm" in mounts

    def test_scheduling_fields_pass_through(self) -> None:
        affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}}
        built = building.build_job(job_of(resources={
            "gpusPerNode": 1, "nodeSelector": {"pool": "gpu"}, "priorityClassName": "high",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": affinity, "image": "registry.example/trainer:1", "imagePullPolicy": "Always"}))
        validate(built)
        pod = built["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"pool": "gpu"} and pod["priorityClassName"] == "high"
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["affinity"] == affinity
        assert pod["containers"][0]["image"] == "registry.example/trainer:1"
        assert pod["containers"][0]["imagePullPolicy"] == "Always"

    def test_default_image_and_pull_secrets_come_from_the_operator(self) -> None:
        built = building.build_job(job_of(), BuildOptions(trainer_image="mirror.local/trainer:2",
                                                          image_pull_secrets=("regcred",)))
        validate(built)
        assert built["spec"]["template"]["spec"]["containers"][0]["image"] == "mirror.local/trainer:2"
        assert built["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]

    def test_run_policy_maps_onto_the_job(self) -> None:
        built = building.build_job(job_of(runPolicy={"suspend": True, "backoffLimit": 7,
                                                     "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60}))
        spec = built["spec"]
        assert (spec["suspend"], spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (True, 7, 3600, 60)

    @pytest.mark.parametrize("where", ["label", "spec"])
    def test_kueue_queue_is_copied_and_the_job_starts_suspended(self, where: str) -> None:
        m = manifest()
        if where == "label":
            m["metadata"]["labels"] = {KUEUE_QUEUE_LABEL: "team-a"}
        else:
            m["spec"]["resources"] = {"queueName": "team-a"}
        built = building.build_job(parse_job(m))
        assert built["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"
        assert built["spec"]["suspend"] is True

    def test_the_kueue_label_wins_over_queue_name(self) -> None:
        """docs/kueue.md: with both set, the FineTuneJob's label names the queue."""
        m = manifest()
        m["metadata"]["labels"] = {KUEUE_QUEUE_LABEL: "from-label"}
        m["spec"]["resources"] = {"queueName": "from-spec"}
        built = building.build_job(parse_job(m))
        assert built["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "from-label"
        assert built["spec"]["suspend"] is True

    def test_pvc_sources_are_mounted_read_only(self) -> None:
        job = job_of(model={"source": "pvc://models/llama-3"},
                     data={"datasets": [{"source": "pvc://corpora/a.jsonl", "format": "text"},
                                        {"source": "pvc://models/extra.jsonl", "format": "text"}]})
        pod = building.build_job(job)["spec"]["template"]["spec"]
        claims = [v["persistentVolumeClaim"] for v in pod["volumes"] if v["name"].startswith("source-")]
        assert claims == [{"claimName": "models", "readOnly": True}, {"claimName": "corpora", "readOnly": True}]
        mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"].startswith("source-")]
        assert mounts == ["/mnt/pvc/models", "/mnt/pvc/corpora"]


class TestPlan:
    def test_every_object_is_valid_and_the_job_comes_last(self) -> None:
        objects = building.plan(job_of(resources={"nodes": 2, "gpusPerNode": 4}))
        for obj in objects:
            validate(obj)
        assert [o["kind"] for o in objects] == [
            "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "PersistentVolumeClaim", "Service", "Job"]
        assert all(o["metadata"]["namespace"] == "ml" for o in objects)
        # docs/client.md: deleting the FineTuneJob takes everything but the claim with it (garbage collection)
        owned = {o["kind"] for o in objects if [r["uid"] for r in o["metadata"].get("ownerReferences", [])] == [UID]}
        assert owned == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "Job"}

    @pytest.mark.parametrize("name", [
        "a" * 253,
        "x" * 60 + ".with.dots." + "y" * 100,
        "0-starts-with-a-digit",
        "team.a.llama-3.1-70b-instruct-sft-on-the-very-long-support-tickets-dataset",
        "a",
    ])
    def test_long_and_odd_names_give_valid_objects(self, name: str) -> None:
        objects = building.plan(job_of(name, resources={"nodes": 3}))  # ReadWriteMany added by job_of
        for obj in objects:
            validate(obj)
            assert len(obj["metadata"]["name"]) <= 63
        job = objects[-1]
        assert len(job["metadata"]["name"]) + len("-1023") <= 63  # pod hostnames <job>-<index>
        env = env_of(job)
        assert all(len(part) <= 63 for part in env["MASTER_ADDR"].split("."))
        assert job["metadata"]["annotations"][naming.ANNOTATION_JOB] == name

    def test_render_without_uid_has_no_owner_references(self) -> None:
        m = manifest()
        del m["metadata"]["uid"]
        assert all("ownerReferences" not in o["metadata"] for o in building.plan(parse_job(m)))

    def test_techniques_summary_for_the_printer_column(self) -> None:
        job = job_of(peft={"method": "lora"}, techniques={"regularization": {}, "curriculum": {}})
        assert building.techniques_summary(job) == "lora,regularization,curriculum"
        assert building.techniques_summary(job_of()) == "full"
