"""Packed micro-batches train the model exactly as the same sequences run one by one.

Guards the padding-free packing path (kubetune.trainer.packing + attention + kernels) on CPU: the
per-token loss of a packed batch equals that of each sequence alone, documents cannot see each
other, and the collator/sampler keep every example exactly once within the token budget.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kubetune.trainer.attention import PACKED_ATTENTION, enable_packed_attention
from kubetune.trainer.kernels import causal_lm_loss
from kubetune.trainer.packing import (
    IGNORE_INDEX,
    PackedCollator,
    TokenBudgetBatchSampler,
    model_inputs,
    pack_lengths,
)

VOCAB = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def random_docs(lengths: list[int], seed: int = 1) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(0, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 4] = IGNORE_INDEX  # a "prompt" without loss
        docs.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return docs


def per_token_losses_alone(model, docs) -> list[torch.Tensor]:
    """Loss of each target token, each document run alone through the stock SDPA model."""
    out = []
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([doc["input_ids"]])
            labels = torch.tensor(doc["labels"])
            logits = model(input_ids=ids).logits[0, :-1].float()
            out.append(F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="none"))
    return out


def packed_logits(model, batch) -> torch.Tensor:
    inputs = model_inputs(batch)
    inputs.pop("labels")
    with torch.no_grad():
        return model(**inputs).logits[0].float()


@pytest.mark.parametrize("max_tokens", [None, 160])
def test_packed_per_token_loss_equals_one_by_one(max_tokens):
    model = tiny_llama()
    docs = random_docs([17, 40, 5, 63, 2])
    alone = per_token_losses_alone(model, docs)

    enable_packed_attention(model)
    assert model.config._attn_implementation == PACKED_ATTENTION
    batch = PackedCollator(max_tokens)(docs)
    logits = packed_logits(model, batch)
    labels = batch["labels"][0]
    packed = F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")

    start = 0
    for doc, ref in zip(docs, alone):
        n = len(doc["input_ids"])
        got = packed[start : start + n - 1]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        start += n
    # The boundary positions predict nothing: last token of a doc -> first token of the next.
    for boundary in batch["cu_seq_lens_q"][1:-1].tolist():
        assert packed[boundary - 1] == 0.0

    # The fused loss is the mean over every target token of every document.
    reference = torch.cat(alone)[torch.cat([torch.tensor(d["labels"][1:]) for d in docs]) != IGNORE_INDEX].mean()
    for backend in ("chunked", "torch"):
        with torch.no_grad():
            loss = causal_lm_loss(model, backend=backend, **model_inputs(batch))
        torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_packed_loss_matches_in_bf16():
    model = tiny_llama().to(torch.bfloat16)
    docs = random_docs([30, 11, 50])
    alone = torch.cat(per_token_losses_alone(model, docs))
    enable_packed_attention(model)
    batch = PackedCollator(128)(docs)
    logits = packed_logits(model, batch)
    packed = F.cross_entropy(logits[:-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    keep = torch.cat([torch.arange(s, e - 1) for s, e in zip(batch["cu_seq_lens_q"][:3].tolist(), batch["cu_seq_lens_q"][1:4].tolist())])
    torch.testing.assert_close(packed[keep], alone, rtol=2e-2, atol=2e-2)


def test_documents_do_not_attend_to_each_other():
    model = tiny_llama()
    docs = random_docs([20, 24, 9])
    changed = [dict(d) for d in docs]
    changed[0] = {"input_ids": [(t + 7) % VOCAB for t in docs[0]["input_ids"]], "labels": docs[0]["labels"]}
    collate = PackedCollator(64)

    # Control: with the stock implementation and no position reset, doc 0 leaks into docs 1 and 2.
    plain = {"input_ids": collate(docs)["input_ids"]}
    plain_changed = {"input_ids": collate(changed)["input_ids"]}
    with torch.no_grad():
        leak = (model(**plain).logits[0, 20:53] - model(**plain_changed).logits[0, 20:53]).abs().max()
    assert leak > 1e-3

    enable_packed_attention(model)
    a = packed_logits(model, collate(docs))
    b = packed_logits(model, collate(changed))
    assert (a[:20] - b[:20]).abs().max() > 1e-3  # doc 0 itself did change
    torch.testing.assert_close(a[20:], b[20:], rtol=0, atol=0)  # docs 1, 2 and padding did not


def test_gradients_match_one_by_one():
    model = tiny_llama().train()
    docs = random_docs([33, 12, 48])
    # Reference: sum of per-token losses of each document alone / number of target tokens overall.
    n_targets = sum(sum(1 for t in d["labels"][1:] if t != IGNORE_INDEX) for d in docs)
    model.zero_grad()
    for doc in docs:
        ids = torch.tensor([doc["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        loss = F.cross_entropy(logits, torch.tensor(doc["labels"][1:]), ignore_index=IGNORE_INDEX, reduction="sum")
        (loss / n_targets).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}

    enable_packed_attention(model)
    model.zero_grad()
    causal_lm_loss(model, backend="chunked", **model_inputs(PackedCollator(128)(docs))).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_collator_layout():
    batch = PackedCollator(16, pad_token_id=3)([
        {"input_ids": [5, 6, 7]},
        {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9] + [3] * 11]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9] + [IGNORE_INDEX] * 11]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1] + list(range(11))]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 16]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == 11
    assert batch["num_tokens"] == 5 and batch["num_documents"] == 2


def test_collator_rejects_bad_input():
    with pytest.raises(ValueError, match=r"examples\[1\].labels: length 1 differs"):
        PackedCollator(8)([{"input_ids": [1, 2]}, {"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="exceed max_tokens=4"):
        PackedCollator(4)([{"input_ids": [1, 2, 3]}, {"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"lengths\[1\]: example of 9 tokens does not fit max_tokens=8"):
        pack_lengths([3, 9], 8)


def test_sampler_covers_every_example_once_within_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 300, (500,), generator=g).tolist()
    sampler = TokenBudgetBatchSampler(lengths, 1024, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in batches)
    fill = sum(lengths) / (len(batches) * 1024)
    assert fill > 0.95, fill
    assert len(sampler) == len(batches)
    sampler.set_epoch(1)
    assert list(sampler) != batches

    ranks = [list(TokenBudgetBatchSampler(lengths, 1024, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen))


def test_lora_model_packed_loss_equals_one_by_one():
    """The trainer wraps models with PEFT before training; packing must hold through the wrapper."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    for p in base.parameters():
        p.data.normal_(0, 0.05)  # non-trivial weights; LoRA B=0 would hide nothing here anyway
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # make the adapters matter
    docs = random_docs([21, 34, 9])
    n_targets = sum(sum(1 for t in d["labels"][1:] if t != IGNORE_INDEX) for d in docs)
    with torch.no_grad():
        alone = sum(
            F.cross_entropy(model(input_ids=torch.tensor([d["input_ids"]])).logits[0, :-1],
                            torch.tensor(d["labels"][1:]), ignore_index=IGNORE_INDEX, reduction="sum")
            for d in docs
        ) / n_targets
    enable_packed_attention(model)
    assert model.get_base_model().config._attn_implementation == PACKED_ATTENTION
    with torch.no_grad():
        packed = causal_lm_loss(model, backend="chunked", **model_inputs(PackedCollator(80)(docs)))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_packing_max_examples_caps_documents_per_micro_batch():
    from kubetune.trainer.packing import pack_lengths

    lengths = [30, 50, 10, 200, 70, 5, 5, 5, 40, 90] * 5
    packs = pack_lengths(lengths, 2048, max_items=8)
    assert max(len(p) for p in packs) == 8
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))  # every example once
    assert all(sum(lengths[i] for i in p) <= 2048 for p in packs)
    assert [len(p) for p in pack_lengths(lengths, 2048, max_items=1)] == [1] * len(lengths)
    assert len(pack_lengths(lengths, 2048)) < len(packs)  # unlimited packs more per micro-batch
