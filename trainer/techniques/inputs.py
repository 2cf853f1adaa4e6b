"""Which fields of an example are the model's *input*, per data format.

Several techniques change what the model reads but must leave what it learns to predict alone:
task prefixes (multi-task), control codes (controlled generation) and the label-preserving
augmentations all touch exactly these fields. The example dicts are the ones
``kubetune.trainer.encoding.load_examples`` builds (canonical keys per format). Used by the plugin
modules of this package; not a plugin itself.
"""

from __future__ import annotations

from typing import Any

#: Per format: the string fields that are model input (targets and labels are never listed).
INPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "instruction": ("prompt", "input"),
    "classification": ("text",),
    "seq2seq": ("source",),
    "preference": ("prompt",),
    "question-answering": ("question",),
    "chat": (),  # the user turns, see user_messages()
    "token-classification": (),  # a word list with one tag per word, see augmentation
}


def leading_field(example: dict[str, Any]) -> str | None:
    """The field a prefix goes in front of (the first input field), or None (chat, NER)."""
    fields = INPUT_FIELDS.get(example.get("_format", ""), ())
    return fields[0] if fields else None


def prepend(example: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A copy of ``example`` whose input starts with ``prefix`` (task prefix, control code).

    Chat examples get it in front of the first user turn. Token-classification examples are
    returned unchanged: extra leading words would need tags, and no tag is neutral for every label
    set.
    """
    out = dict(example)
    out["_prefix"] = prefix + example.get("_prefix", "")  # re-applied when a paraphrase re-renders
    fmt = example.get("_format")
    if fmt == "chat":
        messages = [dict(m) for m in example["messages"]]
        for m in messages:
            if m["role"] == "user":
                m["content"] = prefix + m["content"]
                break
        else:
            messages.insert(0, {"role": "user", "content": prefix.strip()})
        out["messages"] = messages
        return out
    key = leading_field(example)
    if key is None:
        return out
    out[key] = prefix + str(example.get(key) or "")
    return out
