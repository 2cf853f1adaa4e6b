"""The objects the operator would create for a FineTuneJob, as a YAML stream (``kubetune render``).

For review in GitOps pipelines, like ``helm template``. It calls the very builders the operator
uses (``kubetune.operator.building.plan``) with the same defaults (``KUBETUNE_*`` settings, or
``--image``), so the output differs from what lands in the cluster only by what the API server
adds: the FineTuneJob's uid, hence the ownerReferences and the ``kubetune.io/job-uid`` annotation.
The command itself — reading files, printing problems, ``--preview`` of the training examples
(trainer code) — is the CLI's (``kubetune.cli``); this module only renders, so it and the operator
import nothing of the CLI or the trainer.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune.api import FineTuneJob
from kubetune.operator import arranging
from kubetune.operator.building import BuildOptions, plan


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
    hook = arranging.arranger_for(job.to_manifest())
    if hook is None:
        objects = plan(job, options)
    else:
        # A technique that arranges runs (a search) starts no trainer itself: it makes runs (child
        # FineTuneJobs), the next ones from the results of the first, so only the first can be shown.
        header += f"# {hook.RENDER_NOTE}\n"
        objects = hook.first_runs(job)
    docs = [yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True) for obj in objects]
    return header + "---\n".join(docs)


def with_namespace(job: FineTuneJob, namespace: str | None) -> FineTuneJob:
    """``job`` placed in ``namespace`` (``kubetune render -n``); unchanged when none is given."""
    if not namespace:
        return job
    meta = job.metadata.model_copy(update={"namespace": namespace})
    return job.model_copy(update={"metadata": meta})


def render_objects(job: FineTuneJob, options: BuildOptions | None = None) -> list[dict[str, Any]]:
    """The objects of one job (what ``render`` prints), for tools that want them as data."""
    return plan(job, options or BuildOptions())
