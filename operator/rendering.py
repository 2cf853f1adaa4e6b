"""``kubetune render -f job.yaml``: print the objects the operator would create, as a YAML stream.

For review in GitOps pipelines, like ``helm template``. It calls the very builders the operator
uses (``kubetune.operator.building.plan``) with the same defaults (``KUBETUNE_*`` settings, or
``--image``), so the output differs from what lands in the cluster only by what the API server
adds: the FineTuneJob's uid, hence the ownerReferences and the ``kubetune.io/job-uid`` annotation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from kubetune.api import FineTuneJob
from kubetune.api.validating import validate_file
from kubetune.operator.building import BuildOptions, plan
from kubetune.operator.settings import Settings


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the trainer config JSON) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_job(job: FineTuneJob, options: BuildOptions) -> str:
    """One job's objects as YAML documents."""
    header = (
        f"# kubetune render: objects for FineTuneJob {job.namespace}/{job.name}\n"
        "# ownerReferences to the FineTuneJob are added when the operator creates them.\n"
    )
    if job.spec.techniques.hyperparameter_search is None:
        objects = plan(job, options)
    else:
        from kubetune.operator.searching import first_trials

        # A search runs no trainer itself: it starts trials (child FineTuneJobs), the next ones
        # proposed as trials finish, so only the first ones can be shown.
        header += "# a hyperparameter search: the first trials it starts; later ones follow from their results.\n"
        objects = first_trials(job)
    docs = [yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True) for obj in objects]
    return header + "---\n".join(docs)


def _with_namespace(job: FineTuneJob, namespace: str | None) -> FineTuneJob:
    if not namespace:
        return job
    meta = job.metadata.model_copy(update={"namespace": namespace})
    return job.model_copy(update={"metadata": meta})


def render_main(args: argparse.Namespace) -> int:
    files: list[str] = list(getattr(args, "file", None) or []) + list(getattr(args, "paths", None) or [])
    if not files:
        print("kubetune render: give a manifest with -f FILE (or - for stdin)", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env(trainer_image=getattr(args, "image", None))
    except ValueError as exc:
        print(f"kubetune render: {exc}", file=sys.stderr)
        return 2
    options = BuildOptions.from_settings(settings)
    rendered: list[str] = []
    failed = False
    for path in files:
        try:
            name, jobs, problems = validate_file(path)
        except OSError as exc:
            print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
            failed = True
            continue
        for line in problems:
            print(line, file=sys.stderr)
        failed = failed or bool(problems)
        for job in jobs:
            text = render_job(_with_namespace(job, getattr(args, "namespace", None)), options)
            if getattr(args, "preview", 0):
                from kubetune.cli import preview_lines

                base = Path(name).resolve().parent if name != "<stdin>" else Path.cwd()
                comments = [f"# {line}" for line in [f"preview of {job.name}:", *preview_lines(job, base, args.preview)]]
                text = "\n".join(comments) + "\n" + text
            rendered.append(text)
    if failed:
        return 1
    sys.stdout.write("---\n".join(rendered))
    return 0


def render_objects(job: FineTuneJob, options: BuildOptions | None = None) -> list[dict[str, Any]]:
    """The objects of one job (what ``render`` prints), for tools that want them as data."""
    return plan(job, options or BuildOptions())
