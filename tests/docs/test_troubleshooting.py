"""docs/troubleshooting.md names only phases, conditions, reasons and Events the operator writes.

Each row of its table starts with what a user sees in ``kubectl describe ftj``; a phase, condition
type or reason written there (a CamelCase word in backticks) must be one the code can produce: a
phase, a ``ConditionType``, a ``Reason``, an Event reason the operator posts, or one of the
Kubernetes reasons the operator passes through from a waiting pod.
"""

from __future__ import annotations

import re
from pathlib import Path

from kubetune.api import ConditionType, Reason
from kubetune.api.statuses import PHASES

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "troubleshooting.md"
#: Reasons the kubelet/scheduler write on a pod that phases.waiting_detail carries into the message.
FROM_PODS = {"Unschedulable", "ImagePullBackOff"}


def _written_by_the_operator() -> set[str]:
    reasons = {value for name, value in vars(Reason).items() if name.isupper()}
    events = set()
    for source in (ROOT / "operator").glob("*.py"):
        events.update(re.findall(r'reason="([A-Za-z]+)"', source.read_text(encoding="utf-8")))
    return set(PHASES) | set(ConditionType.ALL) | reasons | events


def test_every_phase_condition_and_reason_in_the_table_is_one_the_operator_writes() -> None:
    seen = [row.split("|")[1] for row in PAGE.read_text(encoding="utf-8").splitlines()
            if row.startswith("| ") and not row.startswith("| you see")]
    named = {word for cell in seen for word in re.findall(r"`([A-Z][A-Za-z]+)`", cell)}
    assert {"PodsPending", "SuspendManagedByKueue", "MetricPlateau"} <= named  # the table is parsed
    assert named - _written_by_the_operator() - FROM_PODS == set()
