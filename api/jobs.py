"""The FineTuneJob resource as a whole: identity constants, metadata, spec and status."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.specs import FineTuneJobSpec
from kubetune.api.statuses import FineTuneJobStatus

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CRD_NAME = f"{PLURAL}.{GROUP}"

#: The Kueue label that puts a job in a LocalQueue.
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


class ObjectMeta(BaseModel):
    """The parts of metadata kubetune reads; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of the FineTuneJob (DNS subdomain).",
    )
    namespace: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    uid: str | None = None
    generation: int | None = None


class FineTuneJob(BaseModel):
    """A FineTuneJob manifest, as applied with kubectl or read by ``kubetune train -f``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"

    @property
    def queue_name(self) -> str | None:
        """Kueue queue: the label wins over spec.resources.queueName."""
        labels = self.metadata.labels or {}
        return labels.get(KUEUE_QUEUE_LABEL) or self.spec.resources.queue_name

    def to_manifest(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
