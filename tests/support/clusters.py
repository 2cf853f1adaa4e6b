"""
A small client for tests that must run unchanged against the emulator or a real cluster.

The ``cluster`` fixture (``tests/conftest.py``) yields a :class:`Cluster`: a kubeconfig path,
a fresh namespace for the test, and create/get/find/list/patch/replace/delete/wait_for helpers
built on the ``kubernetes`` python client. Resources are named by ``apiVersion`` and ``kind`` (or
plural), resolved through API discovery, so the emulator's discovery is exercised as a real
cluster's would be. Errors surface as ``kubernetes.client.ApiException`` with the HTTP status.
"""

from __future__ import annotations

import pathlib
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import kubernetes
import yaml
from kubernetes.client import ApiClient, ApiException

from tests.support.emulating import EmulatorThread

T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def write_kubeconfig(path: pathlib.Path, config: dict[str, Any]) -> pathlib.Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Cluster:
    """
    One Kubernetes API (emulated or real) as a test sees it.

    ``emulator`` is the :class:`EmulatorThread` when emulated, ``None`` on a real cluster:
    a test that needs it (fault injection, peeking at history) is emulator-only by nature.
    """

    def __init__(self, kubeconfig: pathlib.Path, *, namespace: str, emulator: EmulatorThread | None = None,
                 plays_controllers: bool | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.emulator = emulator
        #: No Job controller or kubelet answers here: tests play them (the emulator; the CRD server
        #: behind bench/apishim). Defaults to "emulated".
        self.plays_controllers = emulator is not None if plays_controllers is None else plays_controllers
        self.api_client: ApiClient = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        self._plurals: dict[tuple[str, str], tuple[str, bool]] = {}

    @property
    def url(self) -> str:
        return str(self.api_client.configuration.host)

    @property
    def is_emulated(self) -> bool:
        return self.emulator is not None

    def close(self) -> None:
        self.api_client.close()

    # ------------------------------------------------------------------ plumbing

    def request(self, method: str, path: str, *, body: Any = None, query: dict[str, Any] | None = None,
                content_type: str = "application/json") -> Any:
        """One raw API call; returns the decoded JSON, raises ApiException on HTTP errors."""
        query_params = [(k, v) for k, v in (query or {}).items() if v is not None]
        serialized = self.api_client.param_serialize(
            method, path, query_params=query_params,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body, auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*serialized)
        response.read()
        return self.api_client.response_deserialize(
            response, {"2XX": "object", "4XX": "object", "5XX": "object"}).data

    def resolve(self, api_version: str, kind: str) -> tuple[str, bool]:
        """Map a kind (or plural) to ``(plural, namespaced)`` through API discovery."""
        key = (api_version, kind)
        if key not in self._plurals:
            prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
            for resource in self.request("GET", prefix)["resources"]:
                if "/" in resource["name"]:
                    continue
                if kind in (resource["kind"], resource["name"]):
                    self._plurals[key] = (resource["name"], bool(resource["namespaced"]))
                    break
            else:
                raise LookupError(f"{api_version} serves no resource of kind or plural {kind!r}")
        return self._plurals[key]

    def path(self, api_version: str, kind: str, name: str | None = None, namespace: str | None = None,
             subresource: str | None = None) -> str:
        plural, namespaced = self.resolve(api_version, kind)
        prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        parts = [prefix]
        if namespaced:
            parts.append(f"namespaces/{namespace or self.namespace}")
        parts.append(plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)

    # ------------------------------------------------------------------ verbs

    def create(self, manifest: dict[str, Any], *, namespace: str | None = None) -> dict[str, Any]:
        path = self.path(manifest["apiVersion"], manifest["kind"],
                         namespace=namespace or manifest.get("metadata", {}).get("namespace"))
        return self.request("POST", path, body=manifest)

    def get(self, api_version: str, kind: str, name: str, *, namespace: str | None = None,
            subresource: str | None = None) -> dict[str, Any]:
        return self.request("GET", self.path(api_version, kind, name, namespace, subresource))

    def find(self, api_version: str, kind: str, name: str, *, namespace: str | None = None) -> dict[str, Any] | None:
        """Like :meth:`get`, but ``None`` when the object does not exist."""
        try:
            return self.get(api_version, kind, name, namespace=namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, *, namespace: str | None = None,
             label_selector: str | None = None, field_selector: str | None = None) -> list[dict[str, Any]]:
        path = self.path(api_version, kind, namespace=namespace)
        found = self.request("GET", path, query={"labelSelector": label_selector, "fieldSelector": field_selector})
        return list(found["items"])

    def patch(self, api_version: str, kind: str, name: str, patch: Any, *, namespace: str | None = None,
              subresource: str | None = None, content_type: str = MERGE_PATCH) -> dict[str, Any]:
        path = self.path(api_version, kind, name, namespace, subresource)
        return self.request("PATCH", path, body=patch, content_type=content_type)

    def replace(self, manifest: dict[str, Any], *, subresource: str | None = None) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = self.path(manifest["apiVersion"], manifest["kind"], meta["name"], meta.get("namespace"), subresource)
        return self.request("PUT", path, body=manifest)

    def delete(self, api_version: str, kind: str, name: str, *, namespace: str | None = None,
               propagation_policy: str | None = None, missing_ok: bool = False) -> dict[str, Any] | None:
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if propagation_policy:
            body["propagationPolicy"] = propagation_policy
        try:
            return self.request("DELETE", self.path(api_version, kind, name, namespace), body=body)
        except ApiException as exc:
            if missing_ok and exc.status == 404:
                return None
            raise

    def ensure(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create unless it exists (for shared prerequisites such as CRDs on a real cluster)."""
        try:
            return self.create(manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            meta = manifest["metadata"]
            return self.get(manifest["apiVersion"], manifest["kind"], meta["name"], namespace=meta.get("namespace"))

    def wait_for(self, probe: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05,
                 what: str = "the condition") -> T:
        """Poll ``probe()`` until it returns something truthy; return that, or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        last: T = probe()
        while not last:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
            time.sleep(interval)
            last = probe()
        return last

    def wait_gone(self, api_version: str, kind: str, name: str, *, namespace: str | None = None,
                  timeout: float = 10.0) -> None:
        self.wait_for(lambda: self.find(api_version, kind, name, namespace=namespace) is None,
                      timeout=timeout, what=f"{kind} {name} to be deleted")


def fresh_namespace_name(prefix: str = "kt-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
