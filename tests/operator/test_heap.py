"""The operator process tunes CPython's cyclic garbage collector before kopf starts (issue 14).

With the interpreter's defaults a full collection of a busy operator ran every ~60 lifecycles and
scanned the whole heap, start-up modules included, stalling event handling for longer the more jobs
there were (bench/README.md, "Completion latency and the garbage collector"). ``kubetune operator``
freezes the start-up heap and raises the young-generation threshold before it runs kopf; these
tests run it in a child process (a frozen heap would stay frozen in the test session) with
``kopf.run`` replaced by a probe of the collector's state at that moment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import argparse, gc, json, sys
    import kopf
    from kubetune.operator import running

    def probe(**_):
        # What a full collection would scan now (the permanent generation is not among these).
        scanned = len(gc.get_objects())
        print(json.dumps({"frozen": gc.get_freeze_count(), "scanned": scanned, "thresholds": gc.get_threshold()}))

    kopf.run = probe
    sys.exit(running.operator_main(argparse.Namespace(namespaces=["probe"], health_port=0)))
""")


def run_probe(extra_env: dict[str, str] | None = None) -> dict[str, object]:
    env = {**os.environ, "KUBETUNE_HEALTH_PORT": "0", "KUBETUNE_METRICS_PORT": "0", **(extra_env or {})}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_operator_freezes_its_start_up_heap_before_kopf_runs() -> None:
    seen = run_probe()
    frozen, scanned = seen["frozen"], seen["scanned"]
    assert isinstance(frozen, int) and isinstance(scanned, int)
    # kopf, aiohttp, pydantic and our modules: tens of thousands of objects no collection needs to scan.
    assert frozen > 30_000, seen
    assert scanned < frozen // 20, seen  # a full collection now scans a few percent of the start-up heap


def test_operator_raises_the_young_generation_threshold() -> None:
    from kubetune.operator import running

    seen = run_probe()
    assert tuple(seen["thresholds"]) == running.GC_THRESHOLDS  # type: ignore[arg-type]
    assert running.GC_THRESHOLDS[0] >= 10_000  # not CPython's 700: a burst's transients die young
