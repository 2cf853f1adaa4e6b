"""Cross-field rules: combinations that cannot work, refused with a reason and a field path.

Field-level checks (types, bounds, enums) live on the models; these rules span blocks. The rules of
the spec's own blocks are registered here in ``RULES``; each technique brings its own (its
``Declaration.rules``), and what techniques declare they need of the data path
(``Declaration.requirements``) becomes the rules at the end of this module — written once for every
technique, not once per technique. ``check_rules`` runs them all and returns every problem, so a
user fixes a manifest in one round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import re

from kubetune.api.peft import ADAPTER_METHODS, PROMPT_LEARNING_METHODS, is_module_regex
from kubetune.api.problems import Problem
from kubetune.techniques import registered
from kubetune.techniques.declarations import Capability, Declaration, Requirement

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
    technique_rules = [fn for d in registered().values() for fn in d.rules]
    return [problem for fn in [*RULES, *technique_rules, *CAPABILITY_RULES] for problem in fn(spec)]


def requirements(spec: FineTuneJobSpec) -> Iterator[tuple[Declaration, Requirement]]:
    """What every technique the spec turns on needs, as configured, in registry order."""
    for d in registered().values():
        config: Any = getattr(spec.techniques, d.attribute)
        if config is not None:
            for need in d.requirements(config):
                yield d, need


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
def _qlora_needs_gpus(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.peft.method == "qlora" and spec.resources.gpus_per_node < 1:
        yield Problem("spec.peft.method", "qlora loads the base in 4 bits and needs GPUs; set spec.resources.gpusPerNode >= 1 or use lora")
    if spec.peft.method == "qlora" and spec.deepspeed.zero_stage == 3:
        yield Problem("spec.deepspeed.zeroStage", "qlora cannot shard 4-bit weights with ZeRO-3; use zeroStage 0-2")


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
def _adapters_settings(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.peft.layers and spec.peft.method not in ADAPTER_METHODS:
        yield Problem("spec.peft.layers", f"restricting to layers applies to {', '.join(sorted(ADAPTER_METHODS))}, not {spec.peft.method!r}")
    if spec.output.merge_adapters and spec.peft.method not in {"lora", "dora", "ia3"}:
        yield Problem("spec.output.mergeAdapters", f"only lora, dora and ia3 adapters can be merged, not {spec.peft.method!r}")


@rule
def _target_modules_compile(spec: FineTuneJobSpec) -> Iterator[Problem]:
    for i, entry in enumerate(spec.peft.target_modules or []):
        if is_module_regex(entry):
            try:
                re.compile(entry)
            except re.error as exc:
                yield Problem(f"spec.peft.targetModules[{i}]", f"{entry!r} is not a valid regular expression ({exc}); "
                              "give a module name (q_proj) or a Python regular expression matched against the whole module name")
    regexes = [e for e in spec.peft.target_modules or [] if is_module_regex(e)]
    if regexes and spec.peft.layers and spec.peft.method in {"lora", "dora", "qlora"}:
        yield Problem("spec.peft.layers", "cannot be combined with a regular expression in targetModules (PEFT takes "
                      f"'{regexes[0]}' as a whole-name expression and no layer list with it); put the layers in the "
                      "expression instead, e.g. '.*\\.(0|1)\\.self_attn\\.q_proj'")


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
def _fp8_limits(spec: FineTuneJobSpec) -> Iterator[Problem]:
    """fp8 is torchao's float8 training of full-weight linear layers on GPUs (kubetune.trainer.float8)."""
    if spec.training.precision != "fp8":
        return
    if spec.resources.gpus_per_node < 1:
        yield Problem("spec.training.precision", "fp8 needs GPUs with FP8 tensor cores (compute capability >= 8.9, e.g. H100); "
                      "set spec.resources.gpusPerNode >= 1, or use auto, bf16 or fp32 on CPU")
    if spec.peft.method != "full":
        # torchao's float8 linear computes the weight gradient even of a frozen weight, so an adapter
        # over a frozen base would do more matrix work, not less (and qlora's base is 4-bit).
        yield Problem("spec.training.precision", f"fp8 is for full fine-tuning (peft.method full), not {spec.peft.method!r}: "
                      "the frozen base of a parameter-efficient method gains nothing from float8; use bf16 with it")
    if spec.deepspeed.zero_stage == 3:
        yield Problem("spec.deepspeed.zeroStage", "fp8 runs with ZeRO stages 0-2; ZeRO-3's gathered weights do not go through "
                      "torchao's float8 linear layers; use zeroStage 2 or precision bf16")


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
def _prompt_learning_limits(spec: FineTuneJobSpec) -> Iterator[Problem]:
    method = spec.peft.method
    if method not in PROMPT_LEARNING_METHODS:
        return
    if spec.head in {"token-classification", "question-answering"}:
        yield Problem(
            "spec.peft.method",
            f"{method} adds virtual tokens that shift per-token outputs; it cannot be combined with a {spec.head} head. Use lora",
        )
    if spec.training.packing:
        yield Problem("spec.training.packing", f"{method} prepends virtual tokens to each sequence; packing is not possible")
    if spec.peft.init_text and method != "prompt":
        yield Problem("spec.peft.initText", "text initialisation is for method 'prompt' only")


@rule
def _packing_is_causal_lm(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.training.packing and spec.head != "causal-lm":
        yield Problem("spec.training.packing", f"packing is for causal LM training; the {spec.head} head needs one example per sequence")


# --- what techniques declare they need ----------------------------------------------------------

CAPABILITY_RULES: list[Rule] = []


def _capability_rule(fn: Rule) -> Rule:
    CAPABILITY_RULES.append(fn)
    return fn


@_capability_rule
def _no_packing(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if not spec.training.packing:
        return
    for _, need in requirements(spec):
        if need.capability in {Capability.NEEDS_LOGITS, Capability.NEEDS_SEQUENCES}:
            yield Problem("spec.training.packing", f"{need.reason}; turn packing off")


@_capability_rule
def _eval_data(spec: FineTuneJobSpec) -> Iterator[Problem]:
    ev = spec.data.eval
    if ev is not None and (ev.holdout_fraction or ev.datasets):
        return
    for d, need in requirements(spec):
        if need.capability is Capability.NEEDS_EVAL_DATA:
            yield Problem(d.where(need.path), f"{need.reason} needs evaluation data; set spec.data.eval.holdoutFraction or spec.data.eval.datasets")


@_capability_rule
def _preference_data(spec: FineTuneJobSpec) -> Iterator[Problem]:
    preference = [i for i, d in enumerate(spec.data.datasets) if d.format == "preference"]
    needing = [(d, need) for d, need in requirements(spec) if need.capability is Capability.NEEDS_PREFERENCE_DATA]
    for d, need in needing:
        if len(preference) != len(spec.data.datasets):
            yield Problem(d.where(need.path), f"{need.reason} needs every training dataset in format 'preference' (prompt, chosen, rejected)")
    if preference and not needing:
        users = [d for d in registered().values() if Capability.NEEDS_PREFERENCE_DATA in d.capabilities]
        yield Problem(
            f"spec.data.datasets[{preference[0]}].format",
            "preference data is only used by "
            + " or ".join(d.where(d.switches.get(Capability.NEEDS_PREFERENCE_DATA, "")) for d in users)
            + "; set it, or use another format",
        )


@_capability_rule
def _full_weights(spec: FineTuneJobSpec) -> Iterator[Problem]:
    if spec.deepspeed.zero_stage != 3:
        return
    for d, need in requirements(spec):
        if need.capability is Capability.READS_FULL_WEIGHTS:
            yield Problem(d.where(need.path), f"{need.reason}, which ZeRO-3 shards across processes; use deepspeed.zeroStage 0-2")
