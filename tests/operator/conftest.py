"""Fixtures for running the real operator (kopf, our handlers) against the emulator or a cluster.

``operator_process`` gives a context manager that starts the operator in this process with
``kopf.testing.KopfRunner`` and a fresh ``kopf.OperatorRegistry`` (the handlers file is loaded
into it anew each time, so two runs in one test are two independent operators, as after a
restart), watching only the test's namespace.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import kopf
import kopf.testing
import pytest

import kubetune.operator

HANDLERS = str(pathlib.Path(kubetune.operator.__file__).with_name("handlers.py"))


@contextlib.contextmanager
def run_operator(namespace: str) -> Iterator[kopf.testing.KopfRunner]:
    args = ["run", "--standalone", "--namespace", namespace, HANDLERS]
    with kopf.testing.KopfRunner(args, registry=kopf.OperatorRegistry(), timeout=60) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output
    assert runner.exception is None, runner.exception


@pytest.fixture()
def operator_process(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Any]:
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "example.test/kubetune-trainer:test")
    monkeypatch.setenv("KUBETUNE_WATCH_SERVER_TIMEOUT", "30")
    monkeypatch.setenv("KUBETUNE_WATCH_CLIENT_TIMEOUT", "45")
    return run_operator
