"""Each technique says in one line what it did, once, when training ends (issue 13).

A combined run with ten techniques on: every one of them has its line under the
``techniques:`` header of the run's log (the terminal of a local run, the pod's log), and each line
carries what that technique measured (examples augmented, the KL term, the replay share…).
"""

from __future__ import annotations

import logging

import pytest

from tests.techniques.conftest import manifest, train, write_jsonl
from tests.techniques.reviews import CLASSIFY, review_files, review_rows


@pytest.mark.slow
def test_every_enabled_technique_prints_its_line_under_one_header(tiny_models, tmp_path, caplog):
    data = review_files(tmp_path, n_train=48, n_eval=16)
    write_jsonl(tmp_path / "old.jsonl", review_rows(16, seed=7))
    encoder = str(tiny_models["encoder"])
    doc = manifest(
        tiny_models["encoder"], [], data=data,
        techniques={
            "task": CLASSIFY,
            "transferLearning": {"strategy": "gradual-unfreeze", "unfreeze": {"everySteps": 1}},
            "promptEngineering": {"template": "Review: {{ text }}"},
            "distillation": {"teacher": {"source": encoder}},
            "adversarial": {"method": "fgm"},
            "regularization": {"l1": 1e-5, "labelSmoothing": 0.1},
            "augmentation": {"tokenMasking": {"p": 0.5}},
            "earlyStopping": {"patience": 5},
            "continualLearning": {"replay": {"source": "old.jsonl", "ratio": 0.2}},
            "curriculum": {},
        },
        training={"maxSteps": 3, "microBatchSize": 8},
    )
    with caplog.at_level(logging.INFO, logger="kubetune.trainer"):
        t = train(doc, tmp_path)
    enabled = [technique.name for technique in t.techniques]
    assert len(enabled) == 10
    said = {line.split(": ", 1)[0].strip(): line.split(": ", 1)[1] for line in t.technique_lines}
    assert list(said) == enabled  # one line each, in registry order
    (header,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("techniques:")]
    assert header.splitlines()[1:] == t.technique_lines
    # Each line says what the technique did, in its own numbers.
    assert "last KL term" in said["distillation"]
    assert "last adversarial term" in said["adversarial"]
    assert "training examples augmented" in said["augmentation"]
    assert "replay share" in said["continualLearning"]
    assert "stage" in said["transferLearning"]
    assert "of the data available" in said["curriculum"]
    # Label smoothing goes to the technique that owns the task loss (declared capability), not on top.
    assert "applied by distillation" in said["regularization"]
