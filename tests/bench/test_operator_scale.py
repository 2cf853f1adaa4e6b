"""Smoke run of the operator scale benchmark (``bench/operator_scale.py``) at a tiny N.

The real operator process (``kubetune operator``) against the emulator in its own process: every
FineTuneJob gets its Job and reaches Succeeded, nothing errs, the operator loads no torch, and the
API requests it made are counted per lifecycle (every child object among the writes).
"""

from __future__ import annotations

import argparse
import asyncio

import pytest

from bench import operator_scale

pytestmark = pytest.mark.slow


def test_small_run_completes_and_counts_every_write() -> None:
    args = argparse.Namespace(n=3, kubeconfig=None, namespace=None, concurrency=8, timeout=60.0,
                              settle=0.5, operator_env={})
    result = asyncio.run(operator_scale.run_bench(args))

    assert result["complete"], result
    assert result["lost"] == 0
    assert result["errors"]["operator_log"] == 0, result["errors"]
    assert result["errors"]["api"] == [] and result["errors"]["controller"] == []
    assert result["operator"]["torch_loaded"] is False  # the operator image has no torch
    assert result["operator"]["peak_rss_mb"] > 0 and result["operator"]["cpu_seconds"] > 0
    per = result["api"]["per_lifecycle"]
    for child in ("jobs", "configmaps", "services", "serviceaccounts", "roles", "rolebindings"):
        assert per.get(f"create {child}") == 1.0, per  # one create per child, none made twice
    assert result["api"]["writes_per_lifecycle"] >= 7
    for key in ("create_to_job_s", "last_create_to_job_s", "complete_to_succeeded_s"):
        assert result[key]["p99"] is not None and result[key]["p99"] >= result[key]["p50"] >= 0


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert operator_scale.percentile(values, 50) == 50.0
    assert operator_scale.percentile(values, 99) == 99.0
    assert operator_scale.percentile([3.0], 99) == 3.0
    assert operator_scale.percentile([], 50) is None


def test_requests_are_named_as_the_api_server_names_them() -> None:
    classify = operator_scale.classify
    assert classify("GET", "/apis/batch/v1/namespaces/a/jobs", {"watch": "true"}) == ("watch", "jobs")
    assert classify("GET", "/api/v1/namespaces/a/pods", {}) == ("list", "pods")
    assert classify("PATCH", "/apis/kubetune.io/v1alpha1/namespaces/a/finetunejobs/x/status", {}) == (
        "patch", "finetunejobs/status")
    assert classify("POST", "/api/v1/namespaces", {}) == ("create", "namespaces")
