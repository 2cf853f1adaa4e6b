"""The operator's configuration: one documented class, read from ``KUBETUNE_*`` environment variables.

``kubetune operator`` (``kubetune.operator.running``) builds it from the environment and its
command-line flags (flags win), the Helm chart sets the same variables on the Deployment, and the
``@kopf.on.startup`` handler turns it into kopf's settings. The builders receive the few fields
they need (trainer image, grace period, rendezvous port) so that ``kubetune render`` shows exactly
what the operator would create with the same configuration.

The class is a ``pydantic_settings.BaseSettings``: pydantic-settings reads the variables (prefix
``KUBETUNE_``, empty values ignored) and pydantic converts and checks them. What stays ours is
small: comma-separated lists (``NoDecode`` + a validator, where pydantic-settings would expect
JSON) and error messages that name the variable (``KUBETUNE_HEALTH_PORT: must be an integer (got
'eighty')``) instead of pydantic's field-path report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "KUBETUNE_"

#: The trainer image used when a FineTuneJob does not name one (spec.resources.image).
DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"

CommaList = Annotated[tuple[str, ...], NoDecode]

# Set by Settings.from_env(environ=...) while it builds: read that mapping instead of os.environ.
_explicit_environ: ContextVar[Mapping[str, str] | None] = ContextVar("kubetune_settings_environ", default=None)


class Settings(BaseSettings):
    """Everything an operator deployment can tune. Each field is ``KUBETUNE_<FIELD_IN_CAPITALS>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="ignore",
                                      case_sensitive=False)

    namespaces: CommaList = Field(default=(), description="Namespaces to watch, comma-separated; empty watches the whole cluster.")
    trainer_image: str = Field(default=DEFAULT_TRAINER_IMAGE, description="Default trainer image.")
    trainer_image_pull_secrets: CommaList = Field(
        default=(), description="Secrets (comma-separated names) the trainer pods pull their image with.")
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    health_port: int = Field(default=8080, description="Port of the liveness/readiness endpoint (/healthz); 0 turns it off.")
    metrics_port: int = Field(default=0, description="Port of the Prometheus /metrics endpoint; 0 turns it off.")
    peering: str = Field(
        default="",
        description=("kopf peering object name for running several replicas; empty runs standalone (one replica, "
                     "no KopfPeering resource needed)."),
    )
    watch_server_timeout: int = Field(
        default=300, description="Seconds the API server keeps a watch open before the operator reconnects.")
    watch_client_timeout: int = Field(
        default=330, description="Seconds without any data after which the operator drops a watch (> server timeout).")
    request_timeout: int = Field(default=60, description="Seconds for one API request.")
    termination_grace_seconds: int = Field(
        default=300, description="Grace period of trainer pods: time to write a checkpoint on SIGTERM.")
    rendezvous_port: int = Field(default=29500, description="Port of the torch distributed rendezvous (MASTER_PORT).")
    run_as_user: int = Field(default=1000, description="UID of the trainer processes (the pods run as non-root).")
    retry_delay: int = Field(default=10, description="Seconds before a handler that waits on something retries.")
    webhook_port: int = Field(
        default=0, description="Port of the validating admission webhook (kopf's webhook server); 0 turns it off.")
    webhook_host: str = Field(
        default="", description="Host name the API server calls the webhook by (the Service's DNS name); in the certificate.")
    webhook_cert_file: str = Field(
        default="", description=("TLS certificate of the webhook (PEM, e.g. from cert-manager); empty: a self-signed "
                                 "one made at start-up for webhook_host (kubetune.operator.certificates)."))
    webhook_key_file: str = Field(default="", description="Private key of the webhook certificate (PEM).")
    webhook_failure_policy: str = Field(
        default="Fail", description="failurePolicy of the webhook: Fail (refuse when it cannot answer) or Ignore.")

    @field_validator("namespaces", "trainer_image_pull_secrets", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        self.check()
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags (init values) win over the environment; no .env or secret files: the chart sets variables.
        environ = _explicit_environ.get()
        if environ is not None:
            return (init_settings, _MappingSource(settings_cls, environ))
        return (init_settings, env_settings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``KUBETUNE_*`` variables (``os.environ`` unless ``environ`` is given);
        ``overrides`` that are not None win (CLI flags). Bad values raise ValueError naming the variable."""
        values: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
        token = _explicit_environ.set(environ)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ValueError(_explain(exc)) from None
        finally:
            _explicit_environ.reset(token)

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
        return {ENV_PREFIX + name.upper(): field.description or "" for name, field in cls.model_fields.items()}


def webhook_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``KUBETUNE_WEBHOOK_PORT`` turns the validating webhook on (read when the handlers are registered)."""
    env = os.environ if environ is None else environ
    return env.get(ENV_PREFIX + "WEBHOOK_PORT", "0").strip() not in ("", "0")


def webhook_ignores_failures(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the webhook's failurePolicy is Ignore: read when the handlers are registered (kopf
    takes it per handler), before the Settings of the running operator exist."""
    env = os.environ if environ is None else environ
    return env.get(ENV_PREFIX + "WEBHOOK_FAILURE_POLICY", "Fail").strip() == "Ignore"


class _MappingSource(PydanticBaseSettingsSource):
    """``KUBETUNE_*`` values from a given mapping (tests, ``from_env(environ)``), empty ones ignored."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = {key.upper(): value for key, value in environ.items()}

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._environ.get(ENV_PREFIX + field_name.upper()), field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.settings_cls.model_fields:
            raw = self._environ.get(ENV_PREFIX + name.upper())
            if raw not in (None, ""):
                values[name] = raw
        return values


def _explain(error: ValidationError) -> str:
    """One line per bad variable, named as the user set it."""
    lines = []
    for problem in error.errors():
        location = problem.get("loc") or ()
        if not location:  # a model-level check (check()) already names its variables
            lines.append(str(problem.get("msg", "")).removeprefix("Value error, "))
            continue
        name = ENV_PREFIX + str(location[0]).upper()
        if problem.get("type") in ("int_parsing", "int_type", "int_from_float"):
            lines.append(f"{name}: must be an integer (got {problem.get('input')!r})")
        else:
            lines.append(f"{name}: {problem.get('msg')} (got {problem.get('input')!r})")
    return "; ".join(lines)
