"""Cross-field rules: combinations that cannot work, refused with a reason and a field path.

Field-level checks (types, bounds, enums) live on the models; these rules span blocks. Each rule
is a small function registered in ``RULES``; ``check_rules`` runs them all and returns every
problem, so a user fixes a manifest in one round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from kubetune.api.problems import Problem
from kubetune.api.techniques import ADAPTER_METHODS, PROMPT_LEARNING_METHODS

if TYPE_CHECKING:
    from kubetune.api.specs import FineTuneJobSpec

Rule = Callable[["FineTuneJobSpec"], Iterator[Problem]]
RULES: list[Rule] = []

_FORMATS_FOR_HEAD = {
    "causal-lm": {"text", "instruction", "chat", "preference"},
    "sequence-classification": {"classification"},
    "token-classification": {"token-classification"},
    "seq2seq": {"seq2seq", "instruction"},
    "question-answering": {"question-answering"},
}


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def check_rules(spec: FineTuneJobSpec) -> list[Problem]:
    """All cross-field problems of a spec whose fields are individually valid."""
    return [problem for fn in RULES for problem in fn(spec)]


@rule
def _formats_fit_the_head(spec: FineTuneJobSpec) -> Iterator[Problem]:
    head = spec.head
    allowed = _FORMATS_FOR_HEAD[head]
    for i, ds in enumerate(spec.data.datasets):
        if ds.format not in allowed:
            yield Problem(
                f"spec.data.datasets[{i}].format",
                f"format {ds.format!r} does not fit the {head} head; use one of {', '.join(sorted(allowed))}"
                " (the head comes from spec.techniques.task.type or spec.model.head)",
            )


@rule
def _preference_data_needs_dpo(spec: FineTuneJobSpec) -> Iterator[Problem]:
    cg = spec.techniques.controlled_generation
    dpo = cg.dpo if cg else None
    has_pref = [i for i, d in enumerate(spec.data.datasets) if d.format == "preference"]
    if dpo is not None and len(has_pref) != len(spec.data.datasets):
        yield Problem(
            "spec.techniques.controlledGeneration.dpo",
            "DPO needs every training dataset in format 'preference' (prompt, chosen, rejected)",
        )
    if dpo is None and has_pref:
        yield Problem(
            f"spec.data.datasets[{has_pref[0]}].format",
            "preference data is only used by techniques.controlledGeneration.dpo; add a dpo block",
        )


@rule
def _qlora_needs_gpus(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.peft.method == "qlora" and spec.resources.gpus_per_node < 1:
        yield Problem("spec.peft.method", "qlora loads the base in 4 bits and needs GPUs; set spec.resources.gpusPerNode >= 1 or use lora")
    if spec.peft.method == "qlora" and spec.deepspeed.zero_stage == 3:
        yield Problem("spec.deepspeed.zeroStage", "qlora cannot shard 4-bit weights with ZeRO-3; use zeroStage 0-2")


@rule
def _prompt_learning_limits(spec: FineTuneJobSpec) -> Iterator[Problem]:
    method = spec.peft.method
    if method not in PROMPT_LEARNING_METHODS:
        return
    if spec.head in {"token-classification", "question-answering"}:
        yield Problem(
            "spec.peft.method",
            f"{method} adds virtual tokens that shift per-token outputs; it cannot be combined with a {spec.head} head. Use lora",
        )
    if spec.techniques.layer_selection is not None:
        yield Problem("spec.techniques.layerSelection", f"{method} trains only virtual tokens; layer selection has nothing to select")
    if spec.training.packing:
        yield Problem("spec.training.packing", f"{method} prepends virtual tokens to each sequence; packing is not possible")
    if spec.techniques.distillation is not None:
        yield Problem("spec.techniques.distillation", f"{method} changes sequence lengths; distillation needs aligned logits. Use lora")
    if spec.peft.init_text and method != "prompt":
        yield Problem("spec.peft.initText", "text initialisation is for method 'prompt' only")


@rule
def _transfer_strategy_needs_full(spec: FineTuneJobSpec) -> Iterator[Problem]:
    tl = spec.techniques.transfer_learning
    if tl is None:
        return
    if tl.strategy != "full" and spec.peft.method != "full":
        yield Problem(
            "spec.techniques.transferLearning.strategy",
            f"{tl.strategy} decides which base weights learn, and peft.method {spec.peft.method!r} already freezes the base; use peft.method full",
        )
    if tl.strategy == "gradual-unfreeze" and tl.unfreeze is None:
        yield Problem("spec.techniques.transferLearning.unfreeze", "gradual-unfreeze needs an unfreeze schedule (everySteps, blocksPerStage)")
    if tl.strategy != "gradual-unfreeze" and tl.unfreeze is not None:
        yield Problem("spec.techniques.transferLearning.unfreeze", "an unfreeze schedule is only used by strategy gradual-unfreeze")
    if tl.strategy != "full" and spec.techniques.layer_selection is not None:
        yield Problem("spec.techniques.layerSelection", f"transferLearning.strategy {tl.strategy} already decides which layers train")


@rule
def _eval_metrics_need_eval_data(spec: FineTuneJobSpec) -> Iterator[Problem]:
    ev = spec.data.eval
    has_eval = ev is not None and (ev.holdout_fraction or ev.datasets)
    if has_eval:
        return
    es = spec.techniques.early_stopping
    if es is not None:
        yield Problem("spec.techniques.earlyStopping", f"early stopping on {es.metric!r} needs evaluation data; set spec.data.eval.holdoutFraction or spec.data.eval.datasets")
    hs = spec.techniques.hyperparameter_search
    if hs is not None and hs.metric.startswith("eval"):
        yield Problem("spec.techniques.hyperparameterSearch.metric", f"{hs.metric!r} needs evaluation data; set spec.data.eval")


@rule
def _curriculum_settings(spec: FineTuneJobSpec) -> Iterator[Problem]:
    cur = spec.techniques.curriculum
    if cur is None:
        return
    if cur.difficulty == "score" and not cur.score_field:
        yield Problem("spec.techniques.curriculum.scoreField", "difficulty 'score' needs the column that holds the score")
    if cur.start_fraction > 1.0 or cur.full_at <= 0.0:
        yield Problem("spec.techniques.curriculum.fullAt", "must be > 0 so that all data becomes available")
    if spec.techniques.multi_task is not None:
        yield Problem(
            "spec.techniques.curriculum",
            f"curriculum pacing and multiTask {spec.techniques.multi_task.sampling} sampling both decide the order of "
            "the examples; choose one (multiTask without curriculum, or one dataset per run with curriculum)",
        )


@rule
def _packing_is_causal_lm(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.training.packing and spec.head != "causal-lm":
        yield Problem("spec.training.packing", f"packing is for causal LM training; the {spec.head} head needs one example per sequence")
    if spec.training.packing and spec.techniques.controlled_generation and spec.techniques.controlled_generation.dpo:
        yield Problem("spec.training.packing", "DPO compares chosen and rejected sequences one by one; turn packing off")


@rule
def _distillation_heads(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.techniques.distillation is None:
        return
    cg = spec.techniques.controlled_generation
    if cg is not None and cg.dpo is not None:
        yield Problem("spec.techniques.distillation", "distillation and DPO both define the loss; run them as separate jobs")
    if spec.head == "question-answering":
        yield Problem("spec.techniques.distillation", "distillation of extractive QA span logits is not supported; use a causal-lm, classification or token-classification head")


@rule
def _multi_task_needs_several(spec: FineTuneJobSpec) -> Iterator[Problem]:
    mt = spec.techniques.multi_task
    if mt is None:
        return
    tasks = {d.task or d.name or f"dataset-{i}" for i, d in enumerate(spec.data.datasets)}
    if len(spec.data.datasets) < 2:
        yield Problem("spec.data.datasets", "multi-task learning needs at least two datasets (one per task)")
    elif len(tasks) < 2:
        yield Problem("spec.data.datasets", "multi-task learning needs datasets of at least two different tasks (set each dataset's task or name)")


@rule
def _dataset_names_unique(spec: FineTuneJobSpec) -> Iterator[Problem]:
    seen: dict[str, int] = {}
    for i, d in enumerate(spec.data.datasets):
        if d.name is None:
            continue
        if d.name in seen:
            yield Problem(f"spec.data.datasets[{i}].name", f"{d.name!r} is already the name of datasets[{seen[d.name]}]")
        seen[d.name] = i


@rule
def _layer_selection_not_empty(spec: FineTuneJobSpec) -> Iterator[Problem]:
    ls = spec.techniques.layer_selection
    if ls is not None and not ls.layers and not ls.patterns and not ls.learning_rates:
        yield Problem("spec.techniques.layerSelection", "select layers, patterns or learningRates; an empty selection trains nothing")


@rule
def _search_space(spec: FineTuneJobSpec) -> Iterator[Problem]:
    hs = spec.techniques.hyperparameter_search
    if hs is None:
        return
    from kubetune.api.searching import resolve_search_path

    for i, p in enumerate(hs.parameters):
        where = f"spec.techniques.hyperparameterSearch.parameters[{i}]"
        error = resolve_search_path(p.path)
        if error:
            yield Problem(f"{where}.path", error)
        if p.type in {"float", "int"}:
            if p.values is None and (p.low is None or p.high is None):
                yield Problem(where, f"a {p.type} parameter needs low and high (or values for grid)")
            elif p.low is not None and p.high is not None and p.low >= p.high:
                yield Problem(f"{where}.high", f"must be > low ({p.low}), got {p.high}")
            if p.log and p.low is not None and p.low <= 0:
                yield Problem(f"{where}.low", f"a log-scale parameter needs low > 0, got {p.low}")
        if p.type == "categorical" and not p.choices:
            yield Problem(f"{where}.choices", "a categorical parameter needs choices")
        if p.type != "categorical" and p.choices:
            yield Problem(f"{where}.choices", f"choices are for categorical parameters; a {p.type} parameter takes low/high or values")
        if hs.sampler == "grid" and p.type == "float" and not p.values:
            yield Problem(f"{where}.values", "grid search needs explicit values for float parameters")


@rule
def _adapters_settings(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.peft.layers and spec.peft.method not in ADAPTER_METHODS:
        yield Problem("spec.peft.layers", f"restricting to layers applies to {', '.join(sorted(ADAPTER_METHODS))}, not {spec.peft.method!r}")
    if spec.output.merge_adapters and spec.peft.method not in {"lora", "dora", "ia3"}:
        yield Problem("spec.output.mergeAdapters", f"only lora, dora and ia3 adapters can be merged, not {spec.peft.method!r}")


@rule
def _deepspeed_offload(spec: FineTuneJobSpec) -> Iterator[Problem]:
    ds = spec.deepspeed
    if ds.offload_params != "none" and ds.zero_stage != 3:
        yield Problem("spec.deepspeed.offloadParams", f"parameter offload needs zeroStage 3, got {ds.zero_stage}")
    if ds.offload_optimizer != "none" and ds.zero_stage == 0:
        yield Problem("spec.deepspeed.offloadOptimizer", "optimizer offload needs zeroStage >= 1")
    if spec.resources.gpus_per_node == 0 and spec.training.precision == "fp16":
        yield Problem("spec.training.precision", "fp16 mixed precision needs GPUs; use auto, bf16 or fp32 on CPU")


@rule
def _fused_engine_limits(spec: FineTuneJobSpec) -> Iterator[Problem]:
    ds, r, t = spec.deepspeed, spec.resources, spec.training
    if ds.engine != "fused":
        return
    processes = r.nodes * (r.processes_per_node or max(1, r.gpus_per_node))
    if processes > 1:
        yield Problem("spec.deepspeed.engine", f"the fused engine runs one process, this job has {processes}; use engine: deepspeed (or leave it unset)")
    if ds.zero_stage == 3 or ds.offload_optimizer != "none" or ds.offload_params != "none":
        yield Problem("spec.deepspeed.engine", "the fused engine keeps everything on one device: no ZeRO-3 and no offload; use engine: deepspeed")
    if t.precision == "fp16":
        yield Problem("spec.deepspeed.engine", "the fused engine has no fp16 loss scaler; use precision bf16 or engine: deepspeed")
    if t.optimizer not in ("adamw", "adam"):
        yield Problem("spec.deepspeed.engine", f"the fused engine runs adamw or adam, not {t.optimizer}; use engine: deepspeed")
    if ds.config:
        yield Problem("spec.deepspeed.engine", "deepspeed.config configures DeepSpeed, which the fused engine does not run; remove one of them")


@rule
def _packing_budget_needs_packing(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.training.packing_max_examples is not None and spec.training.packing is False:
        yield Problem("spec.training.packingMaxExamples", "limits examples per packed micro-batch, but packing is off; remove it or turn packing on")


@rule
def _storage(spec: FineTuneJobSpec) -> Iterator[Problem]:
    st = spec.checkpointing.storage
    if spec.resources.nodes > 1 and st.existing_claim is None and st.access_mode != "ReadWriteMany":
        yield Problem(
            "spec.checkpointing.storage.accessMode",
            f"{spec.resources.nodes} nodes write checkpoints to one claim; it must be ReadWriteMany (got {st.access_mode})",
        )
    if st.existing_claim and st.delete_with_job:
        yield Problem("spec.checkpointing.storage.deleteWithJob", "kubetune never deletes a claim it did not create (existingClaim is set)")


@rule
def _domain_adaptation_is_causal_lm(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.techniques.domain_adaptation is None:
        return
    if spec.head != "causal-lm":
        yield Problem("spec.techniques.domainAdaptation", f"continued pre-training trains a causal LM; the {spec.head} head cannot (remove techniques.task or model.head)")
    for i, ds in enumerate(spec.data.datasets):
        if ds.format != "text":
            yield Problem(f"spec.data.datasets[{i}].format", f"domain adaptation reads raw documents: use format 'text', got {ds.format!r}")


@rule
def _augmentation_keeps_labels(spec: FineTuneJobSpec) -> Iterator[Problem]:
    aug = spec.techniques.augmentation
    if aug is None:
        return
    ops = [aug.token_dropout, aug.token_masking, aug.random_swap, aug.random_delete, aug.synonyms, aug.template_paraphrase]
    if all(op is None for op in ops):
        yield Problem("spec.techniques.augmentation", "turn on at least one augmentation (tokenDropout, tokenMasking, randomSwap, randomDelete, synonyms, templateParaphrase)")
    if spec.head == "question-answering":
        yield Problem("spec.techniques.augmentation", "edits of the question or context would move the answer span of extractive QA; augmentation cannot be used with the question-answering head")
    cg = spec.techniques.controlled_generation
    if cg is not None and cg.dpo is not None:
        yield Problem("spec.techniques.augmentation", "DPO compares fixed chosen/rejected pairs; augmenting them changes what is preferred. Remove augmentation or dpo")


@rule
def _early_stopping_keeps_its_best(spec: FineTuneJobSpec) -> Iterator[Problem]:
    es, ck = spec.techniques.early_stopping, spec.checkpointing
    if es is None or (ck.metric == es.metric and ck.mode == es.mode):
        return
    yield Problem(
        "spec.checkpointing.metric",
        f"the best checkpoint (the one exported) is ranked by checkpointing.metric {ck.metric!r} ({ck.mode}), but early "
        f"stopping watches {es.metric!r} ({es.mode}); set checkpointing.metric: {es.metric} and mode: {es.mode}",
    )


@rule
def _loss_techniques_need_logits(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if not spec.training.packing:
        return
    t = spec.techniques
    if t.distillation is not None:
        yield Problem("spec.training.packing", "distillation compares the student's logits with the teacher's, and the fused packed loss keeps none; turn packing off")
    if t.adversarial is not None and t.adversarial.method != "none":
        yield Problem("spec.training.packing", f"adversarial method {t.adversarial.method} re-runs the model on perturbed embeddings, which packed batches cannot; turn packing off (NEFTune alone works with packing)")
    if t.regularization is not None and t.regularization.label_smoothing:
        yield Problem("spec.training.packing", "label smoothing needs the logits, and the fused packed loss keeps none; turn packing off")


@rule
def _penalties_read_full_weights(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.deepspeed.zero_stage != 3:
        return
    reg = spec.techniques.regularization
    if reg is not None and reg.l1:
        yield Problem("spec.techniques.regularization.l1", "L1 reads every trainable weight, which ZeRO-3 shards across processes; use deepspeed.zeroStage 0-2")
    if reg is not None and reg.l2_sp:
        yield Problem("spec.techniques.regularization.l2Sp", "L2-SP compares every trainable weight with its start, which ZeRO-3 shards across processes; use deepspeed.zeroStage 0-2")
    cl = spec.techniques.continual_learning
    if cl is not None and cl.ewc is not None:
        yield Problem("spec.techniques.continualLearning.ewc", "EWC compares every trainable weight with its start, which ZeRO-3 shards across processes; use deepspeed.zeroStage 0-2")


@rule
def _adversarial_does_something(spec: FineTuneJobSpec) -> Iterator[Problem]:
    adv = spec.techniques.adversarial
    if adv is not None and adv.method == "none" and adv.neftune_alpha is None:
        yield Problem("spec.techniques.adversarial.method", "method none with no neftuneAlpha changes nothing; choose fgm, pgd or freelb, or set neftuneAlpha")
