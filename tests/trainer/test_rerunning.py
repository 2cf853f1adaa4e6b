"""Rerunning `kubetune train` on a run folder: the same spec resumes (or says it is finished), an
edited one is refused with one line naming the change, and --restart starts over.

Each `kubetune train` runs in this process (``kubetune.cli.main``, what ``python -m kubetune``
calls), its exit code and what it printed taken as a user sees them: a subprocess would only add
the start-up of torch, transformers and DeepSpeed (seconds each) to the two runs that train."""

from __future__ import annotations

import pytest
import yaml

from kubetune.cli import main
from tests.support.tiny_models import manifest, write_dataset


@pytest.fixture
def _train(capsys):
    def train(run_dir, job, *extra):
        (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
        capsys.readouterr()  # what came before is not this run's
        rc = main(["train", "-f", str(run_dir / "job.yaml"), "-o", str(run_dir), "--no-progress", "--nproc", "1", *extra])
        said = capsys.readouterr()
        return rc, said.out + said.err

    return train


@pytest.mark.slow
def test_an_edited_manifest_is_not_resumed_and_a_finished_run_is_not_retrained(tiny_model_dir, tmp_path, _train):
    data = write_dataset(tmp_path / "data.jsonl", "text", n=16)
    job = manifest(tiny_model_dir("llama"), data, "text", overrides={
        "training.maxSteps": 3, "training.learningRate": 1e-3, "checkpointing.everySteps": 1, "data.eval": None})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rc, out = _train(run_dir, job)
    assert rc == 0, out[-3000:]
    log = run_dir / "output" / "trainer_log.jsonl"
    lines_after_first = log.read_text().count("\n")

    rc, out = _train(run_dir, job)  # the same manifest again
    assert rc == 0, out[-3000:]
    assert "already finished (3 steps)" in out and str(run_dir / "output") in out, out[-3000:]
    assert log.read_text().count("\n") == lines_after_first  # nothing trained again

    # Another GPU count is the same run (resume across GPU counts): still just finished.
    rc, out = _train(run_dir, {**job, "spec": {**job["spec"], "resources": {"gpusPerNode": 0}}})
    assert rc == 0 and "already finished" in out, out[-3000:]

    edited = {**job, "spec": {**job["spec"], "training": {**job["spec"]["training"], "learningRate": 5e-4}}}
    rc, out = _train(run_dir, edited)
    assert rc == 2, out[-3000:]
    [said] = [line for line in out.splitlines() if line.startswith("kubetune:")]
    assert "spec.training.learningRate: 0.001 -> 0.0005" in said and "--restart" in said, said
    assert "Traceback" not in out

    rc, out = _train(run_dir, edited, "--restart")
    assert rc == 0, out[-3000:]
    steps = [yaml.safe_load(line)["step"] for line in log.read_text().splitlines()]
    assert steps and steps[0] == 1 and steps[-1] == 3 and len(steps) == lines_after_first  # trained anew


def test_what_a_rerun_does_with_a_finished_run_folder(tmp_path, capsys):
    """docs/first-job.md: a rerun of the same spec says it is finished; changing only `resources`
    (GPUs, nodes) or `runPolicy` is the same run; `--max-steps` beyond it resumes; an edited training
    field is refused naming it. From a finished checkpoint's trainer.json, without training."""
    import json
    from types import SimpleNamespace

    from kubetune.api import parse_job
    from kubetune.trainer.fingerprinting import run_length, training_spec
    from kubetune.trainer.local import _rerun_refused

    def job(**spec):
        return parse_job(manifest("hf://o/m", "d.jsonl", "text", overrides={"training.maxSteps": 3, **spec}))

    done = tmp_path / "checkpoints" / "step-00000003"
    done.mkdir(parents=True)
    (done / "trainer.json").write_text(json.dumps({"step": 3, "total_steps": 3, "spec": training_spec(job()),
                                                   "length": run_length(job())}))
    paths = SimpleNamespace(checkpoint_dir=tmp_path / "checkpoints", run_dir=tmp_path, output_dir=tmp_path / "output")
    assert _rerun_refused(job(), paths, None) == 0
    assert "already finished (3 steps)" in capsys.readouterr().out
    moved = job(**{"resources.gpusPerNode": 2, "resources.nodes": 2, "runPolicy.backoffLimit": 9,
                   "checkpointing.storage.accessMode": "ReadWriteMany"})
    assert _rerun_refused(moved, paths, None) == 0
    assert _rerun_refused(job(), paths, 5) is None  # extended: resumes from step 3
    capsys.readouterr()
    assert _rerun_refused(job(**{"training.learningRate": 5e-4}), paths, None) == 2
    said = capsys.readouterr().err
    assert "another spec (spec.training.learningRate: " in said and " -> 0.0005)" in said and "--restart" in said
