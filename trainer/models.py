"""Building the model to train: tokenizer, pretrained weights under the task head, PEFT adapters.

Called once per run by the training loop (``kubetune.trainer.training``) before the technique hook
``prepare_model``; ``load_tokenizer`` and ``load_pretrained`` are also what plugins use to load a
teacher. The head comes from ``spec.head`` (``model.head`` or ``techniques.task.type``):

==========================  =====================================================  ==============
head                        transformers class                                     PEFT task type
==========================  =====================================================  ==============
causal-lm                   AutoModelForCausalLM                                   CAUSAL_LM
sequence-classification     AutoModelForSequenceClassification (num_labels)        SEQ_CLS
token-classification        AutoModelForTokenClassification (num_labels)           TOKEN_CLS
seq2seq                     AutoModelForSeq2SeqLM                                  SEQ_2_SEQ_LM
question-answering          AutoModelForQuestionAnswering                          QUESTION_ANS
==========================  =====================================================  ==============

Weights load in float32 unless ``model.dtype`` says otherwise: DeepSpeed keeps fp32 master
weights and casts for bf16/fp16 itself. ``trust_remote_code`` is passed only when the spec turns it
on. ``peft.method`` wraps the model: lora, dora (LoRA with weight decomposition), ia3, prefix,
prompt (optionally initialised from ``peft.initText``), p-tuning, and qlora (4-bit base via
bitsandbytes; a CUDA GPU is required and its absence is a clear :class:`ModelError`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from kubetune.trainer.sources import check_model_folder, resolve_model_dir

_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "question-answering": "AutoModelForQuestionAnswering",
}
_TASK_TYPES = {
    "causal-lm": "CAUSAL_LM",
    "sequence-classification": "SEQ_CLS",
    "token-classification": "TOKEN_CLS",
    "seq2seq": "SEQ_2_SEQ_LM",
    "question-answering": "QUESTION_ANS",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(RuntimeError):
    """The model cannot be built as the spec asks; the message names the field."""


def model_dir(spec: Any, base_dir: Any) -> Path:
    return resolve_model_dir(spec.model.source, base_dir, "spec.model.source", spec.model.revision)


def load_tokenizer(spec: Any, base_dir: Any) -> tuple[Any, Path]:
    """The tokenizer (from ``model.tokenizer`` or the model's folder) and the folder it came from."""
    from transformers import AutoTokenizer

    if spec.model.tokenizer:
        folder = resolve_model_dir(spec.model.tokenizer, base_dir, "spec.model.tokenizer")
    else:
        folder = model_dir(spec, base_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=spec.model.trust_remote_code)
    except Exception as exc:
        if not spec.model.tokenizer:  # a folder of data, a weights file: say that, not the tokenizer loader's words
            check_model_folder(folder, spec.model.source)
        raise ModelError(f"spec.model.{'tokenizer' if spec.model.tokenizer else 'source'}: no usable tokenizer in {folder} ({type(exc).__name__}: {exc})") from exc
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often have no pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer, folder


def load_pretrained(
    source_dir: Path,
    head: str,
    *,
    labels: list[str] | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    where: str = "spec.model.source",
) -> Any:
    """A pretrained model under ``head`` (new head weights initialise when the checkpoint has none)."""
    import transformers

    cls = getattr(transformers, _AUTO_CLASSES[head])
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    kwargs["dtype"] = _DTYPES.get(dtype, torch.float32)
    if labels is not None:
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,
        )
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        return cls.from_pretrained(str(source_dir), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{where}: cannot load a {head} model from {source_dir} ({type(exc).__name__}: {exc})") from exc


def build_model(spec: Any, base_dir: Any, tokenizer: Any, tokenizer_dir: Path, labels: list[str] | None) -> Any:
    """The model to train: pretrained weights, task head, PEFT wrapping, pad token, packing."""
    method = spec.peft.method
    quantization = None
    if method == "qlora":
        quantization = _qlora_config()
    model = load_pretrained(
        check_model_folder(model_dir(spec, base_dir), spec.model.source),
        spec.head,
        labels=labels,
        dtype=spec.model.dtype,
        trust_remote_code=spec.model.trust_remote_code,
        quantization_config=quantization,
    )
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if spec.training.packing:
        from kubetune.trainer.attention import enable_packed_attention

        enable_packed_attention(model)
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.training.gradient_checkpointing)
    if method != "full":
        model = wrap_peft(spec, model, tokenizer_dir)
    return model


def _qlora_config() -> Any:
    if not torch.cuda.is_available():
        raise ModelError(
            "spec.peft.method: qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU, "
            "and this machine has none; use method lora (same adapters, full-precision base) or run on a GPU node"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelError("spec.peft.method: qlora needs the bitsandbytes package in the trainer image (pip install bitsandbytes)") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )


def peft_targets(entries: list[str] | None) -> list[str] | str | None:
    """``peft.targetModules`` as PEFT takes it. PEFT matches a list by name or '.<name>' suffix and only a
    single string as a regular expression (``re.fullmatch`` on the module name), so a list that holds any
    expression becomes one alternation, each name in it written as PEFT would match it."""
    from kubetune.api.peft import is_module_regex

    if not entries or not any(is_module_regex(e) for e in entries):
        return entries
    return "|".join(f"(?:{e})" if is_module_regex(e) else f"(?:.*\\.)?{re.escape(e)}" for e in entries)


def peft_config(spec: Any, tokenizer_dir: Path) -> Any:
    """The PEFT config for ``spec.peft`` (method other than full)."""
    import peft

    p = spec.peft
    task_type = _TASK_TYPES[spec.head]
    if p.method in {"lora", "dora", "qlora"}:
        return peft.LoraConfig(
            task_type=task_type,
            r=p.r,
            lora_alpha=p.alpha,
            lora_dropout=p.dropout,
            target_modules=peft_targets(p.target_modules) or "all-linear",
            layers_to_transform=p.layers,
            use_dora=p.method == "dora",
        )
    if p.method == "ia3":
        return peft.IA3Config(
            task_type=task_type,
            target_modules=peft_targets(p.target_modules),
            feedforward_modules=[] if p.target_modules else None,
        )
    if p.method == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=p.num_virtual_tokens)
    if p.method == "prompt":
        if p.init_text:
            return peft.PromptTuningConfig(
                task_type=task_type,
                num_virtual_tokens=p.num_virtual_tokens,
                prompt_tuning_init=peft.PromptTuningInit.TEXT,
                prompt_tuning_init_text=p.init_text,
                tokenizer_name_or_path=str(tokenizer_dir),
            )
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=p.num_virtual_tokens)
    if p.method == "p-tuning":
        return peft.PromptEncoderConfig(
            task_type=task_type, num_virtual_tokens=p.num_virtual_tokens, encoder_hidden_size=p.encoder_hidden_size or 128
        )
    raise ModelError(f"spec.peft.method: unknown method {p.method!r}")  # pragma: no cover - the API refuses it


def wrap_peft(spec: Any, model: Any, tokenizer_dir: Path) -> Any:
    import peft

    if spec.peft.method == "prefix" and not _accepts_prefix(model, spec.head):
        raise ModelError(
            f"spec.peft.method: prefix tuning feeds learned key/values through past_key_values, which "
            f"{type(model).__name__} does not accept; use prompt, p-tuning or lora for this model"
        )
    try:
        wrapped = peft.get_peft_model(model, peft_config(spec, tokenizer_dir))
    except ValueError as exc:
        raise ModelError(f"spec.peft: {spec.peft.method} cannot be applied to {type(model).__name__} ({exc})") from exc
    if spec.peft.method == "ia3" and spec.peft.layers:
        # IA3Config has no layers_to_transform: vectors outside the chosen blocks stay frozen at
        # their initial value (ones), which leaves those blocks unchanged.
        _freeze_ia3_outside(wrapped, set(spec.peft.layers))
    return wrapped


def _accepts_prefix(model: Any, head: str) -> bool:
    """Whether PEFT's prefix tuning can feed this model its learned key/values.

    For causal-lm and seq2seq PEFT passes ``past_key_values`` as a keyword (transformers 5 models
    take it through ``**kwargs``). For the classification, token-classification and QA heads it
    looks for a ``past_key_values`` parameter by name on the model's or its backbone's forward,
    and fails at the first forward pass without one (BERT-style encoders).
    """
    import inspect

    if head in {"causal-lm", "seq2seq"}:
        return True
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)
    return any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, backbone))


def _freeze_ia3_outside(model: Any, layers: set[int]) -> None:
    import re

    index = re.compile(r"\.(\d+)\.")
    for name, param in model.named_parameters():
        if "ia3_l" not in name:
            continue
        found = index.search(name)
        if found is None or int(found.group(1)) not in layers:
            param.requires_grad_(False)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
