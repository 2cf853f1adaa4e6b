"""The fifteen fine-tuning techniques and the PEFT methods, as validated config blocks.

Each technique is one block under ``spec.techniques`` with its own model here, registered by
name in ``TECHNIQUES`` (which refuses duplicates). The trainer side of each technique is a plugin
in ``kubetune.trainer.techniques`` registered under the same name; a test checks that both
registries agree. Cross-technique rules (what cannot be combined) live in ``kubetune.api.rules``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from kubetune.api.base import Fraction, Probability, SpecModel

Pattern = Annotated[str, Field(min_length=1, max_length=256)]
ColumnName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]


# --- PEFT -------------------------------------------------------------------------------------

PeftMethod = Literal["full", "lora", "qlora", "dora", "ia3", "prefix", "prompt", "p-tuning"]
PROMPT_LEARNING_METHODS = frozenset({"prefix", "prompt", "p-tuning"})
ADAPTER_METHODS = frozenset({"lora", "qlora", "dora", "ia3"})


class PeftSpec(SpecModel):
    """Which parameters learn: all of them (full) or a parameter-efficient method through PEFT."""

    method: PeftMethod = Field(
        default="full",
        description=(
            "full fine-tuning, or lora, qlora (4-bit base, GPU only), dora, ia3, prefix (prefix tuning), "
            "prompt (prompt tuning) or p-tuning."
        ),
    )
    r: int = Field(default=16, ge=1, le=4096, description="LoRA/DoRA/QLoRA rank.")
    alpha: float = Field(default=32.0, gt=0.0, le=1e6, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: Fraction = Field(default=0.05, description="Dropout on the LoRA path.")
    target_modules: list[Pattern] | None = Field(
        default=None,
        max_length=256,
        description="Module names or regex the adapters attach to; default all linear layers of the blocks.",
    )
    layers: list[Annotated[int, Field(ge=0, le=100000)]] | None = Field(
        default=None,
        max_length=1024,
        description="Restrict adapters to these block indices (same as techniques.layerSelection for LoRA).",
    )
    num_virtual_tokens: int = Field(default=20, ge=1, le=4096, description="Virtual tokens for prefix/prompt/p-tuning.")
    init_text: str | None = Field(
        default=None, max_length=4096, description="Initialise prompt-tuning virtual tokens from this text."
    )
    encoder_hidden_size: int | None = Field(default=None, ge=1, le=65536, description="P-tuning prompt encoder width.")


# --- the fifteen techniques ---------------------------------------------------------------------


class GeneralDataMix(SpecModel):
    """General-domain text mixed into continued pre-training to limit forgetting."""

    source: str = Field(min_length=1, max_length=1024, description="Dataset of general text (same schemes as data sources).")
    ratio: Fraction = Field(default=0.1, description="Fraction of training examples drawn from the general text.")
    field: ColumnName = Field(default="text", description="Column holding the text.")


class DomainAdaptationSpec(SpecModel):
    """1 · Continued pre-training (causal LM) on a domain corpus."""

    packing: bool = Field(default=True, description="Concatenate documents into full-length blocks (no padding).")
    block_size: int | None = Field(default=None, ge=8, le=1048576, description="Tokens per block; default training.maxSeqLength.")
    general_data: GeneralDataMix | None = Field(default=None, description="Mix in general text to limit forgetting.")


class TaskSpec(SpecModel):
    """2 · Task-specific fine-tuning: the task decides the head, the loss and the metrics."""

    type: Literal["classification", "token-classification", "seq2seq", "question-answering", "instruction", "causal-lm"] = Field(
        description="The task; decides the model head (classification and NER heads, encoder-decoder, extractive QA, SFT)."
    )
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None,
        min_length=2,
        max_length=10000,
        description="Label names (classification, token-classification); default: read from the data.",
    )
    loss_on_response_only: bool = Field(
        default=True, description="Instruction SFT: mask prompt tokens out of the loss."
    )
    max_target_length: int | None = Field(default=None, ge=1, le=1048576, description="seq2seq: tokens per target.")


class UnfreezeSchedule(SpecModel):
    """Gradual unfreezing from the top."""

    every_steps: int = Field(default=100, ge=1, le=10**9, description="Unfreeze another group of blocks every N steps.")
    blocks_per_stage: int = Field(default=1, ge=1, le=10000, description="Blocks unfrozen at each stage, from the top down.")


class TransferLearningSpec(SpecModel):
    """3 · Transfer learning: a pretrained base, a new head, and how much of the base learns."""

    strategy: Literal["full", "linear-probe", "gradual-unfreeze"] = Field(
        default="full",
        description="full: everything learns; linear-probe: base frozen, only the head learns; gradual-unfreeze: head first, then blocks from the top.",
    )
    new_head: bool = Field(default=True, description="Initialise a new task head (else reuse the checkpoint's head if it has one).")
    head_learning_rate: float | None = Field(default=None, gt=0.0, le=10.0, description="Learning rate for the head (default training.learningRate).")
    base_learning_rate: float | None = Field(default=None, gt=0.0, le=10.0, description="Learning rate for the base (default training.learningRate).")
    unfreeze: UnfreezeSchedule | None = Field(default=None, description="Schedule for gradual-unfreeze.")


class PromptEngineeringSpec(SpecModel):
    """4 · Prompt templates applied to every example (prompt/prefix/p-tuning are peft methods)."""

    template: str | None = Field(
        default=None,
        max_length=16384,
        description="Template rendering each example's prompt; row fields are variables, e.g. `Review: {{ text }}\\nSentiment:`.",
    )
    template_format: Literal["jinja", "format"] = Field(
        default="jinja", description="jinja (`{{ field }}`) or Python format strings (`{field}`)."
    )
    response_template: str | None = Field(
        default=None, max_length=16384, description="Template for the response/target side, when it needs one."
    )


class MultiTaskSpec(SpecModel):
    """5 · Several datasets/tasks at once."""

    sampling: Literal["proportional", "weights", "temperature", "uniform"] = Field(
        default="weights",
        description="weights: by each dataset's weight; proportional: by size; temperature: size^(1/T); uniform: equal.",
    )
    temperature: float = Field(default=2.0, gt=0.0, le=100.0, description="T for temperature sampling.")
    task_prefixes: bool = Field(default=False, description="Prepend `<task>: ` to every input so the model knows the task.")
    per_task_metrics: bool = Field(default=True, description="Report eval metrics per task in status.")


class TeacherSpec(SpecModel):
    """The teacher of knowledge distillation."""

    source: str = Field(min_length=1, max_length=1024, description="Where the teacher model comes from (same schemes as model.source).")
    revision: str | None = Field(default=None, max_length=255, description="Revision of an hf:// teacher.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="Dtype the teacher is loaded in.")


class DistillationSpec(SpecModel):
    """6 · Knowledge distillation: loss = alpha·CE + (1-alpha)·T²·KL(teacher‖student)."""

    teacher: TeacherSpec = Field(description="The teacher model; it must share the student's tokenizer.")
    alpha: Fraction = Field(default=0.5, description="Weight of the hard-label cross-entropy.")
    temperature: float = Field(default=2.0, gt=0.0, le=100.0, description="Softmax temperature T.")


class AdversarialSpec(SpecModel):
    """7 · Adversarial fine-tuning in embedding space, and NEFTune noise."""

    method: Literal["none", "fgm", "pgd", "freelb"] = Field(default="fgm", description="Perturbation method.")
    epsilon: float = Field(default=1.0, gt=0.0, le=1000.0, description="Radius of the perturbation.")
    step_size: float = Field(default=0.3, gt=0.0, le=1000.0, description="Step size of each PGD/FreeLB ascent step.")
    steps: int = Field(default=3, ge=1, le=100, description="Ascent steps (PGD, FreeLB).")
    norm: Literal["l2", "linf"] = Field(default="l2", description="Norm bounding the perturbation.")
    weight: float = Field(default=1.0, gt=0.0, le=100.0, description="Weight of the adversarial loss term.")
    neftune_alpha: float | None = Field(default=None, gt=0.0, le=100.0, description="NEFTune noise scale on input embeddings during training.")


class SearchParameter(SpecModel):
    """One dimension of the search space."""

    path: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[a-zA-Z][A-Za-z0-9_]*(\.[a-zA-Z][A-Za-z0-9_]*)+$",
        description="Dotted spec path of the field tuned, e.g. `training.learningRate` or `peft.r`.",
    )
    type: Literal["float", "int", "categorical"] = Field(description="Kind of values.")
    low: float | None = Field(default=None, description="Lower bound (float, int).")
    high: float | None = Field(default=None, description="Upper bound (float, int).")
    log: bool = Field(default=False, description="Sample on a log scale.")
    values: list[float] | None = Field(default=None, min_length=1, max_length=1000, description="Explicit numeric values (float, int; required for grid over floats).")
    choices: list[Annotated[str, Field(max_length=256)]] | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Choices of a categorical parameter, as YAML scalars in strings (`cosine`, `true`, `8`).",
    )


class HyperparameterSearchSpec(SpecModel):
    """8 · Hyperparameter tuning: trials as child runs, a sampler, the best trial kept."""

    sampler: Literal["grid", "random", "tpe"] = Field(default="random", description="How trials are proposed.")
    trials: int = Field(default=8, ge=1, le=10000, description="Number of trials (grid: at most the grid size).")
    parallelism: int = Field(default=1, ge=1, le=1000, description="Trials run at once.")
    metric: str = Field(default="eval_loss", max_length=128, pattern=r"^[A-Za-z0-9_./\-]+$", description="Metric to optimise.")
    mode: Literal["min", "max"] = Field(default="min", description="Minimise or maximise the metric.")
    parameters: list[SearchParameter] = Field(min_length=1, max_length=64, description="The search space.")
    max_steps_per_trial: int | None = Field(default=None, ge=1, le=10**9, description="Cap each trial's steps.")
    pruner: Literal["none", "median", "successive-halving"] = Field(
        default="none",
        description=(
            "Stop unpromising trials early from the metric at each evaluation (`data.eval.everySteps`): "
            "`median` stops a trial whose best value so far is worse than the median of the finished trials at the same step; "
            "`successive-halving` keeps the best third at each rung. Applied by `kubetune train`; in a cluster trials run to their end."
        ),
    )


class ControlCodesSpec(SpecModel):
    """Attribute conditioning with control codes."""

    field: ColumnName = Field(default="attribute", description="Column holding each example's attribute value.")
    format: str = Field(default="<{value}>", min_length=1, max_length=256, description="How a value becomes a control code prepended to the input.")
    values: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, max_length=1000, description="Known attribute values (added as special tokens)."
    )


class DpoSpec(SpecModel):
    """Direct preference optimisation on prompt/chosen/rejected data."""

    beta: float = Field(default=0.1, gt=0.0, le=100.0, description="Strength of the KL constraint to the reference model.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(default="sigmoid", description="DPO loss variant.")
    label_smoothing: Fraction = Field(default=0.0, description="Conservative DPO label smoothing.")


class ControlledGenerationSpec(SpecModel):
    """9 · Controlled generation: control codes and/or preference optimisation."""

    control_codes: ControlCodesSpec | None = Field(default=None, description="Prepend attribute control codes.")
    dpo: DpoSpec | None = Field(default=None, description="Steer outputs with DPO on preference data.")


class LayerLearningRate(SpecModel):
    """A learning rate for the parameters matching a pattern."""

    pattern: Pattern = Field(description="Glob over parameter names, e.g. `*.mlp.*`.")
    learning_rate: float = Field(gt=0.0, le=10.0, description="Learning rate for those parameters.")


class LayerSelectionSpec(SpecModel):
    """10 · Train only chosen layers/modules; the rest is frozen."""

    layers: list[Annotated[str, Field(pattern=r"^-?\d+(:(-?\d+)?)?$", max_length=32)]] | None = Field(
        default=None,
        max_length=1024,
        description="Block indices or Python-style ranges: `3`, `8:12` (end exclusive), `-4:` (the last four); negatives count from the end.",
    )
    patterns: list[Pattern] | None = Field(
        default=None, max_length=256, description="Globs over parameter names that stay trainable, e.g. `*.mlp.*`."
    )
    train_head: bool = Field(default=True, description="Keep the task head / LM head trainable.")
    learning_rates: list[LayerLearningRate] | None = Field(default=None, max_length=64, description="Per-group learning rates.")


class RegularizationSpec(SpecModel):
    """11 · Regularisation terms."""

    weight_decay: float = Field(default=0.0, ge=0.0, le=10.0, description="Decoupled weight decay (AdamW).")
    no_decay_patterns: list[Pattern] = Field(
        default_factory=lambda: ["*bias", "*norm*", "*ln_*", "*LayerNorm*"],
        max_length=64,
        description="Parameters exempt from weight decay.",
    )
    l1: float = Field(default=0.0, ge=0.0, le=10.0, description="L1 penalty on trainable weights.")
    l2_sp: float = Field(default=0.0, ge=0.0, le=1000.0, description="L2-SP penalty: squared distance to the pretrained weights.")
    dropout: Fraction | None = Field(default=None, description="Override the model's dropout probabilities.")
    label_smoothing: Fraction = Field(default=0.0, description="Label smoothing of the cross-entropy.")


class AugmentationOp(SpecModel):
    """An augmentation applied with probability ``p`` per example."""

    p: Probability = Field(default=0.1, description="Probability the augmentation is applied to an example.")
    rate: Fraction = Field(default=0.1, description="Fraction of words/tokens touched when it is applied.")


class SynonymAugmentation(AugmentationOp):
    """Replace words by synonyms from a user file."""

    file: str = Field(min_length=1, max_length=1024, description="File of synonym sets: one set per line, words separated by commas.")


class ParaphraseAugmentation(SpecModel):
    """Re-render the prompt with another template."""

    p: Probability = Field(default=0.1, description="Probability of using a paraphrase template.")
    templates: list[Annotated[str, Field(min_length=1, max_length=16384)]] = Field(
        min_length=1, max_length=64, description="Alternative prompt templates (same variables as the main template)."
    )


class AugmentationSpec(SpecModel):
    """12 · Label-preserving text augmentation, applied on the fly and seeded."""

    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Seed; default training.seed.")
    token_dropout: AugmentationOp | None = Field(default=None, description="Drop input tokens.")
    token_masking: AugmentationOp | None = Field(default=None, description="Replace input tokens by the mask/unk token.")
    random_swap: AugmentationOp | None = Field(default=None, description="Swap neighbouring words.")
    random_delete: AugmentationOp | None = Field(default=None, description="Delete words.")
    synonyms: SynonymAugmentation | None = Field(default=None, description="Synonym replacement from a file.")
    template_paraphrase: ParaphraseAugmentation | None = Field(default=None, description="Alternative prompt templates.")


class EarlyStoppingSpec(SpecModel):
    """13 · Stop when an eval metric stops improving."""

    metric: str = Field(default="eval_loss", max_length=128, pattern=r"^[A-Za-z0-9_./\-]+$", description="Eval metric watched.")
    mode: Literal["min", "max"] = Field(default="min", description="Lower or higher is better.")
    patience: int = Field(default=3, ge=1, le=10000, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0.0, le=1e9, description="Smallest change that counts as improvement.")


class ReplaySpec(SpecModel):
    """Replay of earlier data."""

    source: str = Field(min_length=1, max_length=1024, description="Dataset of the earlier task (same schemes as data sources).")
    format: Literal["text", "instruction", "chat", "classification", "token-classification", "seq2seq", "question-answering"] | None = Field(
        default=None, description="Format of the replay data; default the first dataset's."
    )
    ratio: Fraction = Field(default=0.2, description="Fraction of examples drawn from replay data.")


class EwcSpec(SpecModel):
    """Elastic weight consolidation towards the starting weights."""

    lambda_: float = Field(default=100.0, gt=0.0, le=1e9, alias="lambda", description="Strength of the EWC penalty.")
    fisher_samples: int = Field(default=64, ge=1, le=100000, description="Examples of the earlier data used to estimate the Fisher information.")


class ContinualLearningSpec(SpecModel):
    """14 · Continue from an earlier job's checkpoint on new data, without forgetting the old."""

    from_checkpoint: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Checkpoint or output of an earlier job (path, pvc://claim/path); default model.source.",
    )
    replay: ReplaySpec | None = Field(default=None, description="Mix in data of the earlier task.")
    ewc: EwcSpec | None = Field(default=None, description="Penalise moving weights that mattered for the earlier task.")


class CurriculumSpec(SpecModel):
    """15 · Curriculum learning: easy examples first, harder ones paced in."""

    difficulty: Literal["length", "score", "loss"] = Field(
        default="length", description="length: tokens; score: a column; loss: the initial model's loss per example."
    )
    score_field: ColumnName | None = Field(default=None, description="Column holding the difficulty score (difficulty: score).")
    pacing: Literal["linear", "step", "root"] = Field(default="linear", description="How the available fraction grows.")
    start_fraction: Fraction = Field(default=0.2, description="Fraction of the data (easiest first) available at step 0.")
    full_at: Fraction = Field(default=0.8, description="Fraction of training after which all data is available.")
    stages: int = Field(default=4, ge=1, le=1000, description="Number of stages for step pacing.")
    reverse: bool = Field(default=False, description="Hard to easy (anti-curriculum).")


class TechniquesSpec(SpecModel):
    """The fine-tuning techniques; each set block turns one on, and they combine."""

    domain_adaptation: DomainAdaptationSpec | None = Field(default=None, description="1 · Continued pre-training on a domain corpus.")
    task: TaskSpec | None = Field(default=None, description="2 · Task-specific fine-tuning (head, loss and metrics).")
    transfer_learning: TransferLearningSpec | None = Field(default=None, description="3 · Freeze/probe/unfreeze a pretrained base under a new head.")
    prompt_engineering: PromptEngineeringSpec | None = Field(default=None, description="4 · Prompt templates (prompt/prefix/p-tuning under peft).")
    multi_task: MultiTaskSpec | None = Field(default=None, description="5 · Multi-task learning over several datasets.")
    distillation: DistillationSpec | None = Field(default=None, description="6 · Knowledge distillation from a teacher.")
    adversarial: AdversarialSpec | None = Field(default=None, description="7 · Adversarial training (FGM, PGD, FreeLB) and NEFTune.")
    hyperparameter_search: HyperparameterSearchSpec | None = Field(default=None, description="8 · Hyperparameter search over trials.")
    controlled_generation: ControlledGenerationSpec | None = Field(default=None, description="9 · Control codes and DPO.")
    layer_selection: LayerSelectionSpec | None = Field(default=None, description="10 · Train only chosen layers.")
    regularization: RegularizationSpec | None = Field(default=None, description="11 · Weight decay, L1, L2-SP, dropout, label smoothing.")
    augmentation: AugmentationSpec | None = Field(default=None, description="12 · Data augmentation.")
    early_stopping: EarlyStoppingSpec | None = Field(default=None, description="13 · Early stopping on an eval metric.")
    continual_learning: ContinualLearningSpec | None = Field(default=None, description="14 · Continue from an earlier checkpoint; replay, EWC.")
    curriculum: CurriculumSpec | None = Field(default=None, description="15 · Curriculum learning.")

    def enabled(self) -> list[str]:
        """Names (YAML keys) of the techniques this job turns on, in registry order."""
        return [info.name for info in TECHNIQUES.values() if getattr(self, info.attribute) is not None]


# --- the registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TechniqueInfo:
    """What the API knows of a technique: its key, number in the brief, title and config model."""

    name: str  # YAML key under spec.techniques
    attribute: str  # Python attribute on TechniquesSpec
    number: int
    title: str
    config: type[SpecModel]


TECHNIQUES: dict[str, TechniqueInfo] = {}


def register(info: TechniqueInfo) -> None:
    """Add a technique; a name or number already taken is a programming error."""
    if info.name in TECHNIQUES or any(t.number == info.number for t in TECHNIQUES.values()):
        raise ValueError(f"technique {info.name!r} (#{info.number}) is registered twice")
    TECHNIQUES[info.name] = info


for _attribute, _field in TechniquesSpec.model_fields.items():
    _config = _field.annotation.__args__[0]  # type: ignore[union-attr]  # X | None
    _number, _, _title = (_field.description or "").partition(" · ")
    register(TechniqueInfo(_field.alias or _attribute, _attribute, int(_number), _title.rstrip("."), _config))
