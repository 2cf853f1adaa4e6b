"""``kubetune submit/status/logs/wait/delete`` and ``kubetune.client`` against the API server emulator.

The emulator is served over HTTP and the client reaches it through a kubeconfig, as it would a
cluster. A fake trainer plays the pod's side with the trainer's own status reporter
(``ClusterReporter``, the code the rank-0 pod runs), and the test plays the operator (phase) and
the kubelet (a rank-0 pod and its log), so these tests need no training and run in seconds.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import client as kclient
from kubetune.cli import main
from kubetune.operator import building, naming
from tests.operator.operating import FTJ, manifest
from tests.support.clusters import Cluster, fresh_namespace_name

POD_LOG = (
    "2026-12-05 22:00:00,000 INFO kubetune.trainer.running: techniques: lora\n"
    "2026-12-05 22:00:01,000 INFO kubetune.trainer.reporting: step 1/3 (33.3%)  loss 2.0000\n"
    "2026-12-05 22:00:02,000 WARNING kubetune.trainer.models: tokenizer has no pad token; using eos\n"
)


@pytest.fixture()
def cluster(k8s_emulator, kubeconfig_file):
    namespace = fresh_namespace_name()
    c = Cluster(kubeconfig_file, namespace=namespace, emulator=k8s_emulator)
    c.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    yield c
    c.close()


def write_manifest(tmp_path: Path, name: str, **spec: Any) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest(name, **spec)))
    return path


def cli(cluster: Cluster, *args: str) -> int:
    return main([*args, "-n", cluster.namespace])


def set_phase(cluster: Cluster, name: str, phase: str, message: str = "") -> None:
    cluster.patch(*FTJ, name, {"status": {"phase": phase, "message": message}}, subresource="status")


def add_rank0_pod(cluster: Cluster, job: str, log: str) -> str:
    """The trainer pod of completion index 0, Running, with its container log (the kubelet's part)."""
    labels = {**naming.selector_labels(job), "batch.kubernetes.io/job-completion-index": "0"}
    pod = cluster.create({"apiVersion": "v1", "kind": "Pod",
                          "metadata": {"name": f"{job}-0-abcde", "labels": labels,
                                       "annotations": {naming.ANNOTATION_JOB: job}},
                          "spec": {"containers": [{"name": building.CONTAINER_NAME, "image": "trainer"}]}})
    name = pod["metadata"]["name"]
    cluster.patch("v1", "Pod", name, {"status": {"phase": "Running"}}, subresource="status")
    assert cluster.emulator is not None
    cluster.emulator.set_pod_log(cluster.namespace, name, log)
    return name


def fake_run(cluster: Cluster, kubeconfig: Path, name: str, *, fail: bool = False) -> None:
    """What the operator and the rank-0 trainer pod write while a job trains 3 steps."""
    from kubetune.trainer.reporting import ClusterReporter

    cluster.wait_for(lambda: cluster.find(*FTJ, name), what=f"{name} to be created")
    set_phase(cluster, name, "Pending", "resources created")
    pod = add_rank0_pod(cluster, name, POD_LOG)
    set_phase(cluster, name, "Running", "training")
    reporter = ClusterReporter(name, cluster.namespace, interval=0.0, flush_timeout=5.0, kubeconfig=kubeconfig)
    try:
        for step in (1, 2, 3):
            reporter.progress({"step": step, "total_steps": 3, "loss": 3.0 - step / 2, "learning_rate": 1e-4})
            reporter.patcher.flush(5.0)
            time.sleep(0.3)
            if step == 2:
                reporter.evaluated({"eval_loss": 1.5, "eval_accuracy": 0.75})
                reporter.checkpoint(2, "/workspace/checkpoints/step-00000002", {"eval_loss": 1.5}, best=True)
                reporter.patcher.flush(5.0)
        if not fail:
            reporter.finished("/workspace/output", "completed")
    finally:
        reporter.close()
    assert cluster.emulator is not None
    cluster.emulator.set_pod_log(cluster.namespace, pod, POD_LOG + "2026-12-05 22:00:09,000 INFO kubetune.trainer.exporting: saved the adapter\n")
    cluster.patch("v1", "Pod", pod, {"status": {"phase": "Failed" if fail else "Succeeded"}}, subresource="status")
    set_phase(cluster, name, "Failed" if fail else "Succeeded",
              "the trainer exited with code 1" if fail else "training completed")


def in_background(target, *args) -> threading.Thread:
    failures: list[BaseException] = []

    def run() -> None:
        try:
            target(*args)
        except BaseException as exc:  # surfaced by join_checked
            failures.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.failures = failures  # type: ignore[attr-defined]
    thread.start()
    return thread


def join_checked(thread: threading.Thread) -> None:
    thread.join(30)
    assert not thread.is_alive()
    if thread.failures:  # type: ignore[attr-defined]
        raise thread.failures[0]  # type: ignore[attr-defined]


def test_submit_follow_shows_the_local_runs_lines_and_exits_0_on_success(cluster, kubeconfig_file, tmp_path, capsys):
    path = write_manifest(tmp_path, "follow-me")
    writer = in_background(fake_run, cluster, kubeconfig_file, "follow-me")
    rc = cli(cluster, "submit", "-f", str(path), "--follow", "--poll", "0.1", "--timeout", "20")
    join_checked(writer)
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert f"finetunejob.{cluster.namespace}/follow-me created" in out
    lines = err.splitlines()
    # progress lines as the local run prints them without a terminal (kubetune.trainer.reporting)
    assert any(line.startswith("step 3/3 (100.0%)") for line in lines), err
    assert "checkpoint at step 2: /workspace/checkpoints/step-00000002 (best so far)" in lines
    assert "evaluation: eval_loss 1.5, eval_accuracy 0.75" in lines
    # the pod's own lines come through; the reporter's (already shown from status) do not, twice
    assert any(line.endswith("kubetune.trainer.running: techniques: lora") for line in lines), err
    assert any("saved the adapter" in line for line in lines), err
    assert not any("kubetune.trainer.reporting: step" in line for line in lines), err
    assert lines[-1] == "training ended (completed); output in /workspace/output"
    assert cluster.get(*FTJ, "follow-me")["spec"]["training"]["maxSteps"] == 5  # what was submitted


def test_submit_validates_first_and_creates_nothing(cluster, tmp_path, capsys):
    path = write_manifest(tmp_path, "bad", peft={"method": "lora", "r": -4})
    assert cli(cluster, "submit", "-f", str(path)) == 2
    err = capsys.readouterr().err
    assert f"{path}: spec.peft.r: must be >= 1 (got -4)" in err
    assert cluster.list(*FTJ) == []
    with pytest.raises(kclient.InvalidManifest):
        kclient.Client(namespace=cluster.namespace).submit(path)


def test_wait_exit_codes_reflect_the_phase(cluster, kubeconfig_file, tmp_path, capsys):
    c = kclient.Client(namespace=cluster.namespace)
    c.submit(write_manifest(tmp_path, "fails"))
    assert cli(cluster, "wait", "fails", "--timeout", "0.3", "--poll", "0.1") == 124
    writer = in_background(lambda: fake_run(cluster, kubeconfig_file, "fails", fail=True))
    assert cli(cluster, "wait", "fails", "--poll", "0.1", "--timeout", "20") == 1
    join_checked(writer)
    assert "fails: Failed: the trainer exited with code 1" in capsys.readouterr().out
    state = c.get("fails")
    assert state.finished and not state.succeeded
    assert state.progress is not None and state.progress.step == 3
    with pytest.raises(kclient.JobNotFound):
        c.wait("nobody")


def test_python_api_follow_and_wait(cluster, kubeconfig_file, tmp_path):
    c = kclient.Client(namespace=cluster.namespace)
    job = c.submit(write_manifest(tmp_path, "notebook"))
    writer = in_background(fake_run, cluster, kubeconfig_file, "notebook")
    updates = list(c.follow(job.name, poll=0.1, timeout=20))
    join_checked(writer)
    kinds = [u.kind for u in updates]
    assert kinds[-1] == "end" and updates[-1].job.succeeded
    steps = [u.job.progress.step for u in updates if u.kind == "progress"]
    assert steps == sorted(steps) and steps[-1] == 3
    assert {"phase", "progress", "checkpoint", "evaluation", "log"} <= set(kinds)
    assert c.wait(job.name, timeout=1).succeeded


def test_status_and_logs(cluster, kubeconfig_file, tmp_path, capsys):
    c = kclient.Client(namespace=cluster.namespace)
    c.submit(write_manifest(tmp_path, "shown"))
    fake_run(cluster, kubeconfig_file, "shown")
    capsys.readouterr()
    assert cli(cluster, "status", "shown") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"FineTuneJob {cluster.namespace}/shown: Succeeded: training completed")
    assert "checkpoint step 2: /workspace/checkpoints/step-00000002 (best)" in out
    assert "output: /workspace/output" in out
    assert cli(cluster, "logs", "shown") == 0
    assert capsys.readouterr().out.endswith("saved the adapter\n")
    assert cli(cluster, "logs", "nobody") == 2
    assert "no FineTuneJob nobody" in capsys.readouterr().err


def _owned_claim(cluster: Cluster, job: str) -> str:
    """The workspace claim as the operator makes it when deleteWithJob is true (owned by the job)."""
    from kubetune.api import parse_job

    live = cluster.get(*FTJ, job)
    claim = building.build_claim(parse_job(live))
    assert claim is not None and claim["metadata"]["ownerReferences"][0]["uid"] == live["metadata"]["uid"]
    cluster.create(claim)
    return claim["metadata"]["name"]


def test_delete_keep_output_keeps_an_owned_claim(cluster, tmp_path, capsys):
    c = kclient.Client(namespace=cluster.namespace)
    storage = {"storage": {"deleteWithJob": True}}
    for name in ("kept", "gone"):
        c.submit(write_manifest(tmp_path, name, checkpointing=storage))
    kept, gone = _owned_claim(cluster, "kept"), _owned_claim(cluster, "gone")

    assert cli(cluster, "delete", "kept", "--keep-output") == 0
    assert f"kept claim {kept}" in capsys.readouterr().out
    cluster.wait_gone(*FTJ, "kept")
    claim = cluster.find("v1", "PersistentVolumeClaim", kept)
    assert claim is not None and not claim["metadata"].get("ownerReferences")

    # without the flag the job's own setting holds: the garbage collector takes the claim
    assert cli(cluster, "delete", "gone") == 0
    assert f"claim {gone} is deleted with the job" in capsys.readouterr().out
    cluster.wait_gone("v1", "PersistentVolumeClaim", gone)


def test_delete_never_touches_an_unowned_claim(cluster, tmp_path):
    c = kclient.Client(namespace=cluster.namespace)
    c.submit(write_manifest(tmp_path, "default-storage"))
    from kubetune.api import parse_job

    claim = building.build_claim(parse_job(cluster.get(*FTJ, "default-storage")))
    assert claim is not None and "ownerReferences" not in claim["metadata"]  # deleteWithJob is off by default
    cluster.create(claim)
    done = c.delete("default-storage")
    assert done.kept_claims == [claim["metadata"]["name"]] and done.deleted_claims == []
    cluster.wait_gone(*FTJ, "default-storage")
    assert cluster.find("v1", "PersistentVolumeClaim", claim["metadata"]["name"]) is not None


def test_submitting_a_name_twice_says_what_to_do(cluster, tmp_path, capsys):
    path = write_manifest(tmp_path, "twice")
    assert cli(cluster, "submit", "-f", str(path)) == 0
    assert cli(cluster, "submit", "-f", str(path)) == 2
    assert f"FineTuneJob {cluster.namespace}/twice exists already: kubetune delete twice first" in capsys.readouterr().err


def test_a_refused_pod_log_leaves_the_follow_to_the_status(cluster, kubeconfig_file, tmp_path):
    assert cluster.emulator is not None
    forbidden = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403, "reason": "Forbidden",
                 "message": 'pods "x" is forbidden: cannot get resource "pods/log"'}
    cluster.emulator.emulator[lambda request: request.url.path.endswith("/log")] << 403 << forbidden
    c = kclient.Client(namespace=cluster.namespace)
    c.submit(write_manifest(tmp_path, "nolog"))
    writer = in_background(fake_run, cluster, kubeconfig_file, "nolog")
    updates = list(c.follow("nolog", poll=0.1, timeout=20))
    join_checked(writer)
    logs = [u.text for u in updates if u.kind == "log"]
    assert len(logs) == 1 and logs[0].startswith("(no pod log: ") and "403" in logs[0], logs
    assert updates[-1].kind == "end" and updates[-1].job.succeeded
    assert [u.job.progress.step for u in updates if u.kind == "progress"][-1] == 3


def test_keep_output_keeps_the_claims_of_a_searchs_trials(cluster, tmp_path):
    c = kclient.Client(namespace=cluster.namespace)
    storage = {"storage": {"deleteWithJob": True}}
    parent = c.submit(write_manifest(tmp_path, "search", checkpointing=storage))
    trial = manifest("search-trial-0", checkpointing=storage)
    trial["metadata"]["ownerReferences"] = [{"apiVersion": FTJ[0], "kind": FTJ[1], "name": "search",
                                             "uid": parent.uid, "controller": True}]
    cluster.create(trial)
    claim = _owned_claim(cluster, "search-trial-0")
    done = c.delete("search", keep_output=True)
    assert claim in done.kept_claims
    cluster.wait_gone(*FTJ, "search-trial-0")  # the trial goes with its search
    assert cluster.find("v1", "PersistentVolumeClaim", claim) is not None


def test_ctrl_c_stops_following_but_not_the_job(cluster, tmp_path, capsys, monkeypatch):
    def interrupted(self, name, **_):
        raise KeyboardInterrupt
        yield  # a generator, as follow is

    monkeypatch.setattr(kclient.Client, "follow", interrupted)
    assert cli(cluster, "submit", "-f", str(write_manifest(tmp_path, "runs-on")), "--follow") == 130
    assert "stopped following; the job runs on" in capsys.readouterr().err
    assert cluster.find(*FTJ, "runs-on") is not None


def test_raw_status_log_tail_and_which_namespace(cluster, kubeconfig_file, k8s_emulator, tmp_path, capsys):
    """docs/client.md: `status -o json` prints the raw status, `logs --tail N` the last N lines; the
    namespace is -n, else the manifest's metadata.namespace, else the kubeconfig context's."""
    import json

    from tests.support.clusters import write_kubeconfig

    body = manifest("placed")
    body["metadata"]["namespace"] = cluster.namespace
    path = tmp_path / "placed.yaml"
    path.write_text(yaml.safe_dump(body))
    assert main(["submit", "-f", str(path)]) == 0  # no -n; the context's namespace is `default`
    assert cluster.find(*FTJ, "placed") is not None
    set_phase(cluster, "placed", "Running", "training")
    capsys.readouterr()
    assert cli(cluster, "status", "placed", "-o", "json") == 0
    assert json.loads(capsys.readouterr().out) == cluster.get(*FTJ, "placed")["status"]

    add_rank0_pod(cluster, "placed", POD_LOG)
    assert cli(cluster, "logs", "placed", "--tail", "1") == 0
    assert capsys.readouterr().out == POD_LOG.splitlines()[-1] + "\n"

    in_context = write_kubeconfig(tmp_path / "in-context.yaml", k8s_emulator.kubeconfig(namespace=cluster.namespace))
    assert main(["status", "placed", "--kubeconfig", str(in_context)]) == 0
    assert capsys.readouterr().out.startswith(f"FineTuneJob {cluster.namespace}/placed: Running")
    assert main(["status", "placed", "--kubeconfig", str(in_context), "-n", "default"]) == 2  # -n wins
    assert "no FineTuneJob placed in namespace default" in capsys.readouterr().err
    # --context picks another context of the kubeconfig, with its namespace
    config = k8s_emulator.kubeconfig()
    config["contexts"].append({"name": "team", "context": {**config["contexts"][0]["context"], "namespace": cluster.namespace}})
    two = write_kubeconfig(tmp_path / "two-contexts.yaml", config)
    assert main(["status", "placed", "--kubeconfig", str(two)]) == 2  # the current context's namespace: default
    capsys.readouterr()
    assert main(["status", "placed", "--kubeconfig", str(two), "--context", "team"]) == 0
    assert capsys.readouterr().out.startswith(f"FineTuneJob {cluster.namespace}/placed: Running")


def test_submit_follow_without_logs_and_its_timeout(cluster, kubeconfig_file, tmp_path, capsys):
    """docs/client.md: `--no-logs` leaves the pod's log out of the follow; `--timeout` ends the
    follow with exit 124 and the job runs on."""
    assert cli(cluster, "submit", "-f", str(write_manifest(tmp_path, "slow")), "--follow", "--poll", "0.1",
               "--timeout", "0.3") == 124
    assert cluster.find(*FTJ, "slow") is not None
    capsys.readouterr()
    writer = in_background(fake_run, cluster, kubeconfig_file, "quiet")
    rc = cli(cluster, "submit", "-f", str(write_manifest(tmp_path, "quiet")), "--follow", "--no-logs", "--no-progress",
             "--poll", "0.1", "--timeout", "20")
    join_checked(writer)
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert any(line.startswith("step 3/3 (100.0%)") for line in err.splitlines()), err
    assert "kubetune.trainer" not in err and "saved the adapter" not in err, err  # no pod log line
    assert err.splitlines()[-1] == "training ended (completed); output in /workspace/output"


def test_the_python_api_runs_as_docs_client_md_writes_it(k8s_emulator, kubeconfig_file, tmp_path, monkeypatch, capsys):
    """The ```python block of docs/client.md, run as written (the manifest path swapped for a small
    job's): the module-level functions share one Client of the current kubeconfig context."""
    import re

    monkeypatch.setattr(kclient, "_default", None)
    page = (Path(__file__).resolve().parents[2] / "docs" / "client.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(.*?)```", page, re.S).group(1)  # type: ignore[union-attr]
    assert '"examples/quickstart.yaml"' in snippet
    path = write_manifest(tmp_path, "from-the-docs")  # no namespace: the context's, `default`
    in_default = Cluster(kubeconfig_file, namespace="default", emulator=k8s_emulator)
    try:
        writer = in_background(fake_run, in_default, kubeconfig_file, "from-the-docs")
        exec(compile(snippet.replace('"examples/quickstart.yaml"', repr(str(path))), "docs/client.md", "exec"), {})
        join_checked(writer)
        out = capsys.readouterr().out.splitlines()
        assert "end training ended (completed); output in /workspace/output" in out
        assert out[-1] == "Succeeded 1.5 /workspace/output"  # state.phase, state.progress.loss, state.status.output_path
        in_default.wait_gone(*FTJ, "from-the-docs")  # client.delete(job.name, keep_output=True)
    finally:
        in_default.close()
