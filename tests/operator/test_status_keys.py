"""The operator writes status through the status models: no module re-types a status field's JSON
name (``observedGeneration``, ``startTime``, ``bestTrial``…); keys come from ``kubetune.api.statuses``
(``status_fields``, ``status_key``, ``Condition``). The one exception is reading a batch/v1 Job's
own status (``startTime``, ``completionTime``, its conditions' ``lastTransitionTime``) in
``phases.observe``: those are the Job API's names, not ours."""

from __future__ import annotations

import ast
import pathlib

import kubetune.operator
from kubetune.api.statuses import CheckpointRecord, Condition, FineTuneJobStatus, Progress, TrialRecord, status_fields

OPERATOR = pathlib.Path(kubetune.operator.__file__).parent
READS_OF_THE_JOB_API = {("phases.py", "observe")}


def _aliases() -> set[str]:
    return {field.alias for model in (FineTuneJobStatus, Condition, Progress, TrialRecord, CheckpointRecord)
            for name, field in model.model_fields.items() if field.alias and field.alias != name}


def test_no_operator_module_types_a_status_field_name() -> None:
    aliases = _aliases()
    found = []
    for path in sorted(OPERATOR.glob("*.py")):
        for top in ast.parse(path.read_text()).body:
            owner = getattr(top, "name", "<module>")
            if (path.name, owner) in READS_OF_THE_JOB_API:
                continue
            for node in ast.walk(top):
                if isinstance(node, ast.Constant) and node.value in aliases:
                    found.append(f"{path.name}:{node.lineno} ({owner}): {node.value!r}")
    assert not found, sorted(set(found))


def test_status_fields_are_validated_and_written_with_the_models_keys() -> None:
    assert status_fields(observed_generation=3, start_time="2026-01-01T00:00:00Z") == {
        "observedGeneration": 3, "startTime": "2026-01-01T00:00:00Z"}
    assert status_fields(best_trial=None) == {"bestTrial": None}  # merge-patch null removes it
    try:
        status_fields(phase="Sleeping")
    except ValueError as exc:
        assert "phase" in str(exc)
    else:
        raise AssertionError("an unknown phase was accepted")
