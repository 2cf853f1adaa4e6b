"""``hf://`` model sources resolve through the Hugging Face cache, offline, as in a pod with a warm cache.

A Hub-layout cache is built by hand (``models--org--name/snapshots/<commit>/…`` and
``refs/<revision>``, what ``huggingface_hub`` writes), holding a tiny Llama; with
``HF_HUB_OFFLINE=1`` the trainer's resolver must find the snapshot of the requested revision and
never touch the network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kubetune.trainer.sources import SourceError, resolve_model_dir

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture()
def hub_cache(tmp_path: Path, tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / "models--kubetune-test--tiny-llama"
    for commit, ref in ((MAIN, "main"), (V1, "v1")):
        shutil.copytree(tiny_model_dir("llama"), repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    (repo / "snapshots" / V1 / "VERSION").write_text("v1\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hf_source_resolves_to_the_cached_snapshot_of_its_revision(hub_cache: Path) -> None:
    import transformers

    main = resolve_model_dir("hf://kubetune-test/tiny-llama", None, "spec.model.source")
    assert main == hub_cache / "models--kubetune-test--tiny-llama" / "snapshots" / MAIN
    v1 = resolve_model_dir("hf://kubetune-test/tiny-llama@v1", None, "spec.model.source")
    assert (v1 / "VERSION").read_text() == "v1\n"
    assert resolve_model_dir("hf://kubetune-test/tiny-llama", None, "spec.model.source", revision="v1") == v1
    model = transformers.AutoModelForCausalLM.from_pretrained(str(main))
    assert model.config.model_type == "llama"


def test_a_revision_missing_from_the_cache_is_a_clear_offline_error(hub_cache: Path) -> None:
    with pytest.raises(SourceError, match=r"spec.model.source: cannot fetch 'hf://kubetune-test/tiny-llama@v2'"):
        resolve_model_dir("hf://kubetune-test/tiny-llama@v2", None, "spec.model.source")
