"""Every example the README says runs with ``kubetune train -f`` trains, here on CPU, one step each.

The examples are copied into a temporary ``examples/`` (next to its ``runs/``, as in the repository,
so ``../runs/quickstart/output`` resolves for the examples that build on the quickstart) and run
with ``kubetune train -f <example> --max-steps 1`` in this process, the quickstart first. An
example whose model is ``hf://HuggingFaceTB/SmolLM2-135M`` (a Llama) gets a local random-init
tiny Llama instead (no hub in tests). What is checked is what a user sees: exit 0, and a
``status.json`` that says Succeeded with the step done.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.cli import main
from tests.support.tiny_models import tiny_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("*.yaml")
                  if p.read_text().startswith("# kubetune train -f"))
#: hf:// models of the examples and the architecture family of the local stand-in.
HUB_MODELS = {"hf://HuggingFaceTB/SmolLM2-135M": "llama"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples-run")
    examples = root / "examples"
    examples.mkdir()
    (examples / "data").symlink_to(REPO / "examples" / "data", target_is_directory=True)
    stand_ins = {source: tiny_model(root / "models" / arch, arch) for source, arch in HUB_MODELS.items()}
    for name in EXAMPLES:
        text = (REPO / "examples" / name).read_text()
        for source, folder in stand_ins.items():
            text = text.replace(source, str(folder))
        (examples / name).write_text(text)
    return root


def train(workdir: Path, name: str) -> dict:
    run = workdir / "runs" / Path(name).stem
    rc = main(["train", "-f", str(workdir / "examples" / name), "-o", str(run), "--max-steps", "1", "--no-progress"])
    assert rc == 0, f"kubetune train -f examples/{name} exited {rc}"
    return json.loads((run / "status.json").read_text())


@pytest.fixture(scope="module")
def quickstart(workdir: Path) -> dict:
    return train(workdir, "quickstart.yaml")


def test_every_runnable_example_is_listed() -> None:
    assert "quickstart.yaml" in EXAMPLES and len(EXAMPLES) >= 15


@pytest.mark.parametrize("name", sorted(EXAMPLES, key=lambda n: n != "quickstart.yaml"))
def test_example_trains(workdir: Path, quickstart: dict, name: str) -> None:
    status = quickstart if name == "quickstart.yaml" else train(workdir, name)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] >= 1 or status.get("trials"), status
