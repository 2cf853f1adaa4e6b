"""Technique 1 · domain adaptation: continued pre-training (causal LM) on a domain corpus.

What the plugin adds to plain causal-LM training on ``text`` data:

* **packing of documents** (``packing``, default on): the training documents are tokenised, joined
  with the end-of-text token and cut into blocks of ``blockSize`` tokens (default
  ``training.maxSeqLength``), so no step is spent on padding and short documents do not waste
  whole rows. Blocks are cut at token boundaries of the original text and handed on as ``text``
  examples (the encoder re-tokenises them to the same tokens and adds the model's BOS/EOS, which
  the block size leaves room for). Evaluation documents stay whole, so held-out perplexity is
  measured per document exactly as before training. (``training.packing`` is a different,
  compatible switch: it lays the blocks of one micro-batch end to end without padding, see
  ``kubetune.trainer.packing``.)
* **general-text mix** (``generalData``): rows of a general corpus are mixed into the training
  documents so that they make up ``ratio`` of them (seeded sampling, with repetition when the
  general corpus is small), to limit forgetting. They are tagged ``_dataset``/``_task``
  ``general``.

The number of blocks and the general share are in ``ctx.state["domainAdaptation"]``.
"""

from __future__ import annotations

import random
from typing import Any

from kubetune.trainer.techniques.base import Technique, TechniqueContext

GENERAL = "general"


def general_examples(config: Any, spec: Any, base_dir: Any, n_domain: int) -> list[dict[str, Any]]:
    """General-text examples making up ``generalData.ratio`` of the mix with ``n_domain`` documents."""
    from kubetune.trainer.reading import DataError, read_rows

    mix = config.general_data
    where = "spec.techniques.domainAdaptation.generalData"
    rows = read_rows(mix.source, base_dir=base_dir, where=f"{where}.source")
    texts = []
    for row in rows:
        value = row.values.get(mix.field)
        if not isinstance(value, str):
            raise DataError(f"{row.where(mix.field)}: {where}.field: needs a string column {mix.field!r}, got {type(value).__name__}; the row has {sorted(row.values)}")
        texts.append((value, row))
    if mix.ratio <= 0.0:
        return []
    wanted = round(n_domain * mix.ratio / (1.0 - mix.ratio)) if mix.ratio < 1.0 else n_domain
    rng = random.Random(spec.training.seed + 17)
    picks = [rng.randrange(len(texts)) for _ in range(wanted)] if wanted > len(texts) else rng.sample(range(len(texts)), wanted)
    return [
        {"text": texts[i][0], "_dataset": GENERAL, "_task": GENERAL, "_format": "text", "_origin": texts[i][1].origin, "_row": texts[i][1].number}
        for i in picks
    ]


def pack_documents(texts: list[str], tokenizer: Any, block_tokens: int) -> list[str]:
    """``texts`` joined by the end-of-text token and cut into pieces of ``block_tokens`` tokens.

    Cuts fall on token boundaries of the joined text (offsets of a fast tokenizer), so each piece
    tokenises back to the same tokens. A trailing piece shorter than half a block is dropped,
    unless it is the only one.
    """
    separator = tokenizer.eos_token or ""
    joined = separator.join(texts) + separator
    enc = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    pieces = []
    for start in range(0, len(offsets), block_tokens):
        end = min(start + block_tokens, len(offsets))
        begin_char = offsets[start][0]
        end_char = offsets[end][0] if end < len(offsets) else len(joined)
        if end - start < block_tokens // 2 and pieces:
            break
        pieces.append(joined[begin_char:end_char])
    return pieces


class DomainAdaptation(Technique):
    """Packs domain documents into blocks and mixes in general text (see the module doc)."""

    name = "domainAdaptation"

    def transform_examples(self, ctx: TechniqueContext, examples: list[dict], split: str) -> list[dict]:
        if split != "train":
            return examples
        cfg = self.config
        state = ctx.state.setdefault(self.name, {})
        texts = [e for e in examples if e.get("_format") == "text"]
        others = [e for e in examples if e.get("_format") != "text"]
        if cfg.general_data is not None:
            general = general_examples(cfg, self.spec, ctx.base_dir, len(texts))
            state["general_documents"] = len(general)
            texts = texts + general
        if not cfg.packing or not texts:
            state["documents"] = len(texts)
            return others + texts
        if ctx.tokenizer is None or not getattr(ctx.tokenizer, "is_fast", False):
            raise ValueError("spec.techniques.domainAdaptation.packing: packing documents needs a fast tokenizer (token offsets)")
        block = cfg.block_size or self.spec.training.max_seq_length
        block_tokens = max(1, block - 2)  # room for the BOS/EOS the encoder adds
        rng = random.Random(self.spec.training.seed + 31)
        rng.shuffle(texts)  # domain and general documents interleave within blocks
        first = texts[0]
        pieces = pack_documents([e["text"] for e in texts], ctx.tokenizer, block_tokens)
        blocks = [
            {"text": piece, "_dataset": first.get("_dataset", ""), "_task": first.get("_task", ""), "_format": "text",
             "_origin": f"packed blocks of {len(texts)} documents", "_row": i + 1}
            for i, piece in enumerate(pieces)
        ]
        state.update(documents=len(texts), blocks=len(blocks), block_tokens=block_tokens)
        return others + blocks

    def describe(self, ctx: TechniqueContext) -> str | None:
        state = ctx.state.get(self.name, {})
        general = f" ({state['general_documents']} of them general text)" if state.get("general_documents") else ""
        if "blocks" in state:
            return f"{state['documents']} documents{general} packed into {state['blocks']} blocks of {state['block_tokens']} tokens"
        return f"{state.get('documents', 0)} documents{general}, one per sequence"
