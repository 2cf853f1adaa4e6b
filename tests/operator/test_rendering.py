"""``kubetune render``: the objects the operator would create, printed by the same builders."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from kubetune.api import validate_text
from kubetune.cli import main
from kubetune.operator import building

REPO = pathlib.Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"


def test_render_prints_exactly_the_planned_objects(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", str(QUICKSTART), "-n", "team-a", "--image", "mirror/trainer:9"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    jobs, _ = validate_text(QUICKSTART.read_text(), str(QUICKSTART))
    job = jobs[0].model_copy(update={"metadata": jobs[0].metadata.model_copy(update={"namespace": "team-a"})})
    assert docs == building.plan(job, building.BuildOptions(trainer_image="mirror/trainer:9"))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.33.0", strict=True)
    assert docs[-1]["spec"]["template"]["spec"]["containers"][0]["image"] == "mirror/trainer:9"


def test_render_refuses_an_invalid_manifest_naming_the_field(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.yaml"
    manifest = yaml.safe_load(QUICKSTART.read_text())
    manifest["spec"].setdefault("training", {})["maxSeqLength"] = 2
    bad.write_text(yaml.safe_dump(manifest))
    result = subprocess.run([sys.executable, "-m", "kubetune.cli", "render", "-f", str(bad)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "spec.training.maxSeqLength: must be >= 8 (got 2)" in result.stderr
    assert result.stdout == ""
