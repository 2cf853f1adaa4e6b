"""Smoke run of the operator scale benchmark (``bench/operator_scale.py``) at a tiny N.

The real operator process (``kubetune operator``) against the emulator in its own process: every
FineTuneJob gets its Job and reaches Succeeded, nothing errs, the operator loads no torch, and the
API requests it made are counted per lifecycle (every child object among the writes).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib

import pytest

from bench import operator_scale

pytestmark = pytest.mark.slow


def bench_args(**given: object) -> argparse.Namespace:
    """The bench's command line as its parser fills it (tiny N, short timeouts), with ``given`` over it."""
    defaults = dict(n=3, kubeconfig=None, crd_server=None, reference=False, namespace=None, concurrency=8,
                    timeout=60.0, settle=0.5, operator_env={}, profile_operator=None)
    return argparse.Namespace(**{**defaults, **given})


def test_the_parser_fills_every_field_run_bench_reads() -> None:
    parsed = vars(operator_scale.build_parser().parse_args(["--n", "3"]))
    assert set(vars(bench_args())) <= set(parsed), set(vars(bench_args())) - set(parsed)


def test_small_run_completes_and_counts_every_write() -> None:
    result = asyncio.run(operator_scale.run_bench(bench_args(n=3)))

    assert result["complete"], result
    assert result["lost"] == 0
    assert result["errors"]["operator_log"] == 0, result["errors"]
    assert result["errors"]["api"] == [] and result["errors"]["controller"] == []
    assert result["operator"]["torch_loaded"] is False  # the operator image has no torch
    assert result["operator"]["peak_rss_mb"] > 0 and result["operator"]["cpu_seconds"] > 0
    per = result["api"]["per_lifecycle"]
    for child in ("jobs", "configmaps", "persistentvolumeclaims", "serviceaccounts", "roles", "rolebindings"):
        assert per.get(f"create {child}") == 1.0, per  # one create per child, none made twice
    assert "create services" not in per, per  # single-node jobs: no rendezvous Service
    assert per.get("patch finetunejobs/status") == 3.0, per
    assert result["api"]["writes_per_lifecycle"] == 11.0, per
    for key in ("create_to_job_s", "last_create_to_job_s", "complete_to_succeeded_s"):
        assert result[key]["p99"] is not None and result[key]["p99"] >= result[key]["p50"] >= 0
    # The completion phase on its own: each process's CPU per completed Job, and the delays by the
    # order the Jobs were completed in (3 Jobs fill 3 of the 10 slices).
    completion = result["completion"]
    assert completion["phase_s"] >= completion["completions_sent_s"] >= 0
    cpu = completion["cpu_ms_per_job"]
    # /proc counts CPU in 10 ms ticks: 3 completions can cost a process less than one tick (seen: the
    # operator 0.0 in a fresh-clone run), so the smoke checks the three figures are there, not their size.
    assert set(cpu) == {"operator", "emulator", "bench"} and all(value >= 0 for value in cpu.values()), cpu
    assert cpu["operator"] + cpu["emulator"] + cpu["bench"] > 0, cpu
    slices = completion["latency_by_completion_order_s"]
    assert len(slices) == 10 and sum(part is not None for part in slices) == 3, slices
    assert abs(max(part["max"] for part in slices if part) - result["complete_to_succeeded_s"]["max"]) < 1e-3
    assert len(result["load_before"]) == 3 and len(result["load_after"]) == 3


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


def test_the_emulator_alone_replays_the_operators_request_mix() -> None:
    args = argparse.Namespace(n=3, concurrency=8)
    result = asyncio.run(operator_scale.run_emulator_only(args))
    assert result["errors"] == [], result
    per = result["api"]["per_lifecycle"]
    for child in ("jobs", "configmaps", "persistentvolumeclaims", "serviceaccounts", "roles", "rolebindings"):
        assert per.get(f"create {child}") == 1.0, per
    assert per["get finetunejobs"] == 1.0 and per["patch finetunejobs/status"] == 3.0 and per["create events"] == 2.0
    assert result["watch_events"] == 3 * 13  # FineTuneJob 4, Job 5, pod 4 per lifecycle, on the three watches
    assert result["emulator_cpu_seconds"] > 0 and result["emulator_ceiling_lifecycles_per_s"] > 0


def test_profile_summary_ranks_functions_and_packages() -> None:
    from bench import profile_summary

    text = ("main (/x/kubetune/cli.py:1);loads (/usr/lib/python3.11/json/__init__.py:3);"
            "JSONDecoder.raw_decode (/usr/lib/python3.11/json/decoder.py:9) 3\n"
            "main (/x/kubetune/cli.py:1);follow_job (/x/operator/handlers.py:5) 1\n")
    summary = profile_summary.summarize(text, top=5)
    assert "75.0%  JSONDecoder.raw_decode (/usr/lib/python3.11/json/decoder.py)" in summary
    assert "25.0%  kubetune/operator" in summary
    assert "100.0%  main (/x/kubetune/cli.py)" in summary


def test_the_reference_operator_runs_under_the_same_bench() -> None:
    """The issue's yardstick (a minimal idiomatic kopf operator) is measured by the same bench: it
    makes each FineTuneJob's Job and mirrors its phase, and its writes are counted the same way."""
    result = asyncio.run(operator_scale.run_bench(bench_args(n=3, reference=True)))

    assert result["operator_under_test"].startswith("reference"), result
    assert result["complete"] and result["lost"] == 0, result
    assert result["errors"]["operator_log"] == 0, result["errors"]
    per = result["api"]["per_lifecycle"]
    assert per.get("create jobs") == 1.0, per
    assert "create configmaps" not in per and "create roles" not in per, per  # the Job only
    assert per.get("patch finetunejobs/status", 0) >= 2.0, per  # Running, then Succeeded at least
    assert result["complete_to_succeeded_s"]["p99"] is not None


def test_a_folder_without_the_shim_is_named(tmp_path: pathlib.Path) -> None:
    from bench.crd_apiserver import ShimmedCrdServer

    with pytest.raises(FileNotFoundError, match="build_crd_server.sh"):
        ShimmedCrdServer(tmp_path, tmp_path / "work")
