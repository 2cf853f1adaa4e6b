"""The baselines of issues 8 and 15: what a user gets by following the transformers + DeepSpeed docs.

Every variant is ``transformers.Trainer`` with DeepSpeed ZeRO-2 (bf16), ``optim="adamw_torch_fused"``,
micro-batch 8 (8 documents per optimizer step), no compile, no activation checkpointing:

* ``padded`` (side ``baseline``): default attention (SDPA), every batch padded to its longest row
  (what ``DataCollatorForSeq2Seq`` does; no tokenizer exists for a random model, so
  :func:`pad_to_longest` does the same thing);
* ``flat`` (side ``baseline-flat``): the padding-free path of transformers —
  ``DataCollatorWithFlattening`` lays the 8 documents end to end in one row with ``position_ids``
  restarting at 0 for each, no attention mask. The best attention for it on an image without the
  flash-attn package is SDPA: transformers 5 detects the packed documents from ``position_ids``
  (``masking_utils.find_packed_sequence_indices``) and hands SDPA a block-diagonal causal mask,
  so documents never see each other (checked on CPU: ``tests/bench/test_baselines.py``; it
  needs ``use_cache=False``, which :func:`bench.workload.llama_config` sets — with a KV cache
  transformers skips the check and the documents of a row attend to each other);
  ``KUBETUNE_BENCH_FLAT_ATTN`` picks another implementation (e.g. ``flex_attention``) for A/B;
* ``liger`` (side ``baseline-liger``): ``padded`` plus the one flag a user adds for speed,
  ``use_liger_kernel=True`` (Liger's fused RMSNorm, RoPE, SwiGLU and fused linear cross-entropy).

The only additions are measurement: :class:`MeasuredTrainer` sums the real tokens of the steps
after warm-up without a device sync, and a callback stamps the time after the warm-up step and at
the end. The loss of every step is kept (for the numerics check against the kubetune side). Run
through ``bench/throughput.py``, one process per run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch

from bench import workload as wl

IGNORE_INDEX = -100


def pad_to_longest(examples: list[dict[str, Any]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row; labels -100 and attention_mask 0 on the padding."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.as_tensor(e["input_ids"])
        labels[row, :n] = torch.as_tensor(e.get("labels", e["input_ids"]))
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def deepspeed_zero2_config() -> dict[str, Any]:
    """The ZeRO-2 config from the transformers DeepSpeed docs ("auto" values filled by the Trainer)."""
    return {
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "allgather_partitions": True,
            "allgather_bucket_size": 5e8,
            "reduce_scatter": True,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


VARIANTS = ("padded", "flat", "liger")


def flat_attention() -> str:
    return os.environ.get("KUBETUNE_BENCH_FLAT_ATTN", "sdpa")


def run(workload: str, method: str, *, steps: int, warmup: int, device: str, tiny: bool,
        deepspeed: bool = True, seed: int = 0, variant: str = "padded") -> dict[str, Any]:
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    if variant not in VARIANTS:
        raise ValueError(f"variant: must be one of {', '.join(VARIANTS)}, got {variant!r}")
    shape = wl.shape_for(tiny)
    cuda = device.startswith("cuda")
    attention = flat_attention() if variant == "flat" else "sdpa"
    model = wl.build_model(shape, method, device, attn_implementation=attention, seed=seed)
    total_steps = warmup + steps
    lengths = wl.lengths_for(workload, shape, shape.micro_batch * (total_steps + 2), seed=seed)
    train = wl.examples_for(lengths, shape.vocab, seed=seed)

    class MeasuredTrainer(Trainer):
        measured_rows: list[torch.Tensor] = []

        losses: list[torch.Tensor] = []
        documents = 0

        def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
            if self.state.global_step >= warmup:
                if "attention_mask" in inputs:
                    self.measured_rows.append(inputs["attention_mask"].sum(dim=1).detach())
                    MeasuredTrainer.documents += int(inputs["attention_mask"].shape[0])
                else:  # flattened: the collator's host-side document lengths (no device sync)
                    self.measured_rows.append(inputs["doc_lengths"])
                    MeasuredTrainer.documents += int(inputs["doc_lengths"].numel())
            inputs.pop("doc_lengths", None)
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.losses.append(loss.detach().float().reshape(()))
            return loss

    stamps: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.global_step == warmup:
                if cuda:
                    torch.cuda.synchronize()
                stamps["start"] = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if cuda:
                torch.cuda.synchronize()
            stamps["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=shape.micro_batch, max_steps=total_steps,
            learning_rate=wl.LEARNING_RATE, lr_scheduler_type="constant", optim="adamw_torch_fused" if cuda else "adamw_torch",
            bf16=cuda, logging_steps=10**6, save_strategy="no", report_to=[], seed=seed,
            deepspeed=deepspeed_zero2_config() if deepspeed else None,
            remove_unused_columns=False, dataloader_drop_last=True, disable_tqdm=True,
            use_cpu=not cuda, use_liger_kernel=variant == "liger",
        )
        if variant == "flat":
            flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

            def collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
                batch = dict(flatten(examples))
                batch["doc_lengths"] = torch.tensor([len(e["input_ids"]) for e in examples])
                return batch
        else:
            collator = pad_to_longest  # type: ignore[assignment]
        trainer = MeasuredTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                                  callbacks=[Clock()])
        trainer.train()

    seconds = stamps["end"] - stamps["start"]
    rows = torch.cat(trainer.measured_rows).tolist()
    setup = {
        "padded": "transformers.Trainer + DeepSpeed ZeRO-2, adamw_torch_fused, SDPA, pad to longest of 8",
        "flat": f"transformers.Trainer + DeepSpeed ZeRO-2, adamw_torch_fused, DataCollatorWithFlattening "
                f"(8 documents per row, position_ids), attn_implementation={attention}",
        "liger": "transformers.Trainer + DeepSpeed ZeRO-2, adamw_torch_fused, SDPA, pad to longest of 8, use_liger_kernel=True",
    }[variant]
    tokens = int(sum(rows))
    flops = wl.flops_for_documents(shape, method, rows)
    return {
        "side": "baseline" if variant == "padded" else f"baseline-{variant}", "workload": workload,
        "method": method, "steps": steps, "documents_per_step": trainer.documents / steps,
        "losses": [float(x) for x in torch.stack(trainer.losses).tolist()],
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "mfu": wl.mfu(flops, seconds),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "setup": setup,
    }


if __name__ == "__main__":  # pragma: no cover - use bench/throughput.py
    import sys

    print(json.dumps(run(sys.argv[1], sys.argv[2], steps=5, warmup=2, device="cpu", tiny=True)))
