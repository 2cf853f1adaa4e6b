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

``kubetune validate --preview`` shows the rendered examples (:mod:`kubetune.trainer.previewing`,
which runs this plugin's ``transform_examples`` as training does).
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.encoding import dataset_templates, render_template
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
