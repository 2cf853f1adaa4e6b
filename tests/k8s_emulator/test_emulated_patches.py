"""
The patch and selector semantics the emulator applies (``tests.support.patching`` and
``tests.support.selecting``), checked as pure functions against what the real API server does.
"""

from __future__ import annotations

import pytest

from tests.support.patching import JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH, PatchError, apply_patch
from tests.support.selecting import SelectorError, parse_field_selector, parse_label_selector

POD = {
    "metadata": {"name": "p", "finalizers": ["a"], "labels": {"x": "1"}},
    "spec": {
        "containers": [
            {"name": "trainer", "image": "old", "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
            {"name": "sidecar", "image": "side"},
        ],
        "tolerations": [{"key": "gpu"}],
    },
}


def test_strategic_merge_merges_containers_and_env_by_name() -> None:
    patched = apply_patch(STRATEGIC_MERGE_PATCH, POD, {"spec": {"containers": [
        {"name": "trainer", "image": "new", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}]}})
    trainer, sidecar = patched["spec"]["containers"]
    assert trainer["image"] == "new" and sidecar == {"name": "sidecar", "image": "side"}
    assert trainer["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}]
    assert POD["spec"]["containers"][0]["image"] == "old"  # the input is not mutated


def test_strategic_merge_directives_and_atomic_lists() -> None:
    patched = apply_patch(STRATEGIC_MERGE_PATCH, POD, {
        "metadata": {"finalizers": ["b"], "labels": {"x": None}},
        "spec": {"containers": [{"name": "sidecar", "$patch": "delete"}], "tolerations": [{"key": "tpu"}]},
    })
    assert patched["metadata"]["finalizers"] == ["a", "b"]
    assert patched["metadata"]["labels"] == {}
    assert [c["name"] for c in patched["spec"]["containers"]] == ["trainer"]
    assert patched["spec"]["tolerations"] == [{"key": "tpu"}]  # no merge key: replaced
    removed = apply_patch(STRATEGIC_MERGE_PATCH, patched, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}})
    assert removed["metadata"]["finalizers"] == ["b"]


def test_merge_patch_replaces_lists_and_removes_nulls() -> None:
    patched = apply_patch(MERGE_PATCH, POD, {"metadata": {"finalizers": ["b"], "labels": None}})
    assert patched["metadata"] == {"name": "p", "finalizers": ["b"]}
    assert apply_patch("application/merge-patch+json; charset=utf-8", POD, {}) == POD


def test_json_patch_operations() -> None:
    ops = [
        {"op": "test", "path": "/metadata/name", "value": "p"},
        {"op": "add", "path": "/metadata/finalizers/-", "value": "z"},
        {"op": "replace", "path": "/spec/containers/0/image", "value": "new"},
        {"op": "remove", "path": "/spec/tolerations"},
        {"op": "copy", "from": "/metadata/labels", "path": "/metadata/annotations"},
        {"op": "move", "from": "/metadata/labels/x", "path": "/metadata/labels/y"},
    ]
    patched = apply_patch(JSON_PATCH, POD, ops)
    assert patched["metadata"] == {"name": "p", "finalizers": ["a", "z"], "labels": {"y": "1"},
                                   "annotations": {"x": "1"}}
    assert patched["spec"]["containers"][0]["image"] == "new" and "tolerations" not in patched["spec"]


@pytest.mark.parametrize(("content_type", "patch", "status"), [
    (JSON_PATCH, [{"op": "test", "path": "/metadata/name", "value": "q"}], 422),
    (JSON_PATCH, [{"op": "replace", "path": "/metadata/missing", "value": 1}], 422),
    (JSON_PATCH, [{"op": "remove", "path": "/spec/containers/9"}], 422),
    (JSON_PATCH, {"metadata": {}}, 400),
    (MERGE_PATCH, [], 400),
    ("application/xml", {}, 415),
])
def test_bad_patches_fail_like_the_api_server(content_type: str, patch: object, status: int) -> None:
    with pytest.raises(PatchError) as failed:
        apply_patch(content_type, POD, patch)
    assert failed.value.status == status


def test_label_selector_grammar() -> None:
    obj = {"metadata": {"labels": {"app": "kubetune", "tier": "trainer"}}}
    for selector, expected in [
        ("", True), ("app=kubetune", True), ("app==kubetune", True), ("app!=kubetune", False),
        ("tier", True), ("!tier", False), ("gpu", False), ("!gpu", True),
        ("tier in (trainer,operator)", True), ("tier notin (trainer)", False),
        ("app=kubetune,tier in (operator)", False), ("app = kubetune , tier", True),
    ]:
        assert parse_label_selector(selector)(obj) is expected, selector
    assert parse_label_selector("app")({"metadata": {}}) is False


@pytest.mark.parametrize("selector", ["app=a=b", "tier in trainer", "!tier in (x)", "=x"])
def test_malformed_label_selectors_are_refused(selector: str) -> None:
    with pytest.raises(SelectorError):
        parse_label_selector(selector)


def test_field_selectors() -> None:
    obj = {"metadata": {"name": "a", "namespace": "ns"}, "status": {"phase": "Running"}, "spec": {"on": True}}
    assert parse_field_selector("metadata.name=a,status.phase!=Failed")(obj)
    assert not parse_field_selector("metadata.namespace==other")(obj)
    assert parse_field_selector("spec.on=true")(obj)
    with pytest.raises(SelectorError):
        parse_field_selector("metadata.name")
