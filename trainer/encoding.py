"""From raw rows to examples to token ids: the per-format data pipeline of the trainer.

Two stages, with the technique hook ``transform_examples`` between them:

1. :func:`load_examples` reads every dataset of the spec (``kubetune.trainer.reading``) and turns
   each row into an *example*: the row's own columns plus the format's canonical keys filled from
   ``dataset.fields`` (``text``, ``prompt``/``input``/``response``, ``messages``, ``label``,
   ``tokens``/``tags``, ``source``/``target``, ``prompt``/``chosen``/``rejected``,
   ``question``/``context``/``answer``), checked for presence and type. Bookkeeping keys start with
   ``_``: ``_dataset``, ``_task``, ``_format``, ``_origin``, ``_row``, and optionally ``_template``
   (a technique may set it to re-template an example). A bad row raises ``DataError`` naming the
   file, the row and the field.
2. :class:`Encoder` turns one example into *features*: ``input_ids`` and ``labels`` (plus
   ``token_type_ids``, ``start_positions``/``end_positions`` for QA, ``chosen_*``/``rejected_*``
   for preference data), following the head:

   =========================  ==================================================================
   head                       features
   =========================  ==================================================================
   causal-lm                  text: every token is a target; instruction/chat: prompt tokens are
                              ``-100`` when ``techniques.task.lossOnResponseOnly`` (default on)
   seq2seq                    encoder ``input_ids`` from source (or the rendered instruction),
                              decoder ``labels`` from target (or response)
   sequence-classification    ``labels`` is the class index
   token-classification       one label per word on its first sub-token, ``-100`` elsewhere
   question-answering         ``start_positions``/``end_positions`` of the answer span (0 = not
                              in the window)
   =========================  ==================================================================

Instruction prompts are rendered from a template: ``example["_template"]``, else
``dataset.promptTemplate``, else :data:`DEFAULT_INSTRUCTION_TEMPLATE`; the syntax is the example's
``_template_format`` (set by the technique that templated it, prompt engineering; jinja unless set). :func:`render_template` is
public so that technique plugins render the same way.

Called by ``kubetune.trainer.training`` (setup) and by technique plugins through
``ctx.encode``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kubetune.trainer.reading import DataError, Row, read_rows

IGNORE_INDEX = -100

DEFAULT_INSTRUCTION_TEMPLATE = (
    "### Instruction:\n{{ prompt }}\n{% if input %}\n### Input:\n{{ input }}\n{% endif %}\n### Response:\n"
)

#: The canonical keys of each format: (key, required, expected type, fallback column names).
_FORMAT_FIELDS: dict[str, list[tuple[str, bool, type | tuple[type, ...], tuple[str, ...]]]] = {
    "text": [("text", True, str, ())],
    "instruction": [
        ("prompt", True, str, ("instruction",)),
        ("input", False, str, ()),
        ("response", True, str, ("output",)),
    ],
    "chat": [("messages", True, list, ())],
    "classification": [("text", True, str, ()), ("label", True, (str, int), ())],
    "token-classification": [("tokens", True, list, ()), ("tags", True, list, ())],
    "seq2seq": [("source", True, str, ()), ("target", True, str, ())],
    "preference": [("prompt", True, str, ()), ("chosen", True, str, ()), ("rejected", True, str, ())],
    "question-answering": [("question", True, str, ()), ("context", True, str, ()), ("answer", True, (str, dict), ())],
}


def dataset_templates(spec: Any) -> dict[str, str]:
    """Dataset name → its own ``promptTemplate`` (names as :func:`load_examples` gives them)."""
    return {(ds.name or f"dataset-{i}"): ds.prompt_template for i, ds in enumerate(spec.data.datasets) if ds.prompt_template}


def instruction_prompt(example: dict[str, Any], templates: dict[str, str]) -> str:
    """The rendered instruction prompt of an example: its ``_template`` (set by a technique), else its
    dataset's template, else the default; in the format the technique marked (``_template_format``)."""
    template = example.get("_template") or templates.get(example.get("_dataset", "")) or None
    template_format = example.get("_template_format", "jinja") if template else "jinja"
    variables = {k: v for k, v in example.items() if not k.startswith("_")}
    return render_template(template or DEFAULT_INSTRUCTION_TEMPLATE, variables, template_format, _where(example))


def render_template(template: str, variables: dict[str, Any], template_format: str = "jinja", where: str = "template") -> str:
    """Render a prompt template with an example's fields; a missing variable names the field."""
    if template_format == "format":
        try:
            return template.format(**variables)
        except KeyError as exc:
            raise DataError(f"{where}: the template uses {{{exc.args[0]}}}, which this example does not have") from None
    import jinja2

    env = _jinja_env()
    try:
        return env.from_string(template).render(**variables)
    except jinja2.UndefinedError as exc:
        raise DataError(f"{where}: the template uses a field this example does not have ({exc.message})") from None
    except jinja2.TemplateSyntaxError as exc:
        raise DataError(f"{where}: invalid template ({exc.message}, line {exc.lineno})") from None


_ENV: Any = None


def _jinja_env() -> Any:
    global _ENV
    if _ENV is None:
        import jinja2

        _ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return _ENV


# --- stage 1: rows to examples -------------------------------------------------------------------


def dataset_name(ds: Any, index: int) -> str:
    return ds.name or f"dataset-{index}"


def canonical_example(row: Row, ds: Any, name: str, task: str) -> dict[str, Any]:
    """One row as an example of ``ds.format`` (see the module doc); raises DataError naming the row."""
    example = dict(row.values)
    mapping = ds.fields
    for key, required, kind, fallbacks in _FORMAT_FIELDS[ds.format]:
        column = getattr(mapping, key, None) if mapping is not None else None
        candidates = [column] if column else [key, *fallbacks]
        present = next((c for c in candidates if c in row.values and row.values[c] is not None), None)
        if present is None:
            if required:
                raise DataError(
                    f"{row.where(candidates[0])}: missing (format {ds.format!r} needs it"
                    + ("; map another column with fields." + key if not column else "")
                    + f"; the row has {sorted(row.values)})"
                )
            example[key] = ""
            continue
        value = row.values[present]
        if not isinstance(value, kind) or isinstance(value, bool):
            allowed = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise DataError(f"{row.where(present)}: must be {allowed}, got {type(value).__name__} {str(value)[:40]!r}")
        example[key] = value
    _check_structure(example, row, ds.format)
    example.update(_dataset=name, _task=task, _format=ds.format, _origin=row.origin, _row=row.number)
    return example


def _check_structure(example: dict[str, Any], row: Row, fmt: str) -> None:
    if fmt == "chat":
        messages = example["messages"]
        if not messages:
            raise DataError(f"{row.where('messages')}: must hold at least one message")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
                raise DataError(f"{row.where('messages')}: item {i} must be {{role: str, content: str}}, got {str(msg)[:60]!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{row.where('messages')}: no message with role 'assistant' to learn from")
    elif fmt == "token-classification":
        tokens, tags = example["tokens"], example["tags"]
        if len(tokens) != len(tags):
            raise DataError(f"{row.where('tags')}: {len(tags)} tags for {len(tokens)} tokens; there must be one tag per token")
        if not tokens:
            raise DataError(f"{row.where('tokens')}: must not be empty")
        if not all(isinstance(t, str) for t in tokens):
            raise DataError(f"{row.where('tokens')}: must be a list of strings")
    elif fmt == "question-answering":
        answer = example["answer"]
        if isinstance(answer, dict):  # SQuAD style {"text": [...], "answer_start": [...]}
            texts, starts = answer.get("text"), answer.get("answer_start")
            text = texts[0] if isinstance(texts, list) and texts else texts
            start = starts[0] if isinstance(starts, list) and starts else starts
            if not isinstance(text, str):
                raise DataError(f"{row.where('answer')}: a mapping answer needs text (SQuAD style), got {str(answer)[:60]!r}")
            example["answer"] = text
            example.setdefault("answer_start", start)
        start = example.get("answer_start")
        context, text = example["context"], example["answer"]
        if not isinstance(start, int) or context[start : start + len(text)] != text:
            start = context.find(text)
        if start < 0:
            raise DataError(f"{row.where('answer')}: {text[:40]!r} does not occur in the context")
        example["answer_start"] = start


@dataclass
class ExampleSets:
    """The examples of a run: training, evaluation (possibly empty), and the label names."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: list[str] | None = None
    tasks: list[str] = field(default_factory=list)


def _read_examples(ds: Any, index: int, base_dir: Any, where: str) -> list[dict[str, Any]]:
    name = dataset_name(ds, index)
    task = ds.task or name
    rows = read_rows(ds.source, base_dir=base_dir, where=f"{where}.source", split=ds.split, max_samples=ds.max_samples)
    return [canonical_example(row, ds, name, task) for row in rows]


def load_examples(spec: Any, base_dir: str | os.PathLike | None) -> ExampleSets:
    """Read and check every dataset of ``spec``; split off the eval holdout (seeded)."""
    import random

    train: list[dict[str, Any]] = []
    evaluation: list[dict[str, Any]] = []
    ev = spec.data.eval
    tasks: list[str] = []
    for i, ds in enumerate(spec.data.datasets):
        examples = _read_examples(ds, i, base_dir, f"spec.data.datasets[{i}]")
        tasks.append(examples[0]["_task"])
        if ev is not None and ev.holdout_fraction:
            order = list(range(len(examples)))
            random.Random(spec.training.seed + i).shuffle(order)
            n_eval = max(1, round(len(examples) * ev.holdout_fraction)) if len(examples) > 1 else 0
            held = set(order[:n_eval])
            evaluation.extend(e for j, e in enumerate(examples) if j in held)
            examples = [e for j, e in enumerate(examples) if j not in held]
        train.extend(examples)
    if ev is not None and ev.datasets:
        for i, ds in enumerate(ev.datasets):
            evaluation.extend(_read_examples(ds, i, base_dir, f"spec.data.eval.datasets[{i}]"))
    if ev is not None and ev.max_samples:
        evaluation = evaluation[: ev.max_samples]
    if not train:
        raise DataError("spec.data: no training examples are left after the evaluation holdout")
    return ExampleSets(train, evaluation, label_names(spec, train + evaluation), list(dict.fromkeys(tasks)))


def label_names(spec: Any, examples: list[dict[str, Any]]) -> list[str] | None:
    """Class (or tag) names: ``techniques.task.labels``, else what the data uses (sorted)."""
    head = spec.head
    if head not in {"sequence-classification", "token-classification"}:
        return None
    task = spec.techniques.task
    if task is not None and task.labels:
        return list(task.labels)
    key = "label" if head == "sequence-classification" else "tags"
    seen: set[Any] = set()
    for e in examples:
        seen.update(e[key] if key == "tags" else [e[key]])
    if all(isinstance(v, int) and not isinstance(v, bool) for v in seen):
        return [str(i) for i in range(max(seen) + 1)]
    return sorted(str(v) for v in seen)


# --- stage 2: examples to features ---------------------------------------------------------------


class Encoder:
    """Tokenises examples for a head (see the module doc). ``encoder(example)`` → features dict."""

    def __init__(self, spec: Any, tokenizer: Any, labels: list[str] | None = None) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.head = spec.head
        self.max_length = spec.training.max_seq_length
        task = spec.techniques.task
        self.response_only = task.loss_on_response_only if task is not None else True
        self.max_target_length = (task.max_target_length if task is not None else None) or self.max_length
        self.templates = dataset_templates(spec)
        self.labels = labels
        self.label_ids = {name: i for i, name in enumerate(labels or [])}

    # -- helpers
    def _ids(self, text: str, limit: int | None = None, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special, truncation=limit is not None, max_length=limit)["input_ids"])

    def _eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [eos] if eos is not None else []

    def _label_id(self, value: Any, example: dict[str, Any], key: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(self.label_ids):
                return value
            raise DataError(f"{_where(example, key)}: label index {value} is out of range; there are {len(self.label_ids)} labels {list(self.label_ids)}")
        if str(value) not in self.label_ids:
            raise DataError(f"{_where(example, key)}: label {value!r} is not one of {list(self.label_ids)} (techniques.task.labels)")
        return self.label_ids[str(value)]

    def prompt_text(self, example: dict[str, Any]) -> str:
        """The rendered instruction prompt of an example (see the module doc)."""
        return instruction_prompt(example, self.templates)

    # -- the entry point
    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        fmt = example["_format"]
        head = self.head
        if fmt == "preference":
            features = self._preference(example)
        elif head == "seq2seq":
            features = self._seq2seq(example)
        elif head == "causal-lm":
            features = self._causal(example)
        elif head == "sequence-classification":
            features = self._classification(example)
        elif head == "token-classification":
            features = self._token_classification(example)
        elif head == "question-answering":
            features = self._question_answering(example)
        else:  # pragma: no cover - the API admits no other head
            raise ValueError(f"unknown head {head!r}")
        return features

    def _causal(self, example: dict[str, Any]) -> dict[str, Any]:
        fmt = example["_format"]
        if fmt == "text":
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None and self.tokenizer.bos_token_id != self.tokenizer.eos_token_id else []
            ids = (bos + self._ids(example["text"]) + self._eos())[: self.max_length]
            return {"input_ids": ids, "labels": list(ids)}
        if fmt == "instruction":
            prompt = self._ids(self.prompt_text(example))
            response = self._ids(example["response"]) + self._eos()
            return self._join(prompt, response, example)
        if fmt == "chat":
            return self._chat(example)
        raise DataError(f"{_where(example)}: format {fmt!r} does not fit the causal-lm head")

    def _join(self, prompt: list[int], response: list[int], example: dict[str, Any]) -> dict[str, Any]:
        ids = (prompt + response)[: self.max_length]
        masked = [IGNORE_INDEX] * len(prompt) if self.response_only else list(prompt)
        labels = (masked + response)[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{_where(example)}: the prompt fills all {self.max_length} tokens (training.maxSeqLength); nothing is left to learn from")
        return {"input_ids": ids, "labels": labels}

    def _chat(self, example: dict[str, Any]) -> dict[str, Any]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise DataError(f"{_where(example, 'messages')}: format 'chat' needs a tokenizer with a chat template; this tokenizer has none (use format instruction)")
        messages = example["messages"]
        ids: list[int] = []
        labels: list[int] = []
        done = ""
        for i, msg in enumerate(messages):
            if msg["role"] == "assistant":
                before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            else:
                before = None
            upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            if before is not None:
                head_ids = self._ids(before[len(done) :]) if before.startswith(done) else []
                body_ids = self._ids(upto[len(before) :]) if upto.startswith(before) else self._ids(upto[len(done) :])
                ids += head_ids + body_ids
                labels += ([IGNORE_INDEX] * len(head_ids) if self.response_only else head_ids) + body_ids
            else:
                piece = self._ids(upto[len(done) :]) if upto.startswith(done) else self._ids(upto)
                ids += piece
                labels += [IGNORE_INDEX] * len(piece) if self.response_only else piece
            done = upto
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{_where(example, 'messages')}: no assistant tokens left within training.maxSeqLength={self.max_length}")
        return {"input_ids": ids, "labels": labels}

    def _seq2seq(self, example: dict[str, Any]) -> dict[str, Any]:
        if example["_format"] == "instruction":
            source, target = self.prompt_text(example), example["response"]
        else:
            source, target = example["source"], example["target"]
        ids = self._ids(source, self.max_length, special=True)
        labels = self._ids(target, self.max_target_length, special=True)
        return {"input_ids": ids, "labels": labels}

    def _classification(self, example: dict[str, Any]) -> dict[str, Any]:
        enc = self.tokenizer(example["text"], truncation=True, max_length=self.max_length)
        features = {"input_ids": list(enc["input_ids"]), "labels": self._label_id(example["label"], example, "label")}
        if "token_type_ids" in enc:
            features["token_type_ids"] = list(enc["token_type_ids"])
        return features

    def _token_classification(self, example: dict[str, Any]) -> dict[str, Any]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError(f"{_where(example, 'tokens')}: token classification needs a fast tokenizer (word alignment)")
        enc = self.tokenizer(example["tokens"], is_split_into_words=True, truncation=True, max_length=self.max_length)
        tags = [self._label_id(t, example, "tags") for t in example["tags"]]
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(IGNORE_INDEX if word is None or word == previous else tags[word])
            previous = word
        features = {"input_ids": list(enc["input_ids"]), "labels": labels}
        if "token_type_ids" in enc:
            features["token_type_ids"] = list(enc["token_type_ids"])
        return features

    def _question_answering(self, example: dict[str, Any]) -> dict[str, Any]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError(f"{_where(example, 'context')}: question answering needs a fast tokenizer (offset mapping)")
        enc = self.tokenizer(
            example["question"], example["context"], truncation="only_second", max_length=self.max_length,
            return_offsets_mapping=True,
        )
        start_char = example["answer_start"]
        end_char = start_char + len(example["answer"])
        sequence_ids = enc.sequence_ids()
        context_tokens = [i for i, s in enumerate(sequence_ids) if s == 1]
        offsets = enc["offset_mapping"]
        start = end = 0
        if context_tokens and offsets[context_tokens[0]][0] <= start_char and offsets[context_tokens[-1]][1] >= end_char:
            start = next(i for i in context_tokens if offsets[i][1] > start_char)
            end = max(i for i in context_tokens if offsets[i][0] < end_char)
        # else the answer was truncated away: point at the first token, as SQuAD v2 does.
        features = {"input_ids": list(enc["input_ids"]), "start_positions": start, "end_positions": end}
        if "token_type_ids" in enc:
            features["token_type_ids"] = list(enc["token_type_ids"])
        return features

    def _preference(self, example: dict[str, Any]) -> dict[str, Any]:
        prompt = self._ids(self.prompt_text({**example, "input": example.get("input", "")}) if example.get("_template") or self.templates.get(example["_dataset"]) else example["prompt"])
        out: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            response = self._ids(example[side]) + self._eos()
            ids = (prompt + response)[: self.max_length]
            labels = ([IGNORE_INDEX] * len(prompt) + response)[: self.max_length]
            out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
        # The base (pre-DPO) loss trains on the chosen response, so plain keys mirror it.
        out["input_ids"], out["labels"] = out["chosen_input_ids"], out["chosen_labels"]
        return out


def _where(example: dict[str, Any], field_name: str | None = None) -> str:
    at = f"{example.get('_origin', '?')}: row {example.get('_row', '?')}"
    return f"{at}, field {field_name!r}" if field_name else at
