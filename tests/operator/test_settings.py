"""Operator settings from KUBETUNE_* variables and flags, and the kopf settings they turn into."""

from __future__ import annotations

import kopf
import pytest

from kubetune.operator import kubeapi, persistence, running
from kubetune.operator.settings import Settings


def test_environment_is_read_and_flags_win() -> None:
    env = {"KUBETUNE_NAMESPACES": "ml, research", "KUBETUNE_TRAINER_IMAGE": "a/b:1",
           "KUBETUNE_TERMINATION_GRACE_SECONDS": "900", "KUBETUNE_PEERING": "",
           "KUBETUNE_TRAINER_IMAGE_PULL_SECRETS": "regcred,mirror"}
    settings = Settings.from_env(env, trainer_image="c/d:2", health_port=None)
    assert settings.namespaces == ("ml", "research")
    assert settings.trainer_image == "c/d:2"
    assert settings.termination_grace_seconds == 900
    assert settings.health_port == 8080 and settings.peering == ""
    assert settings.trainer_image_pull_secrets == ("regcred", "mirror")
    assert Settings.from_env({"KUBETUNE_TRAINER_IMAGE_PULL_SECRETS": ""}).trainer_image_pull_secrets == ()


@pytest.mark.parametrize(("env", "message"), [
    ({"KUBETUNE_HEALTH_PORT": "eighty"}, "KUBETUNE_HEALTH_PORT: must be an integer (got 'eighty')"),
    ({"KUBETUNE_LOG_LEVEL": "LOUD"}, "KUBETUNE_LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR"),
    ({"KUBETUNE_WATCH_SERVER_TIMEOUT": "600", "KUBETUNE_WATCH_CLIENT_TIMEOUT": "60"},
     "KUBETUNE_WATCH_CLIENT_TIMEOUT: must be greater than KUBETUNE_WATCH_SERVER_TIMEOUT"),
])
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_every_setting_is_documented() -> None:
    docs = Settings.documentation()
    assert all(text for text in docs.values()) and "KUBETUNE_TRAINER_IMAGE" in docs


def test_kopf_settings_are_chosen_on_purpose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubeapi, "connect", lambda: None)
    settings = kopf.OperatorSettings()
    memo = kopf.Memo(settings=Settings(watch_server_timeout=100, watch_client_timeout=130))
    running.configure(settings, memo)
    assert settings.persistence.finalizer == "kubetune.io/finalizer"
    assert isinstance(settings.persistence.progress_storage, persistence.RetriesOnlyProgress)
    assert settings.persistence.progress_storage.prefix == "kubetune.io"
    assert isinstance(settings.persistence.diffbase_storage, persistence.GenerationDiffBase)
    assert settings.peering.standalone is True
    assert (settings.watching.server_timeout, settings.watching.client_timeout) == (100, 130)
    assert settings.scanning.disabled is True

    peered = kopf.OperatorSettings()
    running.configure(peered, kopf.Memo(settings=Settings(peering="kubetune")))
    assert peered.peering.standalone is False and peered.peering.name == "kubetune"


def test_jobs_by_phase_counts_jobs_without_a_phase_until_they_are_deleted(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, int]] = []
    monkeypatch.setattr(running.metrics, "set_jobs_by_phase", lambda counts: seen.append(dict(counts)))
    monkeypatch.setattr(running, "_phases", {})
    monkeypatch.setattr(running, "_counts", running.Counter())
    running.track_phase("a", None)
    running.track_phase("b", "Running")
    running.track_phase("a", None)  # a later event, still no phase: still counted
    assert seen[-1] == {"Unknown": 1, "Running": 1}
    running.track_phase("a", "Pending")
    running.track_phase("b", "Running", deleted=True)
    assert seen[-1] == {"Pending": 1}


def test_the_process_environment_is_read_by_pydantic_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_NAMESPACES", "a,b")
    monkeypatch.setenv("KUBETUNE_RETRY_DELAY", "3")
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "")  # empty: the default
    settings = Settings.from_env(retry_delay=None)
    assert settings.namespaces == ("a", "b") and settings.retry_delay == 3 and settings.metrics_port == 0
    monkeypatch.setenv("KUBETUNE_REQUEST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"KUBETUNE_REQUEST_TIMEOUT: must be an integer \(got 'soon'\)"):
        Settings.from_env()


def test_the_trainer_pod_settings_reach_the_pods() -> None:
    """docs/operations.md: KUBETUNE_RUN_AS_USER, _TERMINATION_GRACE_SECONDS and _RENDEZVOUS_PORT
    are the trainer pods' uid, grace period and MASTER_PORT."""
    from kubetune.operator import building
    from tests.operator.test_building import job_of

    settings = Settings.from_env({"KUBETUNE_RUN_AS_USER": "2000", "KUBETUNE_TERMINATION_GRACE_SECONDS": "120",
                                  "KUBETUNE_RENDEZVOUS_PORT": "29400"})
    pod = building.build_job(job_of(), building.BuildOptions.from_settings(settings))["spec"]["template"]["spec"]
    assert {pod["securityContext"][k] for k in ("runAsUser", "runAsGroup", "fsGroup")} == {2000}
    assert pod["terminationGracePeriodSeconds"] == 120
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["MASTER_PORT"] == "29400"
    default = building.build_job(job_of(), building.BuildOptions.from_settings(Settings.from_env({})))
    assert default["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 300  # docs/reliability.md
