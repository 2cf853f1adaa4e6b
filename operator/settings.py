"""The operator's configuration: one documented class, read from ``KUBETUNE_*`` environment variables.

``kubetune operator`` (``kubetune.operator.running``) builds it from the environment and its
command-line flags (flags win), the Helm chart sets the same variables on the Deployment, and the
``@kopf.on.startup`` handler turns it into kopf's settings. The builders receive the few fields
they need (trainer image, grace period, rendezvous port) so that ``kubetune render`` shows exactly
what the operator would create with the same configuration.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

ENV_PREFIX = "KUBETUNE_"

#: The trainer image used when a FineTuneJob does not name one (spec.resources.image).
DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Settings:
    """Everything an operator deployment can tune. Each field is ``KUBETUNE_<FIELD_IN_CAPITALS>``."""

    namespaces: tuple[str, ...] = field(
        default=(), metadata=_doc("Namespaces to watch, comma-separated; empty watches the whole cluster.")
    )
    trainer_image: str = field(default=DEFAULT_TRAINER_IMAGE, metadata=_doc("Default trainer image."))
    trainer_image_pull_secrets: tuple[str, ...] = field(
        default=(), metadata=_doc("Secrets (comma-separated names) the trainer pods pull their image with.")
    )
    log_level: str = field(default="INFO", metadata=_doc("DEBUG, INFO, WARNING or ERROR."))
    health_port: int = field(
        default=8080, metadata=_doc("Port of the liveness/readiness endpoint (/healthz); 0 turns it off.")
    )
    metrics_port: int = field(default=0, metadata=_doc("Port of the Prometheus /metrics endpoint; 0 turns it off."))
    peering: str = field(
        default="",
        metadata=_doc(
            "kopf peering object name for running several replicas; empty runs standalone (one replica, "
            "no KopfPeering resource needed)."
        ),
    )
    watch_server_timeout: int = field(
        default=300, metadata=_doc("Seconds the API server keeps a watch open before the operator reconnects.")
    )
    watch_client_timeout: int = field(
        default=330, metadata=_doc("Seconds without any data after which the operator drops a watch (> server timeout).")
    )
    request_timeout: int = field(default=60, metadata=_doc("Seconds for one API request."))
    termination_grace_seconds: int = field(
        default=300, metadata=_doc("Grace period of trainer pods: time to write a checkpoint on SIGTERM.")
    )
    rendezvous_port: int = field(default=29500, metadata=_doc("Port of the torch distributed rendezvous (MASTER_PORT)."))
    run_as_user: int = field(default=1000, metadata=_doc("UID of the trainer processes (the pods run as non-root)."))
    retry_delay: int = field(default=10, metadata=_doc("Seconds before a handler that waits on something retries."))
    webhook_port: int = field(
        default=0, metadata=_doc("Port of the validating admission webhook (kopf's webhook server); 0 turns it off.")
    )
    webhook_host: str = field(
        default="", metadata=_doc("Host name the API server calls the webhook by (the Service's DNS name); in the certificate.")
    )
    webhook_cert_file: str = field(
        default="", metadata=_doc("TLS certificate of the webhook (PEM, e.g. from cert-manager); empty: kopf's self-signed one (needs the certbuilder package).")
    )
    webhook_key_file: str = field(default="", metadata=_doc("Private key of the webhook certificate (PEM)."))
    webhook_failure_policy: str = field(
        default="Fail", metadata=_doc("failurePolicy of the webhook: Fail (refuse when it cannot answer) or Ignore.")
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``KUBETUNE_*`` variables; ``overrides`` that are not None win (CLI flags)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f, raw)
        for key, value in overrides.items():
            if value is not None:
                values[key] = tuple(value) if key == "namespaces" else value  # type: ignore[arg-type]
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"{ENV_PREFIX}LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR (got {self.log_level!r})")
        if self.watch_client_timeout <= self.watch_server_timeout:
            raise ValueError(
                f"{ENV_PREFIX}WATCH_CLIENT_TIMEOUT: must be greater than {ENV_PREFIX}WATCH_SERVER_TIMEOUT "
                f"({self.watch_client_timeout} <= {self.watch_server_timeout})"
            )
        if self.webhook_failure_policy not in ("Fail", "Ignore"):
            raise ValueError(f"{ENV_PREFIX}WEBHOOK_FAILURE_POLICY: must be Fail or Ignore (got {self.webhook_failure_policy!r})")
        if self.termination_grace_seconds < 0:
            raise ValueError(f"{ENV_PREFIX}TERMINATION_GRACE_SECONDS: must be >= 0 (got {self.termination_grace_seconds})")

    @classmethod
    def documentation(cls) -> dict[str, str]:
        """Variable name -> description, for the chart's values and the docs."""
        return {ENV_PREFIX + f.name.upper(): f.metadata["doc"] for f in dataclasses.fields(cls)}


def webhook_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``KUBETUNE_WEBHOOK_PORT`` turns the validating webhook on (read when the handlers are registered)."""
    env = os.environ if environ is None else environ
    return env.get(ENV_PREFIX + "WEBHOOK_PORT", "0").strip() not in ("", "0")


def webhook_ignores_failures(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the webhook's failurePolicy is Ignore: read when the handlers are registered (kopf
    takes it per handler), before the Settings of the running operator exist."""
    env = os.environ if environ is None else environ
    return env.get(ENV_PREFIX + "WEBHOOK_FAILURE_POLICY", "Fail").strip() == "Ignore"


def _convert(f: dataclasses.Field[object], raw: str) -> object:
    name = ENV_PREFIX + f.name.upper()
    if f.type in ("int", int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{name}: must be an integer (got {raw!r})") from None
    if f.type in ("bool", bool):
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"{name}: must be true or false (got {raw!r})")
    if f.name in ("namespaces", "trainer_image_pull_secrets"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw
