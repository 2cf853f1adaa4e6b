"""A local S3-compatible server for the s3:// tests: moto's server mode on 127.0.0.1, a free port.

:func:`s3_server` starts ``moto.server.ThreadedMotoServer`` in this process (child processes such
as ``kubetune train`` reach it over HTTP) and turns on moto's authentication, so that a wrong key
is refused as AWS would refuse it. :class:`S3` holds the endpoint, a key pair that works (an IAM
user moto knows, allowed everything) and a boto3 client for setting buckets up and checking them.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class S3:
    endpoint: str
    access_key: str
    secret_key: str

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key)

    def env(self, **extra: str) -> dict[str, str]:
        """The variables a trainer pod would get from the Secret (and nothing else of AWS)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", **extra}

    def put_folder(self, folder: Path, bucket: str, prefix: str) -> list[str]:
        s3 = self.client()
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
            s3.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Key -> size of every object under ``prefix``."""
        found: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[obj["Key"]] = obj["Size"]
        return found


@contextmanager
def s3_server() -> Iterator[S3]:
    import boto3
    from moto import settings
    from moto.core.responses import ActionAuthenticatorMixin
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        user = f"kubetune-{port}"  # moto's state is per process, shared by the servers it starts
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        # From now on every request is checked against moto's IAM, as AWS would check it.
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
        server.stop()
