"""A child's name already taken by an object the FineTuneJob does not own.

A ConfigMap (or ServiceAccount, Role, …) of the same name that someone else made — no owner
reference to this FineTuneJob, no kubetune labels — is never overwritten, and never used either:
mounting someone's ConfigMap as the trainer's config, or binding someone's Role, would run the
trainer on what it did not ask for. The job says so (condition ``Created`` False, reason
``NameTaken``, naming the object, and one Warning Event), makes no Job, and goes on once the name is
free again. The children it did make are its own and stay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from kubetune.api import ConditionType, Reason
from kubetune.operator import naming
from tests.operator.operating import condition, events, manifest, status
from tests.support.clusters import Cluster

Operator = Callable[..., Any]


@pytest.mark.parametrize(("api", "kind", "name_of", "body"), [
    ("v1", "ConfigMap", lambda n: n.config_map, {"data": {"config.json": '{"mine": true}'}}),
    ("rbac.authorization.k8s.io/v1", "Role", lambda n: n.role,
     {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}),
])
def test_a_foreign_object_of_a_childs_name_is_reported_untouched_and_no_job_is_made(
        emulated_cluster: Cluster, operator_process: Operator, monkeypatch: pytest.MonkeyPatch,
        api: str, kind: str, name_of: Callable[[Any], str], body: dict[str, Any]) -> None:
    monkeypatch.setenv("KUBETUNE_RETRY_DELAY", "1")
    cluster = emulated_cluster
    taken = name_of(naming.names_for("clash"))
    cluster.create({"apiVersion": api, "kind": kind, "metadata": {"name": taken, "labels": {"team": "other"}}, **body})
    foreign = cluster.get(api, kind, taken)
    with operator_process(cluster.namespace):
        cluster.create(manifest("clash"))
        created = cluster.wait_for(lambda: condition(cluster, "clash", ConditionType.CREATED), timeout=30,
                                   what="the Created condition")
        assert created["status"] == "False" and created["reason"] == Reason.NAME_TAKEN, created
        assert f"{kind} {taken}" in created["message"], created
        assert status(cluster, "clash")["phase"] == "Pending"
        cluster.wait_for(lambda: any(r == Reason.NAME_TAKEN for _, r, _ in events(cluster, "clash")), timeout=30,
                         what="the NameTaken Event")
        # kopf retries the handler (every second here): still no Job, and the object is as it was
        time.sleep(2.5)
        assert cluster.find("batch/v1", "Job", "clash") is None, "a Job was made on someone else's object"
        kept = cluster.get(api, kind, taken)
        assert kept["metadata"]["uid"] == foreign["metadata"]["uid"]
        assert kept["metadata"].get("resourceVersion") == foreign["metadata"].get("resourceVersion"), "it was written"
        assert not kept["metadata"].get("ownerReferences")
        taken_events = [m for t, r, m in events(cluster, "clash") if r == Reason.NAME_TAKEN]
        assert len(taken_events) == 1 and f"{kind} {taken}" in taken_events[0], taken_events  # once, not per retry
        # the name is freed: the job goes on, with its own object
        cluster.delete(api, kind, taken)
        cluster.wait_for(lambda: cluster.find("batch/v1", "Job", "clash"), timeout=30, what="the Job once freed")
        cluster.wait_for(lambda: (c := condition(cluster, "clash", ConditionType.CREATED)) and c["status"] == "True",
                         timeout=30, what="Created True")
    mine = cluster.get(api, kind, taken)
    assert [ref["name"] for ref in mine["metadata"]["ownerReferences"]] == ["clash"]
