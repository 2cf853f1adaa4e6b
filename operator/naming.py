"""Deterministic, DNS-safe names and the labels of every object the operator makes for a job.

The builders (``kubetune.operator.building``) name children only through :func:`names_for`, so a
retry, a second replica or a restarted operator always computes the same names and an
``AlreadyExists`` answer means "already done", never "make another". A FineTuneJob's name is a
DNS subdomain (up to 253 characters, dots allowed); children need DNS labels (at most 63
characters, no dots), Services must start with a letter, and an Indexed Job's pods are named
``<job>-<index>`` so the Job name leaves room for the index. Names that do not fit are cut and
given a hash of the full name, so two long names that share a prefix never collide.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from kubetune.api import GROUP

#: The longest DNS label (RFC 1123), the limit of most object names and of label values.
DNS_LABEL_MAX = 63
#: An Indexed Job's pods get the hostname ``<job>-<index>``: room for ``-1023`` (1024 nodes at most).
JOB_NAME_MAX = DNS_LABEL_MAX - len("-1023")
_HASH_LEN = 8

# Labels the operator puts on every child (and on the trainer pods through the Job template).
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
#: The FineTuneJob a child belongs to (its name cut to a label value; see ANNOTATION_JOB for the full name).
LABEL_JOB = f"{GROUP}/job"
MANAGED_BY = "kubetune-operator"

#: Full FineTuneJob name on each child (label values are limited to 63 characters, names are not).
ANNOTATION_JOB = f"{GROUP}/job-name"
#: The FineTuneJob's uid on the trainer pods, read back through the downward API.
ANNOTATION_JOB_UID = f"{GROUP}/job-uid"
#: A hash of the trainer config on the pod template, so a changed config is visible at a glance.
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"

_INVALID = re.compile(r"[^a-z0-9-]+")


def short_hash(text: str, length: int = _HASH_LEN) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def dns_label(name: str, suffix: str = "", *, limit: int = DNS_LABEL_MAX, letter_first: bool = False) -> str:
    """``name`` + ``suffix`` as a DNS label of at most ``limit`` characters.

    A name that is already a valid label and fits is kept as it is (so ``kubectl get`` shows what
    the user expects); otherwise it is cleaned, cut and given a hash of the original name.
    """
    cleaned = _INVALID.sub("-", name.lower()).strip("-")
    cleaned = re.sub(r"-{2,}", "-", cleaned)
    if letter_first and not cleaned[:1].isalpha():
        cleaned = f"j-{cleaned}" if cleaned else "j"
    candidate = f"{cleaned}{suffix}"
    if cleaned == name and len(candidate) <= limit:
        return candidate
    room = limit - len(suffix) - _HASH_LEN - 1
    if room < 1:
        raise ValueError(f"suffix {suffix!r} leaves no room for a name within {limit} characters")
    head = cleaned[:room].rstrip("-") or "j"
    return f"{head}-{short_hash(name)}{suffix}"


def label_value(text: str) -> str:
    """A label value (<= 63 characters, alphanumeric at both ends) standing for ``text``."""
    return dns_label(text)


@dataclass(frozen=True)
class ChildNames:
    """The names of every object made for one FineTuneJob."""

    job: str
    service: str
    config_map: str
    claim: str
    service_account: str
    role: str
    role_binding: str

    def master_addr(self) -> str:
        """Stable hostname of node 0 (pod ``<job>-0`` in the headless Service's subdomain)."""
        return f"{self.job}-0.{self.service}"


def names_for(job_name: str) -> ChildNames:
    """Deterministic child names for the FineTuneJob called ``job_name``."""
    trainer = dns_label(job_name, "-trainer")
    return ChildNames(
        job=dns_label(job_name, limit=JOB_NAME_MAX),
        service=dns_label(job_name, limit=DNS_LABEL_MAX, letter_first=True),
        config_map=dns_label(job_name, "-config"),
        claim=dns_label(job_name, "-workspace"),
        service_account=trainer,
        role=trainer,
        role_binding=trainer,
    )


def selector_labels(job_name: str) -> dict[str, str]:
    """The labels that select one job's children and pods (the Service's selector)."""
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB: label_value(job_name)}


def child_labels(job_name: str, component: str) -> dict[str, str]:
    """All labels of one child object."""
    return {
        LABEL_NAME: "kubetune",
        LABEL_COMPONENT: component,
        LABEL_PART_OF: "kubetune",
        **selector_labels(job_name),
    }
