"""The anatomy of a model as the layer-aware techniques see it: blocks, head, bottom and top.

Transfer learning (freeze the base, unfreeze blocks from the top), layer selection (train blocks
by index or parameters by pattern) and regularisation (L2-SP on the pretrained part only) all ask
the same questions of a transformers model, plain or PEFT-wrapped: which parameters form the
task head, which belong to transformer block ``i``, what sits below the blocks (embeddings) and
what above them (final norm, pooler). :func:`anatomy` answers them once from parameter names:

* the **blocks** are the longest ``nn.ModuleList`` of the model (``model.layers``,
  ``transformer.h``, ``bert.encoder.layer``); encoder-decoder models have two stacks of equal
  depth, and an index then means that block in each stack (as PEFT's ``layers_to_transform``);
* the **head** is every parameter outside the backbone (``model.base_model_prefix``):
  ``classifier``, ``score``, ``lm_head``, ``qa_outputs``. A head tied to the input embeddings
  (GPT-2's ``lm_head``) has no parameter of its own, and then the head is empty;
* **bottom** and **top** are the other backbone parameters, by where they come in the model's
  parameter order relative to the blocks.

Only parameter names are used, so the answer is the same before and after DeepSpeed wraps the
model. :func:`describe_names` renders the names compactly for error messages ("the model has …").
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

import torch

_PEFT_PREFIX = "base_model.model."


def unwrap(model: Any) -> Any:
    """The transformers model under DeepSpeed and PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def plain_name(name: str) -> str:
    """A parameter name without DeepSpeed's ``module.`` and PEFT's ``base_model.model.`` prefixes."""
    if name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name


@dataclass
class Anatomy:
    """Parameter names (as ``model.named_parameters()`` gives them) by part of the model."""

    stacks: list[str]  # module paths of the block lists, e.g. ["model.layers"]
    depth: int  # blocks per stack
    block_of: dict[str, int] = field(default_factory=dict)  # parameter name -> block index
    head: list[str] = field(default_factory=list)
    bottom: list[str] = field(default_factory=list)
    top: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # every parameter, in model order

    def block(self, index: int) -> list[str]:
        return [n for n in self.names if self.block_of.get(n) == index]


def _block_stacks(model: torch.nn.Module) -> tuple[list[str], int]:
    lists = [(name, len(mod)) for name, mod in model.named_modules() if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0]
    if not lists:
        return [], 0
    depth = max(n for _, n in lists)
    stacks = [name for name, n in lists if n == depth]
    # Nested lists of the same length (rare) would double-count; keep the outermost ones.
    stacks = [s for s in stacks if not any(s != o and s.startswith(o + ".") for o in stacks)]
    return stacks, depth


def anatomy(model: Any) -> Anatomy:
    """See the module doc. ``model`` may be wrapped by PEFT; names are those of ``model`` itself."""
    inner = unwrap(model)
    stacks, depth = _block_stacks(inner)
    prefix = getattr(inner, "base_model_prefix", "") or ""
    has_backbone = bool(prefix) and hasattr(inner, prefix)
    patterns = [re.compile(r"^" + re.escape(s) + r"\.(\d+)\.") for s in stacks]
    out = Anatomy(stacks=stacks, depth=depth)
    seen_block = False
    for name, _ in model.named_parameters():
        plain = plain_name(name)
        # PEFT keeps a trainable copy of the head under ``<head>.modules_to_save.<adapter>``.
        plain_base = re.sub(r"\.(modules_to_save|original_module)\.[^.]+\.", ".", plain)
        out.names.append(name)
        index = next((int(m.group(1)) for p in patterns if (m := p.match(plain_base))), None)
        if index is not None:
            out.block_of[name] = index
            seen_block = True
        elif has_backbone and not plain_base.startswith(prefix + "."):
            out.head.append(name)
        elif seen_block:
            out.top.append(name)
        else:
            out.bottom.append(name)
    # Parameters between two stacks (an encoder's final norm before the decoder) count as top.
    if len(stacks) > 1:
        last_block = max((i for i, n in enumerate(out.names) if n in out.block_of), default=-1)
        moved = [n for n in out.top if out.names.index(n) < last_block]
        out.top = [n for n in out.top if n not in moved] + moved
    return out


def resolve_index(token: str, depth: int) -> list[int] | str:
    """Block indices of ``3``, ``8:12``, ``-4:`` (Python slice semantics) — or why it is wrong."""
    if ":" in token:
        start_text, _, stop_text = token.partition(":")
        start = int(start_text) if start_text else 0
        stop = int(stop_text) if stop_text else depth
        indices = list(range(depth))[slice(start, stop)]
        if not indices:
            return f"range {token!r} selects no block; the model has {depth} blocks (0..{depth - 1})"
        return indices
    index = int(token)
    if not -depth <= index < depth:
        return f"block {index} does not exist; the model has {depth} blocks (0..{depth - 1}, or -{depth}..-1 from the end)"
    return [index % depth]


def matching(names: list[str], pattern: str) -> list[str]:
    """Names matching a glob (``*`` crosses dots), tried on the full and the unwrapped name."""
    return [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(plain_name(n), pattern)]


def describe_names(names: list[str], limit: int = 40) -> str:
    """Names with block indices folded (``model.layers.*.mlp.up_proj.weight``), for error messages."""
    folded = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", plain_name(n)) for n in names))
    shown = ", ".join(folded[:limit])
    return shown + (f", … ({len(folded) - limit} more)" if len(folded) > limit else "")
