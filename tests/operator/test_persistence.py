"""kopf's bookkeeping costs no write in a normal lifecycle (``kubetune.operator.persistence``).

kopf decides create / update / nothing from the diff base: here ``status.observedGeneration``
against ``metadata.generation``. Its handler progress is written only for a handler to be retried.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubetune.operator import persistence


def body(generation: int, observed: int | None) -> kopf.Body:
    raw: dict[str, Any] = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                           "metadata": {"name": "j", "generation": generation, "annotations": {}},
                           "spec": {"training": {"maxSteps": 5}}, "status": {}}
    if observed is not None:
        raw["status"]["observedGeneration"] = observed
    return kopf.Body(raw)


class TestGenerationDiffBase:
    storage = persistence.GenerationDiffBase()

    def test_never_handled_is_a_creation(self) -> None:
        assert self.storage.fetch(body=body(1, None)) is None  # kopf: old is None -> create

    def test_handled_generation_is_no_change(self) -> None:
        b = body(3, 3)
        assert self.storage.fetch(body=b) == self.storage.build(body=b)

    def test_a_newer_generation_is_a_spec_change(self) -> None:
        b = body(4, 3)
        old, new = self.storage.fetch(body=b), self.storage.build(body=b)
        assert old is not None and set(old) == set(new) == {"spec"}  # what differs is under spec:
        assert old["spec"] != new["spec"]  # @kopf.on.update(field="spec") runs

    def test_store_writes_nothing(self) -> None:
        patch = kopf.Patch()
        self.storage.store(body=body(1, None), patch=patch, essence=self.storage.build(body=body(1, None)))
        assert not patch


class TestRetriesOnlyProgress:
    storage = persistence.RetriesOnlyProgress(prefix="kubetune.io")

    def test_a_handler_done_at_once_leaves_no_annotation(self) -> None:
        patch = kopf.Patch()
        record: Any = {"started": "2026-01-01T00:00:00Z", "stopped": "2026-01-01T00:00:01Z", "success": True}
        self.storage.store(key="ensure_children", record=record, body=body(1, None), patch=patch)
        assert not patch

    def test_a_handler_to_retry_is_recorded(self) -> None:
        patch = kopf.Patch()
        record: Any = {"started": "2026-01-01T00:00:00Z", "delayed": "2026-01-01T00:00:10Z", "retries": 1}
        self.storage.store(key="ensure_children", record=record, body=body(1, None), patch=patch)
        annotations = patch["metadata"]["annotations"]
        assert any(key.startswith("kubetune.io/") and "ensure_children" in key for key in annotations)

    def test_clearing_the_diff_base_essence_leaves_it_as_built(self) -> None:
        # kopf clears progress marks from both diff-base essences on every event: ours hold none.
        essence = persistence.GenerationDiffBase().build(body=body(2, 1))
        assert self.storage.clear(essence=essence) is essence and essence == {"spec": {"kubetune.io/generation": 2}}

    def test_clearing_an_essence_with_annotations_removes_our_marks(self) -> None:
        essence: Any = {"metadata": {"annotations": {"kubetune.io/ensure_children": "{}", "other.io/keep": "x"}},
                        "spec": {"a": 1}}
        cleared = self.storage.clear(essence=essence)
        assert cleared == {"metadata": {"annotations": {"other.io/keep": "x"}}, "spec": {"a": 1}}
        assert essence["metadata"]["annotations"]["kubetune.io/ensure_children"] == "{}"  # a copy, as kopf's
