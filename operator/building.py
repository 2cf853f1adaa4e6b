"""Pure builders: a validated FineTuneJob in, the Kubernetes objects that run it out (dicts, no I/O).

The operator's create handler (``kubetune.operator.creating``) applies what :func:`plan` returns,
and ``kubetune render`` prints the very same list, so what a GitOps review sees is what the
operator makes. Each ``build_*`` function returns one manifest; :func:`plan` orders them so that
every object exists before something refers to it (the Job last).

Contract with the trainer pods (``kubetune.trainer`` reads these):
the validated manifest as JSON at ``/etc/kubetune/job.json`` (parse it with
``kubetune.api.parse_job``), ``KUBETUNE_*`` variables for identity and directories (see
:data:`TRAINER_ENV_DOC`), the torch distributed variables for ``torchrun``, ``HF_TOKEN`` only from
the Secret named in ``spec.model.credentialsSecret`` (and, when the job reads or writes ``s3://``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` from the keys of that name in
the same Secret), the workspace volume at ``/workspace`` and every ``pvc://claim/path`` source
mounted read-only at ``/mnt/pvc/<claim>``. A job with ``s3://`` or ``hf://`` sources gets an init
container (``python -m kubetune.trainer.fetching``) that fetches them once into the workspace
volume; the trainer always runs with ``HF_HUB_OFFLINE=1`` and reads the copies.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubetune.api import API_VERSION, GROUP, KIND, KUEUE_QUEUE_LABEL, PLURAL, FineTuneJob
from kubetune.operator import naming
from kubetune.operator.settings import DEFAULT_TRAINER_IMAGE, Settings

CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "job.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
WORKSPACE_DIR = "/workspace"
OUTPUT_DIR = f"{WORKSPACE_DIR}/output"
CHECKPOINT_DIR = f"{WORKSPACE_DIR}/checkpoints"
CACHE_DIR = f"{WORKSPACE_DIR}/cache"
#: Where the fetch step keeps s3:// sources (hf:// ones go to HF_HOME): on the job's volume.
FETCH_DIR = f"{CACHE_DIR}/sources"
#: Where the trainer image ships a copy of examples/: relative paths in a manifest resolve here.
BASE_DIR = "/opt/kubetune/examples"
PVC_ROOT = "/mnt/pvc"
CONTAINER_NAME = "trainer"
FETCH_CONTAINER_NAME = "fetch"
FETCH_MODULE = "kubetune.trainer.fetching"
RENDEZVOUS_PORT_NAME = "rendezvous"
TRAINER_MODULE = "kubetune.trainer"
JOB_COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
#: The trainer's exit code for a bad spec or bad data (``kubetune.trainer.running.EXIT_BAD_INPUT``).
TRAINER_EXIT_BAD_INPUT = 2

#: What each variable tells the trainer; the keys are exactly the variables set on the container.
TRAINER_ENV_DOC: dict[str, str] = {
    "KUBETUNE_JOB_NAME": "name of the FineTuneJob",
    "KUBETUNE_NAMESPACE": "its namespace (downward API)",
    "KUBETUNE_JOB_UID": "its uid (downward API, from the pod annotation kubetune.io/job-uid)",
    "KUBETUNE_CONFIG": f"the validated manifest as JSON ({CONFIG_PATH})",
    "KUBETUNE_OUTPUT_DIR": f"final model directory ({OUTPUT_DIR}) unless spec.output.path is set",
    "KUBETUNE_CHECKPOINT_DIR": f"checkpoint directory ({CHECKPOINT_DIR}) on the workspace volume",
    "KUBETUNE_BASE_DIR": f"folder relative data/model paths resolve against ({BASE_DIR})",
    "KUBETUNE_PVC_ROOT": f"pvc://claim/path sources are mounted read-only at {PVC_ROOT}/<claim>/path",
    "KUBETUNE_POD_NAME": "the pod's name (downward API)",
    "HF_HOME": f"Hugging Face cache on the workspace volume ({CACHE_DIR}/huggingface)",
    "KUBETUNE_FETCH_DIR": f"s3:// sources fetched once per job by the init container ({FETCH_DIR})",
    "HF_HUB_OFFLINE": "1 on the trainer: hf:// sources were fetched into HF_HOME by the init container",
    "HOME": "a writable home (/tmp) for libraries that write dotfiles",
    "OMP_NUM_THREADS": "CPU threads per process (CPU request / processes, at least 1)",
    "MASTER_ADDR": "node 0's stable hostname <job>-0.<service> (several nodes); 127.0.0.1 on one node",
    "MASTER_PORT": "rendezvous port",
    "NNODES": "number of nodes (pods)",
    "NODE_RANK": "this pod's node rank, from the Job completion index",
    "NPROC_PER_NODE": "trainer processes per pod",
}


@dataclass(frozen=True)
class BuildOptions:
    """The operator settings the builders depend on."""

    trainer_image: str = DEFAULT_TRAINER_IMAGE
    termination_grace_seconds: int = 300
    rendezvous_port: int = 29500
    run_as_user: int = 1000
    image_pull_secrets: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> BuildOptions:
        return cls(
            trainer_image=settings.trainer_image,
            termination_grace_seconds=settings.termination_grace_seconds,
            rendezvous_port=settings.rendezvous_port,
            run_as_user=settings.run_as_user,
            image_pull_secrets=settings.trainer_image_pull_secrets,
        )


# ------------------------------------------------------------------------------------ helpers


def processes_per_node(job: FineTuneJob) -> int:
    resources = job.spec.resources
    return resources.processes_per_node or max(resources.gpus_per_node, 1)


def uses_launcher(job: FineTuneJob) -> bool:
    """torchrun for anything distributed; a single process runs the trainer directly."""
    return job.spec.resources.nodes > 1 or processes_per_node(job) > 1


def techniques_summary(job: FineTuneJob) -> str:
    """Comma-separated techniques for ``kubectl get`` (the PEFT method first, when not full)."""
    names = list(job.spec.techniques.enabled())
    if job.spec.peft.method != "full":
        names.insert(0, job.spec.peft.method)
    return ",".join(names) or "full"


def trainer_config(job: FineTuneJob) -> dict[str, Any]:
    """The manifest the trainer parses: the validated spec and the job's identity, no status."""
    meta = job.metadata
    metadata: dict[str, Any] = {"name": meta.name, "namespace": job.namespace}
    for key in ("uid", "generation", "labels"):
        value = getattr(meta, key)
        if value is not None:
            metadata[key] = value
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": job.spec.to_manifest()}


def trainer_config_json(job: FineTuneJob) -> str:
    return json.dumps(trainer_config(job), indent=2, sort_keys=True)


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    if not job.metadata.uid:
        raise ValueError("the FineTuneJob has no uid yet: owner references need the object from the API server")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FineTuneJob, name: str, component: str, *, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": job.namespace,
        "labels": naming.child_labels(job.name, component),
        "annotations": {naming.ANNOTATION_JOB: job.name},
    }
    if owned and job.metadata.uid:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


def _pvc_sources(value: Any) -> Iterator[str]:
    """Every ``pvc://claim/...`` string anywhere in the spec (models, datasets, teachers, replay)."""
    if isinstance(value, str) and value.startswith("pvc://"):
        yield value[len("pvc://"):].split("/", 1)[0]
    elif isinstance(value, dict):
        for item in value.values():
            yield from _pvc_sources(item)
    elif isinstance(value, list):
        for item in value:
            yield from _pvc_sources(item)


def _strings(value: Any, skip: str | None = None) -> Iterator[str]:
    """Every string anywhere in ``value`` (a manifest), leaving out the top-level key ``skip``."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != skip:
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


#: Secret keys read for s3:// (the variable and the key share the name); optional ones may be absent.
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": False, "AWS_SECRET_ACCESS_KEY": False, "AWS_SESSION_TOKEN": True}


def uses_s3(job: FineTuneJob) -> bool:
    """Whether any source, or the output, is s3://."""
    return any(s.startswith("s3://") for s in _strings(job.spec.to_manifest()))


def fetched_sources(job: FineTuneJob) -> bool:
    """Whether the job reads s3:// or hf:// sources, which the init container fetches once."""
    return any(s.startswith(("s3://", "hf://")) for s in _strings(job.spec.to_manifest(), skip="output"))


def source_claims(job: FineTuneJob) -> list[str]:
    """Claims named by pvc:// sources, in first-seen order. The workspace claim is listed too when a
    source names it: the workspace mount shows only this job's folder of a shared claim, while a
    source (an earlier job's output on the same claim) is read through the whole claim."""
    seen: list[str] = []
    for claim in _pvc_sources(job.spec.to_manifest()):
        if claim not in seen:
            seen.append(claim)
    return seen


def workspace_claim(job: FineTuneJob) -> str:
    return job.spec.checkpointing.storage.existing_claim or naming.names_for(job.name).claim


def workspace_sub_path(job: FineTuneJob) -> str | None:
    """The job's folder on an existing (shared) claim, so that jobs sharing one claim never resume
    from or overwrite each other's checkpoints and output; None for the job's own claim."""
    return job.name if job.spec.checkpointing.storage.existing_claim else None


def service_account_name(job: FineTuneJob) -> str:
    return job.spec.resources.service_account_name or naming.names_for(job.name).service_account


# ------------------------------------------------------------------------------------ builders


def build_config_map(job: FineTuneJob, config: str | None = None) -> dict[str, Any]:
    """The trainer config: the validated manifest as JSON, mounted at /etc/kubetune/job.json
    (``config``: :func:`trainer_config_json` already made for this job)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, naming.names_for(job.name).config_map, "config"),
        "immutable": True,
        "data": {CONFIG_FILE: config if config is not None else trainer_config_json(job)},
    }


LOCAL_MASTER_ADDR = "127.0.0.1"


def uses_service(job: FineTuneJob) -> bool:
    """Whether the pods need the headless Service: only several nodes meet at node 0 over the network.
    One pod's processes (torchrun's rendezvous, or one process with no network at all) meet on
    loopback, so a single-node job has no Service: one object and one API write fewer per job."""
    return job.spec.resources.nodes > 1


def master_addr(job: FineTuneJob) -> str:
    """Where the processes meet: node 0's hostname in the Service's subdomain, or loopback on one node."""
    return naming.names_for(job.name).master_addr() if uses_service(job) else LOCAL_MASTER_ADDR


def build_service(job: FineTuneJob, options: BuildOptions = BuildOptions()) -> dict[str, Any] | None:
    """Headless Service giving the Indexed Job's pods stable hostnames for the rendezvous; None on one node."""
    if not uses_service(job):
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, naming.names_for(job.name).service, "rendezvous"),
        "spec": {
            "clusterIP": "None",
            # Node 0 must resolve before any pod is ready: the trainer has no readiness probe.
            "publishNotReadyAddresses": True,
            "selector": naming.selector_labels(job.name),
            "ports": [
                {"name": RENDEZVOUS_PORT_NAME, "port": options.rendezvous_port, "targetPort": options.rendezvous_port, "protocol": "TCP"}
            ],
        },
    }


def build_claim(job: FineTuneJob) -> dict[str, Any] | None:
    """The workspace claim (checkpoints, output, caches), or None when the spec names an existing one.

    It is owned by the FineTuneJob only when ``checkpointing.storage.deleteWithJob`` is true: by
    default the trained weights outlive the job.
    """
    storage = job.spec.checkpointing.storage
    if storage.existing_claim:
        return None
    spec: dict[str, Any] = {
        "accessModes": [storage.access_mode],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    metadata = _metadata(job, naming.names_for(job.name).claim, "workspace", owned=storage.delete_with_job)
    if job.metadata.uid:
        # Which FineTuneJob made it: a claim kept from an earlier job of the same name is recognised.
        metadata["annotations"][naming.ANNOTATION_JOB_UID] = job.metadata.uid
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": spec}


def build_service_account(job: FineTuneJob) -> dict[str, Any] | None:
    if job.spec.resources.service_account_name:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(job, naming.names_for(job.name).service_account, "trainer"),
        "automountServiceAccountToken": True,
    }


def build_role(job: FineTuneJob) -> dict[str, Any] | None:
    """May read this FineTuneJob and patch its status: nothing else, no other job."""
    if job.spec.resources.service_account_name:
        return None
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(job, naming.names_for(job.name).role, "trainer"),
        "rules": [
            {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "resourceNames": [job.name], "verbs": ["get", "patch"]},
            {"apiGroups": [GROUP], "resources": [PLURAL], "resourceNames": [job.name], "verbs": ["get"]},
        ],
    }


def build_role_binding(job: FineTuneJob) -> dict[str, Any] | None:
    if job.spec.resources.service_account_name:
        return None
    names = naming.names_for(job.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(job, names.role_binding, "trainer"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [{"kind": "ServiceAccount", "name": names.service_account, "namespace": job.namespace}],
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _omp_threads(job: FineTuneJob) -> int:
    cpu = job.spec.resources.cpu
    if not cpu:
        return 1
    try:
        cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    except ValueError:
        return 1
    return max(int(cores // processes_per_node(job)), 1)


def output_dir(job: FineTuneJob) -> str:
    """Where the final model goes in the pods: ``spec.output.path`` inside the workspace (the models
    refuse absolute paths and ``..``), else OUTPUT_DIR."""
    path = job.spec.output.path
    return posixpath.normpath(posixpath.join(WORKSPACE_DIR, path)) if path else OUTPUT_DIR


def trainer_env(job: FineTuneJob, options: BuildOptions = BuildOptions()) -> list[dict[str, Any]]:
    """The trainer container's environment (see TRAINER_ENV_DOC)."""
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_JOB_NAME", "value": job.name},
        _field_env("KUBETUNE_NAMESPACE", "metadata.namespace"),
        _field_env("KUBETUNE_JOB_UID", f"metadata.annotations['{naming.ANNOTATION_JOB_UID}']"),
        _field_env("KUBETUNE_POD_NAME", "metadata.name"),
        {"name": "KUBETUNE_CONFIG", "value": CONFIG_PATH},
        {"name": "KUBETUNE_OUTPUT_DIR", "value": output_dir(job)},
        {"name": "KUBETUNE_CHECKPOINT_DIR", "value": CHECKPOINT_DIR},
        {"name": "KUBETUNE_BASE_DIR", "value": BASE_DIR},
        {"name": "KUBETUNE_PVC_ROOT", "value": PVC_ROOT},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "KUBETUNE_FETCH_DIR", "value": FETCH_DIR},
        {"name": "HOME", "value": "/tmp"},
        {"name": "OMP_NUM_THREADS", "value": str(_omp_threads(job))},
        {"name": "MASTER_ADDR", "value": master_addr(job)},
        {"name": "MASTER_PORT", "value": str(options.rendezvous_port)},
        {"name": "NNODES", "value": str(job.spec.resources.nodes)},
        _field_env("NODE_RANK", f"metadata.annotations['{JOB_COMPLETION_INDEX_ANNOTATION}']"),
        {"name": "NPROC_PER_NODE", "value": str(processes_per_node(job))},
    ]
    secret = job.spec.model.credentials_secret
    s3 = uses_s3(job)
    hub = any(v.startswith("hf://") for v in _strings(job.spec.to_manifest()))
    if secret is not None and (hub or not s3):
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}}})
    if secret is not None and s3:
        for key, optional in S3_SECRET_KEYS.items():
            ref: dict[str, Any] = {"name": secret.name, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


LAUNCHER_MODULE = "kubetune.trainer.launching"


def trainer_command(job: FineTuneJob) -> list[str]:
    """``python -m kubetune.trainer`` for one process, else torchrun (through the trainer's launcher)
    with a static rendezvous on node 0."""
    trainer = ["-m", TRAINER_MODULE, "--config", CONFIG_PATH]
    if not uses_launcher(job):
        return ["python", *trainer]
    # torchrun's launcher, run by the trainer's wrapper so the pod keeps the trainer's exit codes
    # (2 = bad input, which podFailurePolicy fails at once; 143 = stopped on SIGTERM).
    return [
        "python",
        "-m",
        LAUNCHER_MODULE,
        "--nnodes=$(NNODES)",
        "--nproc-per-node=$(NPROC_PER_NODE)",
        "--node-rank=$(NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        *trainer,
    ]


def _container_resources(job: FineTuneJob) -> dict[str, Any]:
    resources = job.spec.resources
    amounts: dict[str, str] = {}
    if resources.cpu:
        amounts["cpu"] = resources.cpu
    if resources.memory:
        amounts["memory"] = resources.memory
    if resources.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(resources.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def build_pod_template(job: FineTuneJob, options: BuildOptions = BuildOptions(), config: str | None = None) -> dict[str, Any]:
    resources = job.spec.resources
    names = naming.names_for(job.name)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.config_map}},
        {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(job)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "workspace", "mountPath": WORKSPACE_DIR, **({"subPath": sub} if (sub := workspace_sub_path(job)) else {})},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for index, claim in enumerate(source_claims(job)):
        volumes.append({"name": f"source-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"source-{index}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})

    security = {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "runAsNonRoot": True,
        # Writable only where the trainer writes: /workspace (claim), /tmp (HOME, so every
        # library cache under ~/.cache), /dev/shm; the image itself cannot be changed.
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    env = trainer_env(job, options)
    fetching = fetched_sources(job)
    image = resources.image or options.trainer_image

    def container_of(name: str, command: list[str], container_env: list[dict[str, Any]],
                     container_mounts: list[dict[str, Any]]) -> dict[str, Any]:
        """What the trainer and the fetch containers share: image, workspace, termination message, security."""
        made: dict[str, Any] = {
            "name": name, "image": image, "command": command, "env": container_env, "volumeMounts": container_mounts,
            "workingDir": WORKSPACE_DIR, "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "FallbackToLogsOnError", "securityContext": security,
        }
        if resources.image_pull_policy:
            made["imagePullPolicy"] = resources.image_pull_policy
        return made

    # Hub sources were fetched by the init container (or there are none): the trainer stays offline.
    container = container_of(CONTAINER_NAME, trainer_command(job), [*env, {"name": "HF_HUB_OFFLINE", "value": "1"}], mounts)
    container["ports"] = [{"name": RENDEZVOUS_PORT_NAME, "containerPort": options.rendezvous_port, "protocol": "TCP"}]
    container_resources = _container_resources(job)
    if container_resources:
        container["resources"] = container_resources

    init_containers: list[dict[str, Any]] = []
    if fetching:
        fetch = container_of(FETCH_CONTAINER_NAME, ["python", "-m", FETCH_MODULE, "--config", CONFIG_PATH], env,
                             [m for m in mounts if m["name"] != "dshm"])
        amounts = {k: v for k, v in (container_resources.get("requests") or {}).items() if k != "nvidia.com/gpu"}
        if amounts:  # downloads need no GPU
            fetch["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
        init_containers.append(fetch)

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account_name(job),
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": options.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": options.run_as_user,
            "runAsGroup": options.run_as_user,
            "fsGroup": options.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    if uses_service(job):  # node 0 resolves as <job>-0.<service> (the Indexed Job names the pods' hostnames)
        pod_spec["subdomain"] = names.service
    if options.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in options.image_pull_secrets]
    if resources.node_selector:
        pod_spec["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        pod_spec["tolerations"] = [t.to_manifest() for t in resources.tolerations]
    if resources.affinity:
        pod_spec["affinity"] = resources.affinity
    if resources.priority_class_name:
        pod_spec["priorityClassName"] = resources.priority_class_name

    annotations = {
        naming.ANNOTATION_JOB: job.name,
        naming.ANNOTATION_CONFIG_HASH: naming.short_hash(config if config is not None else trainer_config_json(job), 16),
    }
    if job.metadata.uid:
        annotations[naming.ANNOTATION_JOB_UID] = job.metadata.uid
    return {
        "metadata": {"labels": naming.child_labels(job.name, "trainer"), "annotations": annotations},
        "spec": pod_spec,
    }


def job_suspended(job: FineTuneJob) -> bool:
    """A Job starts suspended when the user asks, and always when Kueue is to admit it."""
    return job.spec.run_policy.suspend or job.queue_name is not None


def build_job(job: FineTuneJob, options: BuildOptions = BuildOptions(), config: str | None = None) -> dict[str, Any]:
    """batch/v1 Job, Indexed, one pod per node; runPolicy mapped onto the Job's own fields."""
    nodes = job.spec.resources.nodes
    policy = job.spec.run_policy
    metadata = _metadata(job, naming.names_for(job.name).job, "trainer")
    if job.queue_name:
        metadata["labels"][KUEUE_QUEUE_LABEL] = job.queue_name
    spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": nodes,
        "parallelism": nodes,
        "backoffLimit": policy.backoff_limit,
        "suspend": job_suspended(job),
        # Bad input fails the Job at once: a retry would read the same spec and data again.
        "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
            "containerName": name, "operator": "In", "values": [TRAINER_EXIT_BAD_INPUT]}}
            for name in (CONTAINER_NAME, *([FETCH_CONTAINER_NAME] if fetched_sources(job) else []))]},
        "template": build_pod_template(job, options, config),
    }
    if policy.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = policy.active_deadline_seconds
    if policy.ttl_seconds_after_finished is not None:
        spec["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


def run_policy_patch(job: FineTuneJob, *, kueue_managed: bool) -> dict[str, Any]:
    """The merge patch that brings a live Job's runPolicy fields in line with the spec.

    A Job Kueue manages gets no ``suspend``: admitting and evicting it is Kueue's business.
    """
    policy = job.spec.run_policy
    spec: dict[str, Any] = {
        "backoffLimit": policy.backoff_limit,
        "activeDeadlineSeconds": policy.active_deadline_seconds,
        "ttlSecondsAfterFinished": policy.ttl_seconds_after_finished,
    }
    if not kueue_managed:
        spec["suspend"] = policy.suspend
    return {"spec": spec}


def plan(job: FineTuneJob, options: BuildOptions = BuildOptions()) -> list[dict[str, Any]]:
    """Every object for the job, in the order to create them (RBAC and data first, the Job last)."""
    # Made once: the indented JSON goes through json's pure-Python encoder (0.4 ms), and both the
    # ConfigMap and the pod template's config hash need it.
    config = trainer_config_json(job)
    objects = [
        build_service_account(job),
        build_role(job),
        build_role_binding(job),
        build_config_map(job, config),
        build_claim(job),
        build_service(job, options),
        build_job(job, options, config),
    ]
    return [obj for obj in objects if obj is not None]
