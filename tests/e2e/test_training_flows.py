"""From ``kubectl apply`` of a FineTuneJob to a trained model: the real operator and the real trainer.

The operator runs as ``kubetune operator`` (a process) against the API server emulator; the test's
:class:`~tests.support.kubelet.LocalNode` plays the Job controller and the kubelet, so the trainer
Job the operator makes is run from its own pod template (command, env with the downward API, the
ConfigMap's job.json as a mounted file, the workspace claim as a folder) as a local process that
reports to the emulator as a pod would. The model is a tiny random-init Llama and the data a tiny
jsonl, both shipped in the "image" at ``/opt/kubetune/examples`` and named in the manifest by
paths relative to it (``KUBETUNE_BASE_DIR``), as in the examples.

Shown: the happy path (progress, checkpoints, output, phase, conditions; the operator never writes
the trainer's fields), a pod SIGKILLed after its first checkpoint and replaced within backoffLimit
(resumes, exactly the requested steps, restarts counted), suspend (SIGTERM, checkpoint, Suspended)
and resume, bad data (exit code 2, the file and row in the Failed condition, no retries), and two
nodes: two pods launched by torchrun meeting at ``<job>-0.<service>`` (the headless Service).
A real cluster runs real pods, so these have no ``-m k8s`` variant.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune import client as kclient
from kubetune.api import ConditionType, Reason
from kubetune.operator import building, kubeapi, naming
from kubetune.trainer.running import EXIT_BAD_INPUT, EXIT_OK, EXIT_TERMINATED
from tests.operator.operating import FTJ, condition, events, wait_event
from tests.support.clusters import Cluster
from tests.support.emulating import Address
from tests.support.kubelet import KUBELET_USER_AGENT, LocalNode, PodRun
from tests.support.tiny_models import manifest as tiny_manifest
from tests.support.tiny_models import tiny_model, write_dataset

pytestmark = pytest.mark.slow

EXAMPLES = "/opt/kubetune/examples"
TEST_USER_AGENT = "kubetune-tests/kubectl"
TRAINER_FIELDS = {"progress", "checkpoints", "latestCheckpoint", "bestCheckpoint", "outputPath", "trials", "bestTrial"}
OPERATOR_FIELDS = {"phase", "conditions", "message", "startTime", "completionTime", "restarts", "observedGeneration"}


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture()
def image(tmp_path: Path, tiny_llama: Path) -> Path:
    """What the trainer image ships at /opt/kubetune/examples: the model and the data of these tests."""
    examples = tmp_path / "image-examples"
    (examples / "models").mkdir(parents=True)
    (examples / "models" / "tiny-llama").symlink_to(tiny_llama, target_is_directory=True)
    write_dataset(examples / "data" / "train.jsonl", "text", n=32)
    return examples


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def operator(emulated_cluster: Cluster, kubeconfig_file: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``kubetune operator`` watching the test's namespace, as a process."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig_file), "KUBETUNE_TRAINER_IMAGE": "example.test/kubetune-trainer:e2e",
           # a free port: other test runs on this machine may hold torch's default 29500
           "KUBETUNE_RENDEZVOUS_PORT": str(_free_port()), "KUBETUNE_HEALTH_PORT": "0"}
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kubetune.cli", "operator", "--namespace", emulated_cluster.namespace],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            output = log_path.read_text(errors="replace")
        assert process.returncode == 0, output[-5000:]
        assert "Traceback" not in output, output[-5000:]


@pytest.fixture()
def node(emulated_cluster: Cluster, kubeconfig_file: Path, image: Path, tmp_path: Path,
         operator: subprocess.Popen[bytes]) -> Iterator[LocalNode]:
    emulated_cluster.api_client.user_agent = TEST_USER_AGENT  # the user's kubectl, told apart from the trainer
    with LocalNode(kubeconfig_file, emulated_cluster.namespace, tmp_path / "node",
                   image_files={EXAMPLES: image}) as local:
        assert emulated_cluster.emulator is not None and emulated_cluster.emulator.emulator is not None
        emulated_cluster.emulator.emulator.pod_logs = local.log_file  # pods/<name>/log reads the node's files
        yield local
        local.check()


# ---------------------------------------------------------------------------------- helpers


def job_manifest(name: str, **overrides: Any) -> dict[str, Any]:
    """A tiny text job; the model and data are relative paths, resolved against the image's examples."""
    return tiny_manifest("models/tiny-llama", "data/train.jsonl", "text", name=name, overrides={
        "training.microBatchSize": 2, "training.maxSeqLength": 32, "training.logEverySteps": 1, **overrides})


def ftj_status(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.get(*FTJ, name).get("status") or {}


def wait(cluster: Cluster, node: LocalNode, probe: Callable[[], Any], what: str, timeout: float = 90) -> Any:
    def checked() -> Any:
        node.check()
        return probe()
    return cluster.wait_for(checked, timeout=timeout, interval=0.05, what=what)


def signalled_while_stopped(cluster: Cluster, node: LocalNode, run: Any, act: Callable[[], Any]) -> None:
    """Stop the pod's processes (SIGSTOP), ``act`` (which makes the kubelet send SIGTERM), wait until
    the kubelet has sent it, then let the processes go on (SIGCONT): the trainer meets the SIGTERM at
    the step it was stopped at, however fast it trains and however late a loaded machine lets this
    test see its progress (under load the run used to reach its last step before the SIGTERM)."""
    node.kill(run, signal.SIGSTOP)
    try:
        act()
        wait(cluster, node, lambda: run.sigterm_at is not None, "the kubelet's SIGTERM", timeout=60)
    finally:
        node.kill(run, signal.SIGCONT)


def wait_phase(cluster: Cluster, node: LocalNode, name: str, phase: str, timeout: float = 90) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        status = ftj_status(cluster, name)
        other = status.get("phase")
        if other in ("Succeeded", "Failed") and other != phase:
            logs = "\n".join(f"--- pod {run.name} (exit {run.exit_code}):\n{run.log()[-3000:]}" for run in node.pods_of(name))
            raise AssertionError(f"{name} ended {other}, not {phase}: {status.get('message')}\n{logs}")
        return status if other == phase else None
    return wait(cluster, node, reached, f"{name} in phase {phase}", timeout)


def phases_seen(cluster: Cluster, name: str) -> list[str]:
    """Every phase the FineTuneJob went through, in order (from the emulator's history)."""
    assert cluster.emulator is not None
    history = cluster.emulator.call(lambda: [
        dict(version) for key, obj in cluster.emulator.emulator.objects.items()  # type: ignore[union-attr]
        if key[0].plural == "finetunejobs" and key[2] == name for version in [obj.raw, *obj.history]])
    ordered = sorted(history, key=lambda o: int(o["metadata"]["resourceVersion"]))
    seen: list[str] = []
    for version in ordered:
        phase = (version.get("status") or {}).get("phase")
        if phase and (not seen or seen[-1] != phase):
            seen.append(phase)
    return seen


def requests_by(cluster: Cluster) -> Iterator[tuple[str, str, Address, Any]]:
    """(who, verb, address, body) of every API request since the operator started; who is operator,
    node, test (the user's kubectl) or trainer (anything else: the trainer's client has no agent of its own)."""
    assert cluster.emulator is not None
    verbs = {"GET": "get", "PATCH": "patch", "PUT": "update", "POST": "create", "DELETE": "delete"}
    started = False
    for request in list(cluster.emulator.emulator):  # type: ignore[union-attr]
        address = Address.parse(request.url.path)
        if address is None:
            continue  # discovery
        agent = request.headers.get("User-Agent", "")
        who = ("operator" if agent.startswith((kubeapi.USER_AGENT, "kopf")) else "node" if agent == KUBELET_USER_AGENT
               else "test" if agent in (TEST_USER_AGENT, kclient.USER_AGENT) else "trainer")
        started = started or who == "operator"
        if not started:
            continue  # the fixtures' setup (the namespace)
        verb = verbs[request.method.value.upper()]
        if verb == "get" and address.name is None:
            verb = "watch" if request.params.get("watch") in ("true", "1") else "list"
        yield who, verb, address, request.data


def assert_each_side_writes_its_own_status(cluster: Cluster, name: str) -> None:
    """The trainer writes progress and checkpoints, the operator phase and conditions; never the other's."""
    writes = [(who, set(((body or {}).get("status") or {}).keys())) for who, verb, address, body in requests_by(cluster)
              if verb in ("patch", "update") and address.plural == "finetunejobs" and address.name == name
              and address.subresource == "status"]
    assert {who for who, _ in writes} == {"operator", "trainer"}, writes
    for who, fields in writes:
        assert not fields & (TRAINER_FIELDS if who == "operator" else OPERATOR_FIELDS), (who, fields)


def assert_trainer_stayed_within_its_role(cluster: Cluster, name: str) -> None:
    """Every request of the trainer pods is one the job's Role allows (the emulator enforces no RBAC)."""
    role = cluster.get("rbac.authorization.k8s.io/v1", "Role", naming.names_for(name).role)
    made = {(verb, address.group, address.plural + (f"/{address.subresource}" if address.subresource else ""),
             address.name) for who, verb, address, _ in requests_by(cluster) if who == "trainer"}
    assert made, "the trainer made no requests"
    for verb, group, resource, obj in made:
        assert any(group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
                   and obj in rule.get("resourceNames", [obj]) for rule in role["rules"]), (verb, group, resource, obj)


def training_log(node: LocalNode, run: PodRun) -> list[dict[str, Any]]:
    """The trainer's per-step log on the workspace claim (appended across pods)."""
    path = node.host_path(run, "/workspace/output/trainer_log.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def resumed_at(run: PodRun) -> tuple[str, int]:
    found = re.search(r"resumed from (\S+) at step (\d+)", run.log())
    assert found, f"pod {run.name} did not resume:\n{run.log()[-3000:]}"
    return found.group(1), int(found.group(2))


def checkpoint_step(path: str) -> int:
    return int(Path(path).name.split("-")[-1])


# ---------------------------------------------------------------------------------- the flows


def test_apply_trains_reports_and_succeeds(emulated_cluster: Cluster, node: LocalNode) -> None:
    cluster = emulated_cluster
    cluster.create(job_manifest("happy", **{"training.maxSteps": 6, "checkpointing.everySteps": 3}))
    followed: list[kclient.Update] = []  # what kubetune submit --follow shows, from status and the pod log
    follower = threading.Thread(target=lambda: followed.extend(
        kclient.Client(namespace=cluster.namespace).follow("happy", poll=0.2, timeout=120)), daemon=True)
    follower.start()

    done = wait_phase(cluster, node, "happy", "Succeeded")
    follower.join(30)
    assert followed and followed[-1].kind == "end" and followed[-1].job.succeeded, [u.text for u in followed]
    assert followed[-1].text.startswith("training ended (")
    assert [u.job.progress.step for u in followed if u.kind == "progress"][-1] == 6
    assert [u.text.split(":")[0] for u in followed if u.kind == "checkpoint"] == ["checkpoint at step 3", "checkpoint at step 6"]
    pod_lines = [u.text for u in followed if u.kind == "log"]
    assert any("kubetune.trainer" in line for line in pod_lines), pod_lines  # the trainer's own log lines
    assert not any("kubetune.trainer.reporting: step" in line for line in pod_lines)  # shown from status instead
    [run] = node.pods_of("happy")
    assert run.exit_code == EXIT_OK, run.log()[-3000:]
    assert phases_seen(cluster, "happy")[-2:] == ["Running", "Succeeded"]
    assert "Failed" not in phases_seen(cluster, "happy")

    # what the trainer reported
    progress = done["progress"]
    assert progress["step"] == progress["totalSteps"] == 6
    assert progress["percent"] == 100 and math.isfinite(progress["loss"]) and progress["loss"] > 0
    assert math.isfinite(progress["evalLoss"])  # the manifest holds out a quarter of the rows
    assert [checkpoint_step(c["path"]) for c in done["checkpoints"]] == [3, 6]
    workspace = node.claim_dir(naming.names_for("happy").claim)
    assert done["latestCheckpoint"] == done["checkpoints"][-1]["path"]
    assert Path(done["latestCheckpoint"]).resolve() == (workspace / "checkpoints" / "step-00000006").resolve()
    assert Path(done["outputPath"]).resolve() == (workspace / "output").resolve()

    # what the operator wrote
    conditions = {c["type"]: c for c in done["conditions"]}
    assert conditions[ConditionType.CREATED]["status"] == "True"
    assert conditions[ConditionType.SUCCEEDED]["status"] == "True"
    assert conditions[ConditionType.SUCCEEDED]["reason"] == Reason.JOB_SUCCEEDED
    assert conditions[ConditionType.RUNNING]["status"] == "False"
    assert done["startTime"] <= done["completionTime"]
    assert done.get("restarts", 0) == 0
    reasons = [reason for _, reason, _ in events(cluster, "happy")]
    assert Reason.PODS_RUNNING in reasons and Reason.JOB_SUCCEEDED in reasons

    # the pod ran from its template and ended as a pod does
    pod = cluster.get("v1", "Pod", run.name)
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    job = cluster.get("batch/v1", "Job", "happy")
    assert job["status"]["succeeded"] == 1 and job["status"].get("failed", 0) == 0

    # the model is in the output folder of the workspace claim, and it was trained
    import torch
    import transformers

    output = workspace / "output"
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(output))
    initial = transformers.AutoModelForCausalLM.from_pretrained(str(node.host_path(run, f"{EXAMPLES}/models/tiny-llama")))
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), initial.state_dict().values()))
    transformers.AutoTokenizer.from_pretrained(str(output))

    # each side wrote only its own status fields: the operator never touched progress or checkpoints
    assert_each_side_writes_its_own_status(cluster, "happy")
    assert_trainer_stayed_within_its_role(cluster, "happy")


def test_an_early_stop_in_the_pod_is_the_early_stopped_condition(emulated_cluster: Cluster, node: LocalNode) -> None:
    cluster = emulated_cluster
    # a learning rate too small to move the eval loss: the first evaluation stays the best, the next
    # `patience` ones do not beat it, and the trainer stops long before maxSteps
    cluster.create(job_manifest("plateau", **{
        "training.maxSteps": 40, "training.learningRate": 1e-12, "data.eval.everySteps": 1,
        "checkpointing.everySteps": 100, "techniques.earlyStopping": {"patience": 2, "minDelta": 0.01}}))
    done = wait_phase(cluster, node, "plateau", "Succeeded")
    assert done["progress"]["step"] == 3 < done["progress"]["totalSteps"]  # best at step 1, then 2 evaluations
    assert done["progress"]["stopReason"].startswith("early-stopped: eval_loss did not improve")
    stopped = {c["type"]: c for c in done["conditions"]}[ConditionType.EARLY_STOPPED]
    assert (stopped["status"], stopped["reason"]) == ("True", Reason.METRIC_PLATEAU)
    assert done["progress"]["stopReason"].removeprefix("early-stopped: ") in stopped["message"]
    assert_each_side_writes_its_own_status(cluster, "plateau")


def test_a_killed_pod_is_replaced_and_training_resumes_to_exactly_the_requested_steps(
        emulated_cluster: Cluster, node: LocalNode) -> None:
    cluster = emulated_cluster
    steps = 120
    cluster.create(job_manifest("crash", **{"training.maxSteps": steps, "checkpointing.everySteps": 10,
                                            "data.eval": None, "runPolicy.backoffLimit": 2}))
    first = wait(cluster, node, lambda: (p := node.pods_of("crash")) and p[0], "the first pod")
    reported = wait(cluster, node, lambda: ftj_status(cluster, "crash").get("latestCheckpoint"), "a first checkpoint")
    node.kill(first, signal.SIGKILL)

    done = wait_phase(cluster, node, "crash", "Succeeded", timeout=120)
    first, second = node.pods_of("crash")
    assert first.exit_code == 128 + signal.SIGKILL and second.exit_code == 0, second.log()[-3000:]
    killed = cluster.get("v1", "Pod", first.name)["status"]
    assert killed["phase"] == "Failed"
    assert killed["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert cluster.get("batch/v1", "Job", "crash")["status"]["failed"] == 1
    assert done["restarts"] == 1

    resumed_from, resumed_step = resumed_at(second)
    workspace = node.claim_dir(naming.names_for("crash").claim)
    assert Path(resumed_from).resolve() == (workspace / "checkpoints" / f"step-{resumed_step:08d}").resolve()
    assert resumed_step >= checkpoint_step(reported) and resumed_step % 10 == 0 and resumed_step < steps
    logged = [entry["step"] for entry in training_log(node, second)]
    restart = len(logged) - 1 - logged[::-1].index(resumed_step + 1)  # the second pod's first step
    assert logged[:restart] == list(range(1, restart + 1))
    assert logged[restart:] == list(range(resumed_step + 1, steps + 1))  # exactly the requested steps
    assert done["progress"]["step"] == done["progress"]["totalSteps"] == steps
    assert checkpoint_step(done["latestCheckpoint"]) == steps
    assert_each_side_writes_its_own_status(cluster, "crash")  # restarts too is the operator's
    assert_trainer_stayed_within_its_role(cluster, "crash")


def test_suspend_checkpoints_on_sigterm_and_resume_continues_from_it(
        emulated_cluster: Cluster, node: LocalNode) -> None:
    cluster = emulated_cluster
    steps = 150
    cluster.create(job_manifest("pause", **{"training.maxSteps": steps, "checkpointing.everySteps": 1000,
                                            "data.eval": None}))
    wait(cluster, node, lambda: (ftj_status(cluster, "pause").get("progress") or {}).get("step", 0) >= 1,
         "training to start")
    [first] = node.pods_of("pause")
    signalled_while_stopped(cluster, node, first,
                            lambda: cluster.patch(*FTJ, "pause", {"spec": {"runPolicy": {"suspend": True}}}))

    suspended = wait_phase(cluster, node, "pause", "Suspended")
    assert node.pods_of("pause") == [first]
    wait(cluster, node, lambda: not first.alive, "the pod to stop", timeout=60)
    assert first.exit_code == EXIT_TERMINATED, first.log()[-3000:]
    wait(cluster, node, lambda: cluster.find("v1", "Pod", first.name) is None, "the pod to be removed")
    saved = wait(cluster, node, lambda: ftj_status(cluster, "pause").get("latestCheckpoint"), "the SIGTERM checkpoint")
    saved_step = checkpoint_step(saved)
    assert 1 <= saved_step < steps  # not a periodic one (every 1000): written on SIGTERM
    assert Path(saved).joinpath("trainer.json").exists()
    cond = condition(cluster, "pause", ConditionType.SUSPENDED)
    assert cond is not None and cond["status"] == "True" and cond["reason"] == Reason.SUSPENDED
    assert (suspended.get("restarts") or 0) == 0
    assert cluster.get("batch/v1", "Job", "pause")["status"].get("failed", 0) == 0  # suspension is no failure

    cluster.patch(*FTJ, "pause", {"spec": {"runPolicy": {"suspend": False}}})
    done = wait_phase(cluster, node, "pause", "Succeeded", timeout=120)
    first, second = node.pods_of("pause")
    assert second.exit_code == 0, second.log()[-3000:]
    resumed_from, resumed_step = resumed_at(second)
    assert resumed_step == saved_step and Path(resumed_from).resolve() == Path(saved).resolve()
    logged = [entry["step"] for entry in training_log(node, second)]
    assert logged[-(steps - saved_step):] == list(range(saved_step + 1, steps + 1))
    assert done["progress"]["step"] == steps
    assert condition(cluster, "pause", ConditionType.SUSPENDED)["status"] == "False"  # type: ignore[index]
    assert (done.get("restarts") or 0) == 0
    seen = phases_seen(cluster, "pause")
    after = seen[seen.index("Suspended"):]
    assert after[-2:] == ["Running", "Succeeded"] and "Failed" not in seen, seen
    assert_each_side_writes_its_own_status(cluster, "pause")


@pytest.mark.slow
def test_a_deleted_job_comes_back_and_training_resumes_from_its_checkpoint(
        emulated_cluster: Cluster, node: LocalNode) -> None:
    """``kubectl delete job`` in the middle of a run: its pod is stopped (SIGTERM: a checkpoint), the
    operator makes the Job again from the same spec, and the new pod resumes from that checkpoint
    to exactly the requested steps."""
    cluster = emulated_cluster
    steps = 150
    cluster.create(job_manifest("deleted", **{"training.maxSteps": steps, "checkpointing.everySteps": 1000,
                                              "data.eval": None}))
    wait(cluster, node, lambda: (ftj_status(cluster, "deleted").get("progress") or {}).get("step", 0) >= 1,
         "training to start")
    old_uid = cluster.get("batch/v1", "Job", "deleted")["metadata"]["uid"]
    [running] = node.pods_of("deleted")
    signalled_while_stopped(cluster, node, running, lambda: cluster.delete(  # what kubectl delete job does
        "batch/v1", "Job", "deleted", propagation_policy="Background"))
    [first] = wait(cluster, node, lambda: (p := node.pods_of("deleted")) and not p[0].alive and p, "the pod to stop", timeout=60)
    assert first.exit_code == EXIT_TERMINATED, first.log()[-3000:]
    saved = wait(cluster, node, lambda: ftj_status(cluster, "deleted").get("latestCheckpoint"), "the SIGTERM checkpoint")
    saved_step = checkpoint_step(saved)
    assert 1 <= saved_step < steps  # not a periodic one (every 1000): written on SIGTERM
    new = wait(cluster, node, lambda: (j := cluster.find("batch/v1", "Job", "deleted")) and j["metadata"]["uid"] != old_uid and j,
               "the Job made again", timeout=60)
    assert new["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"

    done = wait_phase(cluster, node, "deleted", "Succeeded", timeout=120)
    first, second = node.pods_of("deleted")
    assert second.exit_code == 0, second.log()[-3000:]
    resumed_from, resumed_step = resumed_at(second)
    assert resumed_step == saved_step and Path(resumed_from).resolve() == Path(saved).resolve()
    logged = [entry["step"] for entry in training_log(node, second)]
    assert logged[-(steps - saved_step):] == list(range(saved_step + 1, steps + 1))  # exactly the requested steps
    assert done["progress"]["step"] == steps
    assert Reason.JOB_RECREATED in [r for _, r, _ in events(cluster, "deleted")]
    assert_each_side_writes_its_own_status(cluster, "deleted")
    assert_trainer_stayed_within_its_role(cluster, "deleted")


def test_bad_data_fails_the_job_with_the_file_and_row(emulated_cluster: Cluster, node: LocalNode, image: Path) -> None:
    cluster = emulated_cluster
    rows = (image / "data" / "train.jsonl").read_text().splitlines()
    rows[2] = '{"text": "a row cut short'
    (image / "data" / "broken.jsonl").write_text("\n".join(rows) + "\n")
    cluster.create(tiny_manifest("models/tiny-llama", "data/broken.jsonl", "text", name="broken"))

    failed = wait_phase(cluster, node, "broken", "Failed")
    runs = node.pods_of("broken")
    assert building.TRAINER_EXIT_BAD_INPUT == EXIT_BAD_INPUT  # what the Job's podFailurePolicy names
    assert [run.exit_code for run in runs] == [EXIT_BAD_INPUT]  # retrying cannot help: no second pod
    assert "broken.jsonl: row 3" in runs[0].message
    pod = cluster.get("v1", "Pod", runs[0].name)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["exitCode"] == EXIT_BAD_INPUT and "broken.jsonl: row 3" in pod["message"]
    cond = next(c for c in failed["conditions"] if c["type"] == ConditionType.FAILED)
    assert cond["status"] == "True"
    assert "broken.jsonl: row 3" in cond["message"] and "invalid JSON" in cond["message"], cond["message"]
    assert "broken.jsonl: row 3" in failed["message"]
    wait_event(cluster, "broken", cond["reason"], "Warning")
    assert "progress" not in failed


def test_two_nodes_rendezvous_through_the_headless_service(emulated_cluster: Cluster, node: LocalNode) -> None:
    cluster = emulated_cluster
    cluster.create(job_manifest("pair", **{"training.maxSteps": 4, "checkpointing.everySteps": 2, "data.eval": None,
                                           "resources.nodes": 2, "checkpointing.storage.accessMode": "ReadWriteMany"}))

    done = wait_phase(cluster, node, "pair", "Succeeded", timeout=120)
    runs = sorted(node.pods_of("pair"), key=lambda run: run.index)
    assert [(run.index, run.exit_code) for run in runs] == [(0, EXIT_OK), (1, EXIT_OK)], runs[-1].log()[-3000:]
    job = cluster.get("batch/v1", "Job", "pair")
    assert job["status"]["succeeded"] == 2 and job["status"]["completedIndexes"] == "0,1"
    assert done["progress"]["step"] == done["progress"]["totalSteps"] == 4
    assert "2 processes" in runs[0].log()  # one trainer process per pod, one process group across both
    assert_each_side_writes_its_own_status(cluster, "pair")


# ---------------------------------------------------------------------------------- sources in a bucket


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    from tests.support.s3server import s3_server

    with s3_server() as server:
        yield server


def test_bucket_sources_are_fetched_once_per_job_by_the_init_container_and_the_model_goes_back(
        emulated_cluster: Cluster, node: LocalNode, s3: Any, tiny_llama: Path, tmp_path: Path) -> None:
    """s3:// model and data: the pod's fetch init container downloads them into the job's volume
    (phase Initializing, bytes in status), the trainer reads that copy; a replacement pod after a
    kill fetches nothing; the exported model lands in the output bucket."""
    import base64

    cluster = emulated_cluster
    bucket = s3.client()
    for name in ("models", "data", "results"):
        bucket.create_bucket(Bucket=name)
    s3.put_folder(tiny_llama, "models", "tiny-llama")
    bucket.upload_file(str(write_dataset(tmp_path / "train.jsonl", "text", n=32)), "data", "corpus/train.jsonl")
    cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-keys"}, "data": {
        key: base64.b64encode(value.encode()).decode() for key, value in
        {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}.items()}})
    cluster.create(tiny_manifest("s3://models/tiny-llama", "s3://data/corpus/train.jsonl", "text", name="bucket", overrides={
        "training.microBatchSize": 2, "training.maxSeqLength": 32, "training.maxSteps": 6, "checkpointing.everySteps": 2,
        "model.credentialsSecret": {"name": "s3-keys"}, "s3.endpointUrl": s3.endpoint, "output.path": "s3://results/runs/bucket"}))

    first = wait(cluster, node, lambda: (p := node.pods_of("bucket")) and p[0], "the first pod")
    wait(cluster, node, lambda: ftj_status(cluster, "bucket").get("latestCheckpoint"), "a first checkpoint", timeout=120)
    node.kill(first, signal.SIGKILL)
    done = wait_phase(cluster, node, "bucket", "Succeeded", timeout=150)

    seen = phases_seen(cluster, "bucket")
    assert "Initializing" in seen and seen.index("Initializing") < seen.index("Running"), seen
    init = done["initialization"]
    assert init["done"] and init["sourcesTotal"] == init["sourcesFetched"] == 2, init
    model_bytes = sum(s3.objects("models", "tiny-llama/").values())
    # The first pod downloaded both sources; its replacement found them on the volume.
    runs = node.pods_of("bucket")
    assert len(runs) == 2, [r.name for r in runs]
    fetch_logs = [r.log_path.with_name("fetch.log").read_text() for r in runs]
    assert "kubetune: fetched 2 sources" in fetch_logs[0] and "s3://models/tiny-llama" in fetch_logs[0], fetch_logs[0]
    assert "kubetune: 2 already in the cache" in fetch_logs[1] and "fetched" not in fetch_logs[1], fetch_logs[1]
    assert init["bytesFetched"] == 0  # the last report is the replacement's: nothing new
    cached = node.claim_dir(naming.names_for("bucket").claim) / "cache" / "sources"
    assert sum(p.stat().st_size for p in cached.rglob("*") if p.is_file()) >= model_bytes
    resumed_at(runs[1])
    uploaded = s3.objects("results", "runs/bucket/")
    assert {"runs/bucket/config.json", "runs/bucket/model.safetensors"} <= set(uploaded), uploaded
    secret = s3.secret_key
    for run in runs:  # the key reached the pods as a secretKeyRef only: no log carries it
        assert secret not in run.log() and secret not in run.log_path.with_name("fetch.log").read_text()
    assert secret not in json.dumps(cluster.get(*FTJ, "bucket"))
