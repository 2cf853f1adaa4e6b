"""Reading and writing ``s3://bucket/key`` sources and output through boto3.

Called by :mod:`kubetune.trainer.fetching` (which downloads a source once into the job's cache)
and by the end of a run whose ``spec.output.path`` is ``s3://…`` (:func:`upload_folder`). boto3
is the maintained AWS client; S3-compatible stores (MinIO, Ceph, R2…) are reached through
``spec.s3.endpointUrl`` (set as ``AWS_ENDPOINT_URL_S3`` for boto3 by :func:`use_spec`; locally
``AWS_ENDPOINT_URL`` in the environment works too).

Credentials are never read from the manifest: boto3's default chain finds them — the
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and optional ``AWS_SESSION_TOKEN``) variables
that the operator maps from the keys of ``spec.model.credentialsSecret``, or the pod's workload
identity (IRSA web identity token, EKS pod identity, instance profile). Every failure becomes one
:class:`~kubetune.trainer.sources.SourceError` line naming the spec field, never a traceback.

An upload is resumable: an object already in the bucket with the same size and ETag (the MD5 of
the file, or of its parts for a multipart upload with :data:`PART_SIZE` parts) is skipped, so a
rerun after an interrupted upload sends only what is missing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.trainer.sources import SourceError

#: Entries of the output folder that are the run's logs, not the model: not uploaded.
NOT_UPLOADED = ("tensorboard", "trainer_log.jsonl")
#: Files larger than this go up in parts of this size (and their ETag is computed the same way).
PART_SIZE = 64 * 1024 * 1024
CREDENTIAL_HINT = ("set spec.model.credentialsSecret to a Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                   "(or give the pod a workload identity)")


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # no leading slash; "" for the whole bucket

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3(source: str | None) -> bool:
    return bool(source) and str(source).startswith("s3://")


def parse_s3(source: str) -> S3Location:
    bucket, _, key = source[len("s3://"):].partition("/")
    return S3Location(bucket, key.lstrip("/"))


#: The variables boto3 reads for the endpoint and region; :func:`use_spec` sets them from ``spec.s3``.
ENDPOINT_VARIABLE = "AWS_ENDPOINT_URL_S3"
REGION_VARIABLE = "AWS_DEFAULT_REGION"


def use_spec(spec: Any) -> None:
    """Point boto3 at ``spec.s3`` (endpoint, region) for this process and the processes it starts."""
    s3 = getattr(spec, "s3", None)
    if s3 is not None and s3.endpoint_url:
        os.environ[ENDPOINT_VARIABLE] = s3.endpoint_url
    if s3 is not None and s3.region:
        os.environ[REGION_VARIABLE] = s3.region


def endpoint() -> str | None:
    return os.environ.get(ENDPOINT_VARIABLE) or os.environ.get("AWS_ENDPOINT_URL") or None


def client() -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", config=config)


def explain(exc: BaseException, where: str, location: S3Location) -> SourceError:
    """One line for a failed S3 call: which field, which bucket, what is wrong and what to do."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError

    at, bucket = str(location), location.bucket
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return SourceError(f"{where}: no S3 credentials for {at}; {CREDENTIAL_HINT}")
    if isinstance(exc, EndpointConnectionError):
        return SourceError(f"{where}: cannot reach the S3 endpoint {endpoint() or 'of AWS'} for {at}; "
                           "check spec.s3.endpointUrl and network access")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and getattr(exc, "operation_name", "") == "HeadBucket"):
            return SourceError(f"{where}: bucket {bucket!r} does not exist (from {at!r})")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                    "ExpiredToken", "AuthorizationHeaderMalformed") or status == 403:
            return SourceError(f"{where}: access to {at} denied ({code or status}); check the credentials: {CREDENTIAL_HINT}")
        return SourceError(f"{where}: S3 refused {at} ({code or status}: {error.get('Message', '')})".rstrip(": )") + ")")
    return SourceError(f"{where}: cannot use {at} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


def _objects(s3: Any, location: S3Location) -> list[dict[str, Any]]:
    """The objects a source names: the one object ``key``, else everything under ``key/``."""
    from botocore.exceptions import ClientError

    if location.key and not location.key.endswith("/"):
        try:
            head = s3.head_object(Bucket=location.bucket, Key=location.key)
            return [{"Key": location.key, "Size": head["ContentLength"], "name": Path(location.key).name}]
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchKey", "NotFound"):
                raise
            s3.head_bucket(Bucket=location.bucket)  # a missing bucket says so, not "no objects"
    prefix = location.key.rstrip("/") + "/" if location.key else ""
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):
                continue  # folder markers some tools write
            found.append({"Key": obj["Key"], "Size": obj["Size"], "name": obj["Key"][len(prefix):]})
    return found


def download(source: str, dest: Path, where: str) -> tuple[Path, int]:
    """Download ``source`` (one object, or every object under a prefix) into the folder ``dest``.

    Returns the local path the source stands for (the file for one object, else ``dest``) and the
    bytes written."""
    location = parse_s3(source)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        s3 = client()
        objects = _objects(s3, location)
        if not objects:
            raise SourceError(f"{where}: no objects at {source!r} (bucket {location.bucket!r}, prefix {location.key!r})")
        total = 0
        for obj in objects:
            target = dest / obj["name"]
            if ".." in Path(obj["name"]).parts:
                raise SourceError(f"{where}: object key {obj['Key']!r} would leave the download folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(location.bucket, obj["Key"], str(target))
            total += int(obj["Size"])
    except SourceError:
        raise
    except Exception as exc:
        raise explain(exc, where, location) from None
    single = len(objects) == 1 and objects[0]["Key"] == location.key
    return (dest / objects[0]["name"] if single else dest), total


def check_writable(target: str, where: str) -> None:
    """Fail early (before training) when the output bucket is missing or the credentials are refused."""
    location = parse_s3(target)
    try:
        client().head_bucket(Bucket=location.bucket)
    except Exception as exc:
        raise explain(exc, where, location) from None


def etag_of(path: Path, part_size: int | None = None) -> str:
    """The ETag S3 gives ``path`` when uploaded with :func:`upload_folder` (MD5, or MD5 of part MD5s)."""
    part_size = part_size or PART_SIZE
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= part_size:
            return hashlib.md5(handle.read(), usedforsecurity=False).hexdigest()
        digests = []
        while chunk := handle.read(part_size):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    return hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest() + f"-{len(digests)}"


@dataclass
class UploadReport:
    uploaded: list[str]
    skipped: list[str]
    bytes_uploaded: int


def upload_folder(folder: Path, target: str, where: str) -> UploadReport:
    """Upload the model files under ``folder`` (not :data:`NOT_UPLOADED`) to ``target`` (a prefix),
    skipping objects already there with the same size and ETag."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

    location = parse_s3(target)
    prefix = location.key.rstrip("/") + "/" if location.key else ""
    transfer = TransferConfig(multipart_threshold=PART_SIZE + 1, multipart_chunksize=PART_SIZE)
    report = UploadReport([], [], 0)
    try:
        s3 = client()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if rel.split("/", 1)[0] in NOT_UPLOADED:
                continue
            key = prefix + rel
            size = path.stat().st_size
            try:
                head = s3.head_object(Bucket=location.bucket, Key=key)
                if head["ContentLength"] == size and head["ETag"].strip('"') == etag_of(path):
                    report.skipped.append(key)
                    continue
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) not in ("404", "NoSuchKey", "NotFound"):
                    raise
            s3.upload_file(str(path), location.bucket, key, Config=transfer)
            report.uploaded.append(key)
            report.bytes_uploaded += size
    except Exception as exc:
        raise explain(exc, where, location) from None
    return report


def upload_output(folder: Path, target: str) -> str:
    """Upload the exported model to ``spec.output.path`` (an s3:// prefix), logging one line; returns ``target``."""
    import logging

    report = upload_folder(folder, target, "spec.output.path")
    again = f"; {len(report.skipped)} already there" if report.skipped else ""
    logging.getLogger("kubetune.trainer").info("uploaded %d files (%d bytes) to %s%s", len(report.uploaded),
                                               report.bytes_uploaded, target, again)
    return target
