"""``trustRemoteCode`` is off unless the spec asks: every load of the model and its tokenizer passes
``trust_remote_code`` exactly as ``spec.model.trustRemoteCode`` says, False by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.api import parse_spec
from kubetune.trainer import models
from tests.support.tiny_models import tiny_model


@pytest.mark.parametrize("asked", [None, True])
def test_remote_code_is_trusted_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, asked: bool | None) -> None:
    import transformers

    folder = tiny_model(tmp_path / "tiny", "llama")
    model_block: dict[str, Any] = {"source": str(folder)}
    if asked is not None:
        model_block["trustRemoteCode"] = asked
    spec = parse_spec({"model": model_block, "data": {"datasets": [{"source": "d.jsonl", "format": "text"}]}})
    seen: list[bool] = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__  # type: ignore[attr-defined]

        def recording(klass: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen.append(kwargs.get("trust_remote_code"))
            return _original(klass, *args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    tokenizer, tokenizer_dir = models.load_tokenizer(spec, tmp_path)
    models.build_model(spec, tmp_path, tokenizer, tokenizer_dir, None)
    assert len(seen) >= 2 and set(seen) == {bool(asked)}
