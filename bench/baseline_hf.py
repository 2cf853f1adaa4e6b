"""The baseline of issue 8: what a user gets by following the transformers + DeepSpeed docs.

``transformers.Trainer`` with DeepSpeed ZeRO-2 (bf16), ``optim="adamw_torch_fused"``, micro-batch 8,
default attention (SDPA), every batch padded to its longest row (what ``DataCollatorForSeq2Seq``
does; no tokenizer exists for a random model, so :func:`pad_to_longest` does the same thing), no
packing, no Liger, no compile, no activation checkpointing.

The only additions are measurement: :class:`MeasuredTrainer` sums the real tokens
(``attention_mask``) of the steps after warm-up without a device sync, and a callback stamps the
time after the warm-up step and at the end. Run through ``bench/throughput.py``, one process per run.
"""

from __future__ import annotations

import json
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


def run(workload: str, method: str, *, steps: int, warmup: int, device: str, tiny: bool,
        deepspeed: bool = True, seed: int = 0) -> dict[str, Any]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    shape = wl.shape_for(tiny)
    cuda = device.startswith("cuda")
    model = wl.build_model(shape, method, device, attn_implementation="sdpa", seed=seed)
    total_steps = warmup + steps
    lengths = wl.lengths_for(workload, shape, shape.micro_batch * (total_steps + 2), seed=seed)
    train = wl.examples_for(lengths, shape.vocab, seed=seed)

    class MeasuredTrainer(Trainer):
        measured_rows: list[torch.Tensor] = []

        def training_step(self, model, inputs, num_items_in_batch=None):  # type: ignore[override]
            if self.state.global_step >= warmup:
                self.measured_rows.append(inputs["attention_mask"].sum(dim=1).detach())
            return super().training_step(model, inputs, num_items_in_batch)

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
            learning_rate=1e-5, lr_scheduler_type="constant", optim="adamw_torch_fused" if cuda else "adamw_torch",
            bf16=cuda, logging_steps=10**6, save_strategy="no", report_to=[], seed=seed,
            deepspeed=deepspeed_zero2_config() if deepspeed else None,
            remove_unused_columns=False, dataloader_drop_last=True, disable_tqdm=True,
            use_cpu=not cuda,
        )
        trainer = MeasuredTrainer(model=model, args=args, train_dataset=train, data_collator=pad_to_longest,
                                  callbacks=[Clock()])
        trainer.train()

    seconds = stamps["end"] - stamps["start"]
    rows = torch.cat(trainer.measured_rows).tolist()
    tokens = int(sum(rows))
    flops = wl.flops_for_documents(shape, method, rows)
    return {
        "side": "baseline", "workload": workload, "method": method, "steps": steps,
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "mfu": wl.mfu(flops, seconds),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "setup": "transformers.Trainer + DeepSpeed ZeRO-2, adamw_torch_fused, SDPA, pad to longest of 8",
    }


if __name__ == "__main__":  # pragma: no cover - use bench/throughput.py
    import sys

    print(json.dumps(run(sys.argv[1], sys.argv[2], steps=5, warmup=2, device="cpu", tiny=True)))
