"""What ``kubetune validate --preview N`` shows: the first training examples as the model will read them.

Runs :func:`kubetune.trainer.encoding.load_examples` and every enabled technique's
``transform_examples`` with split ``"preview"`` (templates, task prefixes, control codes; a plugin
that needs the tokenizer or acts on tokens leaves the examples alone), then renders what the
encoder would tokenise: the prompt and the response for instruction/preference data, else the
input fields and the target. No model or tokenizer is loaded. Called by the CLI (``validate``,
``render --preview``) and tests.
"""

from __future__ import annotations

from typing import Any

from kubetune.trainer.encoding import dataset_templates, instruction_prompt, load_examples
from kubetune.trainer.techniques.base import TechniqueContext, enabled_techniques

_SHOWN = {"text": ["text"], "classification": ["text", "label"], "seq2seq": ["source", "target"],
          "question-answering": ["question", "context", "answer"]}


def preview(spec: Any, base_dir: Any, limit: int = 3) -> list[str]:
    """The first ``limit`` training examples as the model will read them, as text."""
    examples = load_examples(spec, base_dir).train[:limit]
    ctx = TechniqueContext(spec=spec, base_dir=base_dir)
    for technique in enabled_techniques(spec):
        technique.on_setup(ctx)
        examples = technique.transform_examples(ctx, examples, "preview")
    templates = dataset_templates(spec)
    out = []
    for e in examples:
        fmt = e["_format"]
        if fmt in {"instruction", "preference"}:
            templated = e.get("_template") or templates.get(e.get("_dataset", ""))
            prompt = e["prompt"] if fmt == "preference" and not templated else instruction_prompt(e, templates)
            target = e["response"] if fmt == "instruction" else f"chosen: {e['chosen']} | rejected: {e['rejected']}"
            out.append(f"{prompt}{target}")
        elif fmt == "chat":
            out.append("\n".join(f"{m['role']}: {m['content']}" for m in e["messages"]))
        elif fmt == "token-classification":
            out.append(" ".join(f"{t}/{g}" for t, g in zip(e["tokens"], e["tags"])))
        else:
            out.append("\n".join(f"{k}: {e[k]}" for k in _SHOWN[fmt]))
    return out
