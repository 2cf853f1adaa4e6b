"""Technique 4 · prompt engineering: a prompt template applied to every example, and its preview.

The template (``techniques.promptEngineering.template``, or a dataset's own ``promptTemplate``) is
rendered with each example's fields — Jinja (``{{ text }}``) or Python format strings
(``{text}``), as ``templateFormat`` says — and becomes the model's input:

=====================  ======================================================================
format                 what the rendered template replaces
=====================  ======================================================================
instruction, preference  the prompt (the encoder renders ``_template``; prompt tokens stay masked)
text, classification   ``text``
seq2seq                ``source`` (``responseTemplate`` renders ``target``)
question-answering     ``question`` (the context is left alone so answer spans stay put)
chat, token-classif.   unchanged: the tokenizer's chat template / word lists decide
=====================  ======================================================================

``responseTemplate`` renders the response (instruction) or target (seq2seq). The example's
original fields are kept under ``_raw`` so that template paraphrase (augmentation) can re-render
from them, with ``_template_format``. Prompt, prefix and P-tuning are ``peft.method`` values built by
``kubetune.trainer.models`` (virtual tokens, optionally initialised from ``peft.initText``).

:func:`preview` renders the first examples exactly as training will (after every enabled
technique's ``transform_examples``) without loading a model; ``kubetune validate --preview`` and
tests call it.
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.encoding import render_template
from kubetune.trainer.techniques.base import Technique, TechniqueContext

#: Per format: the field the rendered prompt template replaces (None: the encoder renders it).
_PROMPT_TARGET = {
    "instruction": None,
    "preference": None,
    "text": "text",
    "classification": "text",
    "seq2seq": "source",
    "question-answering": "question",
}
_RESPONSE_TARGET = {"instruction": "response", "seq2seq": "target"}


def dataset_templates(spec: Any) -> dict[str, str]:
    """Dataset name → its own promptTemplate (names as the encoder gives them)."""
    return {(ds.name or f"dataset-{i}"): ds.prompt_template for i, ds in enumerate(spec.data.datasets) if ds.prompt_template}


def variables(example: dict[str, Any]) -> dict[str, Any]:
    """The fields a template may use: the raw fields (before templating), bookkeeping excluded."""
    raw = example.get("_raw")
    if raw is not None:
        return dict(raw)
    return {k: v for k, v in example.items() if not k.startswith("_")}


def apply_template(
    example: dict[str, Any], template: str | None, response_template: str | None, template_format: str
) -> dict[str, Any]:
    """``example`` with its prompt (and response) rendered from the templates (see the module doc)."""
    fmt = example.get("_format", "")
    if fmt not in _PROMPT_TARGET:
        return example
    out = dict(example)
    values = variables(example)
    out["_raw"] = values
    out["_template_format"] = template_format  # how to re-render it (template paraphrase)
    where = f"{example.get('_origin', '?')}: row {example.get('_row', '?')}"
    if template:
        key = _PROMPT_TARGET[fmt]
        if key is None:
            out["_template"] = template
        else:
            out[key] = render_template(template, values, template_format, where)
            out["_prompt_template"] = template  # augmentation re-renders with it after word edits
    if response_template and fmt in _RESPONSE_TARGET:
        out[_RESPONSE_TARGET[fmt]] = render_template(response_template, values, template_format, where)
    return out


class PromptEngineering(Technique):
    """Renders the prompt template into every example of every split."""

    name = "promptEngineering"

    def template_for(self, example: dict[str, Any]) -> str | None:
        return dataset_templates(self.spec).get(example.get("_dataset", "")) or self.config.template

    def transform_examples(self, ctx: TechniqueContext, examples: list[dict], split: str) -> list[dict]:
        cfg = self.config
        return [apply_template(e, self.template_for(e), cfg.response_template, cfg.template_format) for e in examples]

    def describe(self, ctx: TechniqueContext) -> str | None:
        own = dataset_templates(self.spec)
        return f"templates rendered into every example ({'template' if self.config.template else 'no main template'}, {len(own)} per-dataset)"


def preview(spec: Any, base_dir: Any, limit: int = 3) -> list[str]:
    """The first ``limit`` training examples as the model will read them, as text.

    Runs ``load_examples`` and every enabled technique's ``transform_examples`` (templates, task
    prefixes, control codes), then renders what the encoder would tokenise: the prompt and the
    response for instruction/preference data, else the input fields and the target. No model or
    tokenizer is loaded.
    """
    from kubetune.trainer.encoding import DEFAULT_INSTRUCTION_TEMPLATE, load_examples
    from kubetune.trainer.techniques.base import enabled_techniques

    sets = load_examples(spec, base_dir)
    examples = sets.train[:limit]
    ctx = TechniqueContext(spec=spec, base_dir=base_dir)
    for technique in enabled_techniques(spec):
        # Split "preview": a plugin that acts on tokens or order, or needs the tokenizer, leaves the
        # examples alone (the contract in kubetune.trainer.techniques.base).
        technique.on_setup(ctx)
        examples = technique.transform_examples(ctx, examples, "preview")
    pe = spec.techniques.prompt_engineering
    template_format = pe.template_format if pe is not None else "jinja"
    own = dataset_templates(spec)
    out = []
    for e in examples:
        fmt = e["_format"]
        if fmt in {"instruction", "preference"}:
            template = e.get("_template") or own.get(e["_dataset"])
            values = {k: v for k, v in e.items() if not k.startswith("_")}
            if fmt == "preference" and not template:
                prompt = e["prompt"]
            else:
                prompt = render_template(template or DEFAULT_INSTRUCTION_TEMPLATE, values, template_format if template else "jinja")
            target = e["response"] if fmt == "instruction" else f"chosen: {e['chosen']} | rejected: {e['rejected']}"
            out.append(f"{prompt}{target}")
        elif fmt == "chat":
            out.append("\n".join(f"{m['role']}: {m['content']}" for m in e["messages"]))
        elif fmt == "token-classification":
            out.append(" ".join(f"{t}/{g}" for t, g in zip(e["tokens"], e["tags"])))
        else:
            shown = {"text": ["text"], "classification": ["text", "label"], "seq2seq": ["source", "target"],
                     "question-answering": ["question", "context", "answer"]}[fmt]
            out.append("\n".join(f"{k}: {e[k]}" for k in shown))
    return out
