"""The chart grants the operator exactly what its API gateway declares, and no more.

``kubetune.operator.kubeapi.REQUIRED_PERMISSIONS`` is the operator's own list of every (API group,
resource, verbs) it uses — the gateway refuses a call outside it, and the operator tests check
it against the requests the operator really makes. Here the rendered ClusterRole (all namespaces)
or Roles (a list of namespaces) must grant that set exactly: a missing verb breaks the operator
in a real cluster, an extra one breaks least privilege.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import validate_text
from tests.chart.conftest import NAMESPACE, RELEASE, ROOT, Render, by_kind, one

Grant = tuple[str, str, str]  # (api group, resource, verb)

#: Verbs that let a subject grant more than it holds, or act as someone else.
DANGEROUS_VERBS = {"*", "bind", "escalate", "impersonate"}


def required() -> set[Grant]:
    from kubetune.operator.kubeapi import REQUIRED_PERMISSIONS

    return {(group, resource, verb) for group, resource, verbs in REQUIRED_PERMISSIONS for verb in verbs}


def granted(rules: list[dict[str, Any]]) -> set[Grant]:
    out: set[Grant] = set()
    for rule in rules:
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def test_cluster_role_grants_exactly_the_required_permissions(render: Render) -> None:
    docs = render()
    role = one(docs, "ClusterRole")
    assert granted(role["rules"]) == required()
    assert not by_kind(docs, "Role")
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-kubetune", "namespace": NAMESPACE}]
    assert one(docs, "ServiceAccount")["metadata"]["name"] == f"{RELEASE}-kubetune"


def test_watched_namespaces_get_a_role_each_and_no_cluster_wide_grant(render: Render) -> None:
    docs = render({"watchNamespaces": ["team-a", "team-b"]})
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert granted(role["rules"]) == required()
    bindings = by_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-kubetune", "namespace": NAMESPACE}]
    # Every permission the operator needs is namespaced today, so nothing is cluster-wide.
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")


def test_no_wildcards_and_no_escalation_verbs(render: Render) -> None:
    for values in ({}, {"watchNamespaces": ["team-a"]}):
        for doc in render(values):
            if doc["kind"] in {"ClusterRole", "Role"}:
                grants = granted(doc["rules"])
                assert not {v for _, _, v in grants} & DANGEROUS_VERBS
                assert not {g for g, _, _ in grants} & {"*"} and not {r for _, r, _ in grants} & {"*"}
                assert not any(r.startswith("secrets") for _, r, _ in grants), "the operator never reads Secrets"
                # charts/kubetune/README.md: it never deletes anything (children go by owner references)
                assert not {v for _, _, v in grants} & {"delete", "deletecollection"}, "the operator never deletes"


def test_operator_holds_what_it_grants_each_trainer(render: Render) -> None:
    """Kubernetes lets a subject create a Role only with permissions it holds itself (no `escalate`)."""
    from kubetune.operator.building import build_role

    text = (ROOT / "examples" / "quickstart.yaml").read_text()
    (job,), problems = validate_text(text, "quickstart.yaml")
    assert not problems
    trainer_role = build_role(job)
    assert trainer_role is not None
    assert granted(trainer_role["rules"]) <= granted(one(render(), "ClusterRole")["rules"])


def test_required_permissions_name_real_resources() -> None:
    """A typo in the constant would make this test and the chart agree on a useless grant."""
    from kubetune.operator.kubeapi import RESOURCES

    known = {(group, plural) for group, _, plural in RESOURCES.values()}
    for group, resource, _ in required():
        assert (group, resource.split("/")[0]) in known, (group, resource)

