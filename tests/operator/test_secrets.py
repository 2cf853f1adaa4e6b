"""Secrets reach pods only as secretKeyRef and never appear in status, Events, logs, ConfigMaps or
``kubetune render`` output — not even a credential pasted by mistake where a Secret's name goes."""

from __future__ import annotations

import base64
import json
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from kubetune.api import ConditionType
from kubetune.cli import main
from tests.operator.operating import JobController, condition, manifest, wait_phase
from tests.support.clusters import Cluster

Operator = Callable[..., Any]
TOKEN = "hf_kubetuneTOPSECRET0123456789abcdefXYZ"  # what a Hugging Face token looks like
LEAKED = (TOKEN, base64.b64encode(TOKEN.encode()).decode())


def _everything_but_the_secret(cluster: Cluster) -> str:
    emulator = cluster.emulator
    assert emulator is not None

    def shown(plural: str, version: Any) -> Any:
        # of a FineTuneJob only what others write (status): its spec is what the user typed
        return (dict(version).get("status") or {}) if plural == "finetunejobs" else dict(version)

    def dump() -> list[Any]:
        return [shown(key[0].plural, version) for key, obj in emulator.emulator.objects.items()  # type: ignore[union-attr]
                if key[0].plural != "secrets" for version in [obj.raw, *obj.history]]
    return json.dumps(emulator.call(dump), default=dict)


def test_a_referenced_secret_reaches_the_pod_only_as_a_secret_key_ref(
        emulated_cluster: Cluster, operator_process: Operator, job_controller: JobController) -> None:
    cluster = emulated_cluster
    cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"},
                    "data": {"token": LEAKED[1]}})
    with operator_process(cluster.namespace) as runner:
        cluster.create(manifest("private", model={"source": "hf://org/private-model",
                                                  "credentialsSecret": {"name": "hf-token"}}))
        job = cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "private"))
        job_controller.set_status("private", {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
        wait_phase(cluster, "private", "Succeeded")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    stored = _everything_but_the_secret(cluster)  # ConfigMaps, Jobs, status, Events, every version of them
    assert "private" in stored and not any(value in stored for value in LEAKED)
    assert not any(value in runner.output for value in LEAKED)


def test_a_credential_pasted_as_the_secret_name_is_refused_without_echoing_it(
        emulated_cluster: Cluster, operator_process: Operator) -> None:
    cluster = emulated_cluster
    with operator_process(cluster.namespace) as runner:
        cluster.create(manifest("pasted", model={"source": "hf://org/m", "credentialsSecret": {"name": TOKEN}}))
        rejected = cluster.wait_for(lambda: condition(cluster, "pasted", ConditionType.SPEC_REJECTED))
    assert "spec.model.credentialsSecret.name" in rejected["message"]
    stored = _everything_but_the_secret(cluster)  # status, Events, ConfigMaps…
    assert "spec.model.credentialsSecret.name" in stored and TOKEN not in stored
    assert TOKEN not in runner.output


@pytest.mark.parametrize("pasted", [False, True])
def test_render_shows_no_credential(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], pasted: bool) -> None:
    body = manifest("private", model={"source": "hf://org/m", "credentialsSecret": {"name": TOKEN if pasted else "hf-token"}})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(body))
    code = main(["render", "-f", str(path)])
    out = capsys.readouterr()
    if pasted:
        assert code != 0 and "spec.model.credentialsSecret.name" in out.err
        assert TOKEN not in out.out + out.err
    else:
        assert code == 0 and "secretKeyRef" in out.out and "hf-token" in out.out
