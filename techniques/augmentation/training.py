"""Technique 12 · data augmentation: label-preserving edits of the input, on the fly and seeded.

Each configured augmentation fires on a training example with its own probability ``p`` each
time the example is drawn (every epoch anew), using the ``random.Random`` the loop seeds with
(``training.seed``, epoch, example index) — mixed with ``augmentation.seed`` when that is set — so
a seed gives the same augmented stream, including after a resume. When it fires it touches
``rate`` of the candidates (at least one):

======================  =========================================================================
templateParaphrase      re-render the prompt with one of ``templates`` (same variables)
synonyms                replace words by another member of their synonym set (``file``: one set a
                        line, comma-separated; ``#`` comments)
randomSwap              swap neighbouring words
randomDelete            delete words (never all of them)
tokenDropout            remove input tokens
tokenMasking            replace input tokens by the mask token (else unk, else pad)
======================  =========================================================================

Only the *input* is edited, never what is learned (see ``inputs.INPUT_FIELDS``): the class label,
the response of instruction data (word edits touch prompt and input; token edits touch only
positions whose label is ``-100``), the seq2seq target. Task prefixes and control codes
(``_prefix``) are kept in front. Word lists of token classification move their tags with them
(swap, delete, synonyms); token dropout there removes only unlabelled sub-word positions, so every
remaining word keeps its tag. Word edits re-encode the example with the loop's encoder
(``ctx.encode``); token edits work on the features. Extractive QA and preference data are not
augmented (the API refuses those combinations: spans would move; DPO compares fixed pairs).
"""

from __future__ import annotations

import random
import re
from typing import Any

from kubetune.trainer.encoding import render_template
from kubetune.trainer.techniques.base import Technique, TechniqueContext
from kubetune.trainer.techniques.inputs import INPUT_FIELDS, leading_field

IGNORE_INDEX = -100
WORD_OPS = ("template_paraphrase", "synonyms", "random_swap", "random_delete")
TOKEN_OPS = ("token_dropout", "token_masking")
_SPACES = re.compile(r"\s+")
_FIELD_RENDERED = {"text": "text", "classification": "text", "seq2seq": "source"}


def read_synonyms(path: Any, where: str) -> dict[str, list[str]]:
    """Word (lower case) → its synonym set, from a file of comma-separated sets."""
    from pathlib import Path

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read the synonym file {path} ({exc.strerror})") from None
    table: dict[str, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = [w.strip() for w in line.split(",") if w.strip()]
        if len(words) < 2:
            raise ValueError(f"{where}: {path}: line {number}: a synonym set needs at least two comma-separated words, got {line!r}")
        for w in words:
            table[w.lower()] = words
    if not table:
        raise ValueError(f"{where}: {path} holds no synonym sets")
    return table


def _count(rate: float, n: int) -> int:
    return max(1, min(n, round(rate * n)))


# --- word edits ---------------------------------------------------------------------------------


def swap_words(words: list[Any], rate: float, rng: random.Random, tags: list[Any] | None = None) -> None:
    """Swap ``rate`` of the neighbouring pairs in place (tags move along)."""
    if len(words) < 2:
        return
    for i in rng.sample(range(len(words) - 1), _count(rate, len(words) - 1)):
        words[i], words[i + 1] = words[i + 1], words[i]
        if tags is not None:
            tags[i], tags[i + 1] = tags[i + 1], tags[i]


def delete_words(words: list[Any], rate: float, rng: random.Random, tags: list[Any] | None = None) -> None:
    """Delete ``rate`` of the words in place, keeping at least one (tags go with them)."""
    if len(words) < 2:
        return
    doomed = set(rng.sample(range(len(words)), min(_count(rate, len(words)), len(words) - 1)))
    words[:] = [w for i, w in enumerate(words) if i not in doomed]
    if tags is not None:
        tags[:] = [t for i, t in enumerate(tags) if i not in doomed]


def replace_synonyms(words: list[str], table: dict[str, list[str]], rate: float, rng: random.Random) -> None:
    """Replace ``rate`` of the words that have synonyms by another member of their set, in place."""
    known = [i for i, w in enumerate(words) if _strip(w)[1].lower() in table]
    if not known:
        return
    for i in rng.sample(known, _count(rate, len(known))):
        lead, core, trail = _strip(words[i])
        choices = [s for s in table[core.lower()] if s.lower() != core.lower()]
        new = rng.choice(choices)
        if core[:1].isupper():
            new = new[:1].upper() + new[1:]
        words[i] = lead + new + trail


def _strip(word: str) -> tuple[str, str, str]:
    """(leading punctuation, the word, trailing punctuation)."""
    m = re.match(r"^(\W*)(.*?)(\W*)$", word, re.S)
    assert m is not None
    return m.group(1), m.group(2), m.group(3)


def edit_text(text: str, ops: list[tuple[str, Any]], rng: random.Random, table: dict[str, list[str]] | None) -> str:
    """``text`` with the word edits in ``ops`` applied (the whitespace between words is kept)."""
    core = text.strip()
    if not core:
        return text
    leading, trailing = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
    words, gaps = core.split(), _SPACES.findall(core)
    for name, op in ops:
        if name == "synonyms" and table:
            replace_synonyms(words, table, op.rate, rng)
        elif name == "random_swap":
            swap_words(words, op.rate, rng)
        elif name == "random_delete":
            delete_words(words, op.rate, rng)
    joined = "".join(w + (gaps[i] if i < len(gaps) else " ") for i, w in enumerate(words[:-1])) + words[-1]
    return leading + joined + trailing


# --- the plugin ---------------------------------------------------------------------------------


class Augmentation(Technique):
    """Edits the input of training examples on the fly (see the module doc)."""

    name = "augmentation"

    def __init__(self, config: Any, spec: Any) -> None:
        super().__init__(config, spec)
        self.synonyms: dict[str, list[str]] | None = None
        self.stats = {"seen": 0, "augmented": 0}

    def transform_examples(self, ctx: TechniqueContext, examples: list[dict], split: str) -> list[dict]:
        # Read the synonym file once, up front, so a bad file fails before training starts. A preview
        # shows the text before augmentation (which acts on the fly, per epoch).
        if split == "preview":
            return examples
        if self.config.synonyms is not None and self.synonyms is None:
            from kubetune.trainer.sources import resolve_path

            where = "spec.techniques.augmentation.synonyms.file"
            self.synonyms = read_synonyms(resolve_path(self.config.synonyms.file, ctx.base_dir, where), where)
        return examples

    def configured(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self.config, name)) for name in WORD_OPS + TOKEN_OPS if getattr(self.config, name) is not None]

    def augment(self, ctx: TechniqueContext, example: dict, rng: Any) -> dict:
        if self.config.seed is not None:
            rng = random.Random((self.config.seed << 64) ^ rng.getrandbits(64))
        fired = [(name, op) for name, op in self.configured() if rng.random() < op.p]  # every op draws: stable streams
        self.stats["seen"] += 1
        if not fired:
            return example
        source = ctx.examples["train"][example["_index"]]
        if source.get("_format") in {"question-answering", "preference"}:
            return example
        out = example
        word_ops = [(n, op) for n, op in fired if n in WORD_OPS]
        if word_ops:
            edited = self.edit_example(source, word_ops, rng)
            if edited is not None:
                out = dict(ctx.encode(edited), _index=example["_index"])
        token_ops = [(n, op) for n, op in fired if n in TOKEN_OPS]
        if token_ops:
            out = self.edit_tokens(ctx, out, source.get("_format", ""), token_ops, rng)
        if out is not example:
            self.stats["augmented"] += 1
        return out

    def edit_example(self, example: dict, ops: list[tuple[str, Any]], rng: random.Random) -> dict | None:
        """A copy of the raw example with the word edits applied to its input, or None (nothing to edit)."""
        fmt = example.get("_format", "")
        if fmt == "token-classification":
            words, tags = list(example["tokens"]), list(example["tags"])
            for name, op in ops:
                if name == "synonyms" and self.synonyms:
                    replace_synonyms(words, self.synonyms, op.rate, rng)
                elif name == "random_swap":
                    swap_words(words, op.rate, rng, tags)
                elif name == "random_delete":
                    delete_words(words, op.rate, rng, tags)
            return dict(example, tokens=words, tags=tags)
        fields = INPUT_FIELDS.get(fmt, ())
        if not fields:
            return None
        prefix = example.get("_prefix", "")
        lead = leading_field(example)
        if "_raw" in example:
            values = dict(example["_raw"])
        else:
            values = {k: v for k, v in example.items() if not k.startswith("_")}
            if prefix and lead and str(values.get(lead, "")).startswith(prefix):
                values[lead] = values[lead][len(prefix) :]
        edits = [(n, op) for n, op in ops if n != "template_paraphrase"]
        for key in fields:
            if isinstance(values.get(key), str) and values[key]:
                values[key] = edit_text(values[key], edits, rng, self.synonyms)
        paraphrase = next((op for n, op in ops if n == "template_paraphrase"), None)
        out = dict(example)
        template_format = example.get("_template_format", "jinja")  # set by whoever templated the example
        if fmt in {"instruction", "preference"}:
            for key in fields:
                out[key] = values[key]
            if lead and prefix:
                out[lead] = prefix + values[lead]
            if paraphrase is not None:
                out["_template"] = rng.choice(paraphrase.templates)
            return out
        key = _FIELD_RENDERED.get(fmt)
        if key is None:
            return None
        template = rng.choice(paraphrase.templates) if paraphrase is not None else example.get("_prompt_template")
        where = f"spec.techniques.augmentation ({example.get('_origin', '?')}: row {example.get('_row', '?')})"
        body = render_template(template, values, template_format, where) if template else values[key]
        out[key] = prefix + body
        return out

    def edit_tokens(self, ctx: TechniqueContext, item: dict, fmt: str, ops: list[tuple[str, Any]], rng: random.Random) -> dict:
        """Token dropout/masking on the features' input positions (see the module doc)."""
        tok = ctx.tokenizer
        special = set(getattr(tok, "all_special_ids", []) or [])
        ids = list(item["input_ids"])
        labels = item.get("labels")
        per_token = isinstance(labels, list) and len(labels) == len(ids) and fmt != "seq2seq"
        out = dict(item)
        response_masked = fmt in {"instruction", "chat"}
        for name, op in ops:
            candidates = [i for i in range(len(ids)) if ids[i] not in special]
            if per_token and (response_masked or (name == "token_dropout" and fmt == "token-classification")):
                candidates = [i for i in candidates if labels[i] == IGNORE_INDEX]
            if name == "token_dropout" and len(candidates) >= len(ids):
                candidates = candidates[1:]  # never drop every token
            if not candidates:
                continue
            chosen = set(rng.sample(candidates, _count(op.rate, len(candidates))))
            if name == "token_masking":
                mask = tok.mask_token_id if tok.mask_token_id is not None else (tok.unk_token_id if tok.unk_token_id is not None else tok.pad_token_id)
                ids = [mask if i in chosen else t for i, t in enumerate(ids)]
                continue
            keep = [i for i in range(len(ids)) if i not in chosen]
            ids = [ids[i] for i in keep]
            if per_token:
                labels = [labels[i] for i in keep]
                out["labels"] = labels
            if "token_type_ids" in out:
                out["token_type_ids"] = [out["token_type_ids"][i] for i in keep]
        out["input_ids"] = ids
        return out

    def describe(self, ctx: TechniqueContext) -> str | None:
        seen, augmented = self.stats["seen"], self.stats["augmented"]
        return f"{augmented} of {seen} training examples augmented ({', '.join(name for name, _ in self.configured())})"
