"""Fetching a job's remote sources (``s3://``, ``hf://``) once per job into its cache.

Run three ways, always with the same cache:

* as the init container of every trainer pod (``python -m kubetune.trainer.fetching --config …``,
  built by ``kubetune.operator.building``): it downloads every remote source of the spec into the
  job's volume (``KUBETUNE_FETCH_DIR``, ``/workspace/cache/sources``; ``hf://`` into ``HF_HOME``
  on the same volume) and reports ``status.initialization`` (bytes fetched) through the trainer's
  status client; the trainer then reads the local copies and never fetches again;
* by ``kubetune train`` before training (cache ``runs/<name>/cache/``), printing one line;
* by the trainer itself (:func:`fetched_s3` from ``kubetune.trainer.sources``), which finds the
  copy the init step made, or fetches it when there was no init step.

An ``s3://`` source is kept at ``<cache>/s3-<bucket>-<hash of source and endpoint>/``; ``hf://``
sources go through huggingface_hub's own cache, keyed by repository and revision, with its own
locks. Several pods' init containers may run at once: each s3 download goes to a private staging
folder that is renamed into place atomically (a reader sees nothing or the whole copy), and a lock
file (``flock``; where the volume does not support it the rename alone keeps the copy whole) makes
the others wait instead of downloading the same bytes again. The cache entry holds
``fetched.json`` (source, bytes, the path inside the entry) next to the files. This small cache is
our own rather than fsspec's ``filecache``: that one keys files per process and does not guard a
copy shared by several pods on one volume, which is the whole point here.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.trainer import buckets
from kubetune.trainer.sources import SourceError, hub_token, is_hub, parse_hub

FETCH_DIR_VARIABLE = "KUBETUNE_FETCH_DIR"
RECORD = "fetched.json"


def cache_root() -> Path:
    """Where fetched s3:// sources live: ``KUBETUNE_FETCH_DIR``, else ``~/.cache/kubetune/sources``."""
    return Path(os.environ.get(FETCH_DIR_VARIABLE) or Path.home() / ".cache" / "kubetune" / "sources")


def entry_name(source: str) -> str:
    """The cache folder of ``source``: readable, and unique per source and endpoint."""
    location = buckets.parse_s3(source)
    digest = hashlib.sha256(f"{source}\n{buckets.endpoint() or ''}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^a-z0-9.-]+", "-", location.bucket.lower())[:40]
    return f"s3-{slug}-{digest}"


@dataclass
class Fetched:
    """One source: where its local copy is and how many bytes this call downloaded (0: reused)."""

    field: str
    source: str
    path: Path | None
    bytes_fetched: int
    reused: bool


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` while the block runs; no lock where the filesystem has none."""
    import fcntl

    handle = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:  # NFS without locking: the atomic rename still keeps the copy whole
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        yield
    finally:
        handle.close()


def _read_record(entry: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((entry / RECORD).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def fetched_s3(source: str, where: str, root: Path | None = None) -> Fetched:
    """The local copy of an ``s3://`` source, downloaded unless the cache already holds it."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / entry_name(source)
    record = _read_record(entry)
    if record is None:
        with _locked(root / f".{entry.name}.lock"):
            record = _read_record(entry)  # another pod may have finished while this one waited
            if record is None:
                staging = root / f".{entry.name}.{uuid.uuid4().hex[:8]}.partial"
                try:
                    path, size = buckets.download(source, staging / "files", where)
                    record = {"source": source, "bytes": size, "path": path.relative_to(staging).as_posix(),
                              "fetchedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    (staging / RECORD).write_text(json.dumps(record), encoding="utf-8")
                    try:
                        os.rename(staging, entry)
                    except OSError as exc:  # another fetcher's copy got there first: keep that one
                        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                            raise
                        record = _read_record(entry) or record
                    else:
                        return Fetched(where, source, entry / record["path"], size, reused=False)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
    return Fetched(where, source, entry / record["path"], 0, reused=True)


def _folder_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def fetched_hub_model(source: str, where: str, revision: str | None = None) -> Fetched:
    """An ``hf://`` model in huggingface_hub's cache (``HF_HOME``), keyed by repository and revision."""
    from huggingface_hub import constants

    from kubetune.trainer.sources import resolve_model_dir

    ref = parse_hub(source, revision)
    repo_cache = Path(constants.HF_HUB_CACHE) / f"models--{ref.repo_id.replace('/', '--')}"
    before = _folder_bytes(repo_cache)
    path = resolve_model_dir(source, None, where, revision)
    fetched = max(0, _folder_bytes(repo_cache) - before)
    return Fetched(where, source, path, fetched, reused=fetched == 0)


def fetched_hub_dataset(source: str, where: str, split: str) -> Fetched:
    """An ``hf://`` dataset in the ``datasets`` cache (under ``HF_HOME``)."""
    import datasets

    ref = parse_hub(source)
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    hub = Path(datasets.config.HF_CACHE_HOME) / "hub"
    before = _folder_bytes(cache) + _folder_bytes(hub)
    try:
        datasets.load_dataset(ref.repo_id, split=split, revision=ref.revision, token=hub_token())
    except Exception as exc:
        raise SourceError(f"{where}: cannot load {source!r} split {split!r} ({type(exc).__name__}: {exc})") from exc
    fetched = max(0, _folder_bytes(cache) + _folder_bytes(hub) - before)
    return Fetched(where, source, None, fetched, reused=fetched == 0)


@dataclass
class Wanted:
    """A remote source of the spec and how to fetch it."""

    field: str
    source: str
    kind: str  # "model" or "data"
    revision: str | None = None
    split: str = "train"


def remote_sources(spec: Any) -> list[Wanted]:
    """Every ``s3://`` and ``hf://`` source the trainer will read, with its field path (output not included)."""
    wanted: list[Wanted] = [Wanted("spec.model.source", spec.model.source, "model", spec.model.revision)]
    if spec.model.tokenizer:
        wanted.append(Wanted("spec.model.tokenizer", spec.model.tokenizer, "model"))
    groups = [("spec.data.datasets", spec.data.datasets)]
    if spec.data.eval is not None and spec.data.eval.datasets:
        groups.append(("spec.data.eval.datasets", spec.data.eval.datasets))
    for name, datasets in groups:
        for i, ds in enumerate(datasets):
            wanted.append(Wanted(f"{name}[{i}].source", ds.source, "data", split=ds.split))
    techniques = spec.techniques
    if techniques.distillation is not None:
        teacher = techniques.distillation.teacher
        wanted.append(Wanted("spec.techniques.distillation.teacher.source", teacher.source, "model", teacher.revision))
    adaptation = getattr(techniques, "domain_adaptation", None)
    if adaptation is not None and getattr(adaptation, "general_data", None) is not None:
        wanted.append(Wanted("spec.techniques.domainAdaptation.generalData.source", adaptation.general_data.source, "data"))
    continual = techniques.continual_learning
    if continual is not None:
        if continual.replay is not None:
            wanted.append(Wanted("spec.techniques.continualLearning.replay.source", continual.replay.source, "data"))
        if continual.from_checkpoint:
            wanted.append(Wanted("spec.techniques.continualLearning.fromCheckpoint", continual.from_checkpoint, "model"))
    seen: set[tuple[str, str | None, str]] = set()
    out = []
    for item in wanted:
        key = (item.source, item.revision, item.split)
        if (buckets.is_s3(item.source) or is_hub(item.source)) and key not in seen:
            seen.add(key)
            out.append(item)
    return out


@dataclass
class Summary:
    """What a fetch did, for status and the one line a person reads."""

    fetched: list[Fetched] = field(default_factory=list)

    @property
    def bytes_fetched(self) -> int:
        return sum(f.bytes_fetched for f in self.fetched)

    def line(self) -> str:
        new = [f for f in self.fetched if not f.reused]
        reused = len(self.fetched) - len(new)
        parts = []
        if new:
            parts.append(f"fetched {len(new)} source{'s' if len(new) > 1 else ''} ({human_bytes(self.bytes_fetched)}: "
                         + ", ".join(f.source for f in new) + ")")
        if reused:
            parts.append(f"{reused} already in the cache")
        return "; ".join(parts) or "nothing to fetch"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def fetch_all(spec: Any, on_progress: Callable[[Summary, Wanted | None], None] | None = None) -> Summary:
    """Fetch every remote source of ``spec`` (see :func:`remote_sources`); raises SourceError."""
    buckets.use_spec(spec)
    summary = Summary()
    for item in remote_sources(spec):
        if on_progress is not None:
            on_progress(summary, item)
        if buckets.is_s3(item.source):
            summary.fetched.append(fetched_s3(item.source, item.field))
        elif item.kind == "model":
            summary.fetched.append(fetched_hub_model(item.source, item.field, item.revision))
        else:
            summary.fetched.append(fetched_hub_dataset(item.source, item.field, item.split))
    if on_progress is not None:
        on_progress(summary, None)
    return summary


# ---------------------------------------------------------------------- the init container


def _publisher(job: Any) -> Callable[[Any], None] | None:
    """Patches ``status.initialization`` in a cluster (the trainer's status client); None locally."""
    name = os.environ.get("KUBETUNE_JOB_NAME") or job.metadata.name
    namespace = os.environ.get("KUBETUNE_NAMESPACE") or job.namespace
    if not os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
        return None
    from kubetune.api.statuses import Initialization, status_fields
    from kubetune.trainer.publishing import StatusClient, describe_failure

    client = StatusClient(name, namespace)

    def publish(initialization: Initialization) -> None:
        try:
            fields = status_fields(initialization=initialization)
            if initialization.current is None:
                fields["initialization"]["current"] = None  # merge patch: null removes the last one
            client.patch({"status": fields}, timeout=10.0)
        except Exception as exc:  # status is a window: fetching goes on without it
            print(f"kubetune: cannot report fetch progress ({describe_failure(exc)})", file=sys.stderr)

    return publish


def main(argv: list[str] | None = None) -> int:
    from kubetune.api import SpecError, parse_job

    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer.fetching",
                                     description="Fetch a FineTuneJob's s3:// and hf:// sources into its cache.")
    parser.add_argument("--config", default=os.environ.get("KUBETUNE_CONFIG"), required=not os.environ.get("KUBETUNE_CONFIG"))
    args = parser.parse_args(argv)
    try:
        job = parse_job(json.loads(Path(args.config).read_text(encoding="utf-8")))
    except (OSError, ValueError, SpecError) as exc:
        print(f"kubetune: cannot read {args.config}: {exc}", file=sys.stderr)
        return 2
    publish = _publisher(job)
    total = len(remote_sources(job.spec))

    def progress(summary: Summary, item: Wanted | None) -> None:
        if publish is not None:
            from kubetune.api.statuses import Initialization

            publish(Initialization(sources_total=total, sources_fetched=len(summary.fetched),
                                   bytes_fetched=summary.bytes_fetched, current=item.source if item else None,
                                   done=item is None))

    from kubetune.trainer.running import EXIT_BAD_INPUT, write_termination_message

    try:
        summary = fetch_all(job.spec, progress)
    except SourceError as exc:
        print(f"kubetune: {exc}", file=sys.stderr)
        write_termination_message(str(exc))
        return EXIT_BAD_INPUT
    print(f"kubetune: {summary.line()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
