"""Every shipped example is documentation that runs: it validates and says how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api import KIND, load_documents, validate_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml"))


def _is_finetunejob(path: Path) -> bool:
    return any(isinstance(d.body, dict) and d.body.get("kind") == KIND for d in load_documents(path.read_text(), str(path)))


JOB_FILES = [p for p in EXAMPLES if _is_finetunejob(p)]


def test_there_are_examples() -> None:
    assert (ROOT / "examples" / "quickstart.yaml") in JOB_FILES


@pytest.mark.parametrize("path", JOB_FILES, ids=[str(p.relative_to(ROOT)) for p in JOB_FILES])
def test_example_validates(path: Path) -> None:
    jobs, problems = validate_text(path.read_text(), str(path))
    assert problems == []
    assert jobs


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_example_starts_with_the_command_that_runs_it(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must start with a comment giving its command"
    assert any(word in first for word in ("kubetune ", "kubectl ", "helm ", "kustomize ", "flux ", "argocd ")), first


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_an_example_trains_locally_or_says_why_not_and_what_to_run(path: Path) -> None:
    """A new user runs what the first line says: `kubetune train -f` this file, or, for a
    cluster-only file, the reason and the local example to run instead (which must exist)."""
    first = path.read_text().splitlines()[0]
    own = str(path.relative_to(ROOT))
    if first.startswith("# kubetune train -f ") and own in first:
        assert path in JOB_FILES, f"{own}: only a FineTuneJob can be trained"
        return
    assert "(cluster only: " in first, f"{own}: the first line must say why it does not train locally"
    local = first.split("locally: ", 1)[-1].rstrip(")")
    assert local.startswith("kubetune train -f examples/"), f"{own}: the first line must say what to run locally"
    instead = ROOT / local.removeprefix("kubetune train -f ")
    assert instead in JOB_FILES and instead.read_text().startswith(f"# {local}"), first
