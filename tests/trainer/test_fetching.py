"""The fetch step (``python -m kubetune.trainer.fetching``, the trainer pods' init container).

Against the local S3 server and the Kubernetes emulator: it fetches the job's s3:// sources into
the cache, shows ``status.initialization`` (bytes fetched) on the FineTuneJob, and a second run
(another node, a restarted pod) fetches nothing; the trainer then reads the copy without S3. A
source it cannot read exits 2 with one line, also written as the termination message.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from kubetune.api import FineTuneJobStatus, parse_job
from kubetune.operator.building import trainer_config
from kubetune.trainer import fetching
from tests.support.s3server import S3
from tests.support.tiny_models import write_dataset
from tests.trainer.test_hub_sources import V1, hub_cache  # noqa: F401 - a Hub-layout cache, offline
from tests.trainer.test_s3_sources import _aws_env, _bucket, s3  # noqa: F401 - fixtures shared with the s3 tests

RESOURCE = "kubetune.io/v1alpha1/finetunejobs"


def _manifest(model: str, data: str, endpoint: str) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "fetchy", "namespace": "default", "uid": "u-1"},
            "spec": {"model": {"source": model, "credentialsSecret": {"name": "store"}},
                     "data": {"datasets": [{"source": data, "format": "text"}]},
                     "s3": {"endpointUrl": endpoint}}}


def _config(tmp_path: pathlib.Path, manifest: dict[str, Any]) -> pathlib.Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(trainer_config(parse_job(manifest))))  # what the pod's ConfigMap holds
    return path


def test_the_fetch_step_fills_the_cache_once_and_shows_bytes_in_status(
        s3: S3, k8s_emulator: Any, kubeconfig_file: pathlib.Path, tmp_path: pathlib.Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _bucket(s3, "fetch-models"), _bucket(s3, "fetch-data")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "weights.bin").write_bytes(b"x" * 300_000)
    s3.put_folder(folder, "fetch-models", "m")
    data = write_dataset(tmp_path / "d.jsonl", "text", n=6)
    s3.client().upload_file(str(data), "fetch-data", "d.jsonl")
    manifest = _manifest("s3://fetch-models/m", "s3://fetch-data/d.jsonl", s3.endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # the endpoint comes from spec.s3
    k8s_emulator.create_object(RESOURCE, "default", manifest)
    config = _config(tmp_path, manifest)
    expected = 300_000 + len('{"model_type": "llama"}') + data.stat().st_size

    assert fetching.main(["--config", str(config)]) == 0
    said = capsys.readouterr()
    assert "kubetune: fetched 2 sources" in said.out, said
    status = FineTuneJobStatus.model_validate(k8s_emulator.get_object(RESOURCE, "default", "fetchy")["status"])
    assert status.initialization is not None
    assert status.initialization.done and status.initialization.bytes_fetched == expected
    assert status.initialization.sources_fetched == status.initialization.sources_total == 2

    # Another node's init container, or a restarted pod: everything is there, nothing is fetched.
    assert fetching.main(["--config", str(config)]) == 0
    assert "kubetune: 2 already in the cache" in capsys.readouterr().out
    status = FineTuneJobStatus.model_validate(k8s_emulator.get_object(RESOURCE, "default", "fetchy")["status"])
    assert status.initialization is not None and status.initialization.bytes_fetched == 0

    # The trainer reads the copies: with credentials S3 would refuse, the sources still resolve.
    from kubetune.trainer.reading import read_rows
    from kubetune.trainer.sources import resolve_model_dir

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "refused-now")
    model_dir = resolve_model_dir("s3://fetch-models/m", None, "spec.model.source")
    assert (model_dir / "weights.bin").stat().st_size == 300_000
    assert str(model_dir).startswith(str(tmp_path / "fetched"))
    assert len(read_rows("s3://fetch-data/d.jsonl", base_dir=None, where="spec.data.datasets[0].source")) == 6


def test_a_source_the_fetch_step_cannot_read_exits_2_with_one_line(
        s3: S3, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(termination))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    config = _config(tmp_path, _manifest("s3://not-a-bucket/m", "s3://not-a-bucket/d.jsonl", s3.endpoint))
    assert fetching.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kubetune: spec.model.source: bucket 'not-a-bucket' does not exist (from 's3://not-a-bucket/m')"]
    assert termination.read_text() == "spec.model.source: bucket 'not-a-bucket' does not exist (from 's3://not-a-bucket/m')"


def test_hub_models_are_fetched_into_the_hub_cache_by_revision(hub_cache: pathlib.Path) -> None:  # noqa: F811
    """An hf:// model goes through huggingface_hub's cache (HF_HOME on the job's volume in pods),
    keyed by revision; one already there is reused, nothing is downloaded (offline here)."""
    manifest = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "hub"},
                "spec": {"model": {"source": "hf://kubetune-test/tiny-llama@v1"},
                         "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]}}}
    summary = fetching.fetch_all(parse_job(manifest).spec)
    [model] = summary.fetched
    assert model.field == "spec.model.source" and model.reused and model.bytes_fetched == 0
    assert model.path == hub_cache / "models--kubetune-test--tiny-llama" / "snapshots" / V1
    assert summary.line() == "1 already in the cache"
