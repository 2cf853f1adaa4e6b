"""``s3://`` sources and output against a local S3-compatible server (moto's server mode).

End to end: a tiny model and its data in buckets, ``kubetune train -f`` reading them and writing
the exported model back to a bucket; a rerun fetches and uploads nothing, and completes an upload
that was cut short. Bad credentials and missing buckets are one line naming the field, exit 2.
The cache: several fetchers of one source at once leave one whole copy, downloaded once.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.support.s3server import S3, s3_server
from tests.support.tiny_models import manifest, write_dataset
from tests.trainer.conftest import trainer_env


@pytest.fixture(scope="module")
def s3() -> S3:
    with s3_server() as server:
        yield server


NO_AWS_FILES = {"AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


@pytest.fixture(autouse=True)
def _aws_env(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process calls see the same variables a pod gets from its Secret; no ~/.aws is read."""
    for key, value in {**s3.env(AWS_ENDPOINT_URL_S3=s3.endpoint), **NO_AWS_FILES}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBETUNE_FETCH_DIR", str(tmp_path / "fetched"))


def _bucket(s3: S3, name: str) -> str:
    client = s3.client()
    if name not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=name)
    return name


def _train(run_dir: Path, job: dict, env: dict[str, str], *extra: str) -> tuple[int, str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    # Only what a pod would have: the keys (from the Secret); the endpoint comes from spec.s3.
    full_env = {k: v for k, v in trainer_env(**env, **NO_AWS_FILES).items()
                if k not in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "KUBETUNE_FETCH_DIR")}
    proc = subprocess.run([sys.executable, "-m", "kubetune", "train", "-f", str(run_dir / "job.yaml"), "-o", str(run_dir),
                           "--no-progress", "--nproc", "1", *extra], cwd=run_dir, env=full_env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def _s3_job(s3: S3, model: str, data: str, output: str | None = None, **overrides) -> dict:
    job = manifest(model, data, "text", overrides={
        "training.maxSteps": 2, "checkpointing.everySteps": 2, "data.eval": None, "s3.endpointUrl": s3.endpoint,
        **({"output.path": output} if output else {}), **overrides})
    return job


@pytest.mark.slow
def test_model_and_data_from_buckets_and_the_model_written_back(s3: S3, tiny_model_dir, tmp_path: Path) -> None:
    _bucket(s3, "models"), _bucket(s3, "data"), _bucket(s3, "results")
    s3.put_folder(tiny_model_dir("llama"), "models", "tiny-llama")
    data = write_dataset(tmp_path / "train.jsonl", "text", n=16)
    s3.client().upload_file(str(data), "data", "corpus/train.jsonl")
    job = _s3_job(s3, "s3://models/tiny-llama", "s3://data/corpus/train.jsonl", "s3://results/runs/tiny")
    env = s3.env()  # the endpoint comes from spec.s3.endpointUrl, the keys from the "Secret"
    run_dir = tmp_path / "run"

    rc, out = _train(run_dir, job, env)
    assert rc == 0, out[-3000:]
    [fetched] = [line for line in out.splitlines() if line.startswith("kubetune: fetched")]
    assert "fetched 2 sources" in fetched and "s3://models/tiny-llama" in fetched, fetched
    assert fetched.endswith(f"(cache {run_dir / 'cache'})"), fetched  # docs/sources.md: runs/<name>/cache locally
    uploaded = s3.objects("results", "runs/tiny/")
    local = {f"runs/tiny/{p.relative_to(run_dir / 'output').as_posix()}": p.stat().st_size
             for p in (run_dir / "output").rglob("*")
             if p.is_file() and p.relative_to(run_dir / "output").parts[0] not in ("tensorboard", "trainer_log.jsonl")}
    assert uploaded == local, (uploaded, local)
    assert {"runs/tiny/config.json", "runs/tiny/model.safetensors", "runs/tiny/tokenizer.json"} <= set(uploaded)
    # What came back is a model: it loads from a fresh download of the bucket.
    import transformers

    back = tmp_path / "back"
    for key in uploaded:
        (back / key).parent.mkdir(parents=True, exist_ok=True)
        s3.client().download_file("results", key, str(back / key))
    assert transformers.AutoModelForCausalLM.from_pretrained(str(back / "runs" / "tiny")).config.model_type == "llama"

    # Extended by a step: the sources are in the run's cache, nothing is fetched again.
    rc, out = _train(run_dir, job, env, "--max-steps", "3")
    assert rc == 0, out[-3000:]
    assert "kubetune: 2 already in the cache" in out and "kubetune: fetched" not in out, out[-2000:]

    # An upload cut short (an object missing): the rerun of the finished run sends just that one.
    s3.client().delete_object(Bucket="results", Key="runs/tiny/model.safetensors")
    rc, out = _train(run_dir, job, env, "--max-steps", "3")
    assert rc == 0, out[-3000:]
    assert "already finished" in out and "s3://results/runs/tiny" in out, out[-2000:]
    assert f"uploaded 1 files to s3://results/runs/tiny ({len(local) - 1} already there)" in out, out[-2000:]
    assert set(s3.objects("results", "runs/tiny/")) == set(local)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["wrong-key", "missing-bucket", "missing-output-bucket", "no-objects"])
def test_an_s3_source_that_cannot_be_read_is_one_line_naming_the_field(case: str, s3: S3, tiny_model_dir,
                                                                         tmp_path: Path) -> None:
    _bucket(s3, "models"), _bucket(s3, "data")
    s3.put_folder(tiny_model_dir("llama"), "models", "tiny-llama-2")
    data = write_dataset(tmp_path / "train.jsonl", "text", n=8)
    s3.client().upload_file(str(data), "data", "small/train.jsonl")
    env = s3.env()
    model, source, output = "s3://models/tiny-llama-2", "s3://data/small/train.jsonl", None
    if case == "wrong-key":
        env = s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret")
        expected = "spec.model.source: access to s3://models/tiny-llama-2 denied"
    elif case == "missing-bucket":
        source = "s3://no-such-bucket/train.jsonl"
        expected = "spec.data.datasets[0].source: bucket 'no-such-bucket' does not exist"
    elif case == "missing-output-bucket":
        output = "s3://no-such-results/out"
        expected = "spec.output.path: bucket 'no-such-results' does not exist"
    else:
        source = "s3://data/nothing-here/"
        expected = "spec.data.datasets[0].source: no objects at 's3://data/nothing-here/'"
    rc, out = _train(tmp_path / "run", _s3_job(s3, model, source, output), env)
    assert rc == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    said = [line for line in out.splitlines() if expected in line]
    assert len(said) == 1, out[-3000:]
    assert "not-the-secret" not in out and s3.secret_key not in out


def test_fetchers_of_one_source_at_once_leave_one_whole_copy_fetched_once(s3: S3, tmp_path: Path) -> None:
    from kubetune.trainer import fetching

    _bucket(s3, "shared")
    folder = tmp_path / "model"
    for i in range(5):
        (folder / f"part-{i}.bin").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"part-{i}.bin").write_bytes(bytes([i]) * 200_000)
    s3.put_folder(folder, "shared", "model")
    cache = tmp_path / "cache"
    results: list[fetching.Fetched] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(fetching.fetched_s3("s3://shared/model", "spec.model.source", cache))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(r.bytes_fetched for r in results) == [0, 0, 0, 1_000_000]  # one download, three reuses
    assert len({r.path for r in results}) == 1
    copy = results[0].path
    assert sorted(p.name for p in copy.iterdir()) == [f"part-{i}.bin" for i in range(5)]
    assert all((copy / f"part-{i}.bin").read_bytes() == bytes([i]) * 200_000 for i in range(5))
    assert [p.name for p in cache.iterdir() if p.name.endswith(".partial")] == []  # no half copies left
    again = fetching.fetched_s3("s3://shared/model", "spec.model.source", cache)
    assert again.reused and again.bytes_fetched == 0 and again.path == copy


def test_an_upload_skips_what_is_there_and_sends_what_changed_multipart_too(s3: S3, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune.trainer import buckets

    monkeypatch.setattr(buckets, "PART_SIZE", 5 * 1024 * 1024)  # S3's smallest part: a 6 MiB file goes in 2 parts
    _bucket(s3, "uploads")
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"w" * (6 * 1024 * 1024))
    first = buckets.upload_folder(folder, "s3://uploads/model", "spec.output.path")
    assert sorted(first.uploaded) == ["model/config.json", "model/sub/weights.bin"] and first.skipped == []
    assert s3.client().head_object(Bucket="uploads", Key="model/sub/weights.bin")["ETag"].strip('"').endswith("-2")
    second = buckets.upload_folder(folder, "s3://uploads/model", "spec.output.path")
    assert second.uploaded == [] and sorted(second.skipped) == ["model/config.json", "model/sub/weights.bin"]
    (folder / "config.json").write_text('{"changed": 1}')
    third = buckets.upload_folder(folder, "s3://uploads/model", "spec.output.path")
    assert third.uploaded == ["model/config.json"] and third.skipped == ["model/sub/weights.bin"]


def test_a_single_object_source_is_the_file_itself(s3: S3, tmp_path: Path) -> None:
    from kubetune.trainer.reading import read_rows

    _bucket(s3, "rows")
    data = write_dataset(tmp_path / "rows.jsonl", "text", n=5)
    s3.client().upload_file(str(data), "rows", "a/rows.jsonl")
    rows = read_rows("s3://rows/a/rows.jsonl", base_dir=None, where="spec.data.datasets[0].source")
    assert len(rows) == 5 and rows[0].origin.endswith("rows.jsonl")


def test_no_credentials_and_an_unreachable_endpoint_are_one_line_each(s3: S3, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The two lines docs/troubleshooting.md quotes for a `Failed` job, from the download a pod runs."""
    from tests.support.s3server import free_port
    from kubetune.trainer import buckets
    from kubetune.trainer.sources import SourceError

    _bucket(s3, "models")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance profile to wait for
    with pytest.raises(SourceError) as missing:
        buckets.download("s3://models/tiny", tmp_path / "a", "spec.model.source")
    assert str(missing.value).startswith("spec.model.source: no S3 credentials for s3://models/tiny; "
                                         "set spec.model.credentialsSecret to a Secret with keys AWS_ACCESS_KEY_ID")

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    nowhere = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", nowhere)
    with pytest.raises(SourceError) as unreachable:
        buckets.download("s3://models/tiny", tmp_path / "b", "spec.model.source")
    assert str(unreachable.value) == (f"spec.model.source: cannot reach the S3 endpoint {nowhere} for s3://models/tiny; "
                                      "check spec.s3.endpointUrl and network access")


def test_the_spec_endpoint_wins_over_the_environment(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/sources.md: without spec.s3.endpointUrl boto3's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    apply; with it, the spec wins (and spec.s3.region is the region)."""
    from kubetune.api import parse_spec
    from kubetune.trainer import buckets

    def spec(**s3_block: str):
        return parse_spec({"model": {"source": "s3://models/tiny"}, "s3": s3_block,
                           "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]}})

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # use_spec writes os.environ: monkeypatch restores both
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-the-shell:9000")
    buckets.use_spec(spec())
    assert buckets.endpoint() == "http://from-the-shell:9000"
    buckets.use_spec(spec(endpointUrl=s3.endpoint, region="eu-west-1"))
    assert buckets.endpoint() == s3.endpoint
    client = buckets.client()
    assert client.meta.endpoint_url == s3.endpoint and client.meta.region_name == "eu-west-1"
