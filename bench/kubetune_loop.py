"""The kubetune side of the throughput benchmark: the product's building blocks in a minimal loop.

Same model, data, DeepSpeed ZeRO-2 (bf16) engine and fused torch AdamW as the baseline; what differs
is what the kubetune trainer does by default:

* padding-free packing (:mod:`kubetune.trainer.packing`) into a fixed 16,384-token micro-batch (the
  baseline's 8 x 2048), documents isolated by flash varlen attention (:mod:`kubetune.trainer.attention`);
* fused linear cross-entropy (:mod:`kubetune.trainer.kernels`): no [T, 128256] logits;
* ``torch.compile`` of each decoder layer (one graph reused by all 16; attention stays eager);
* a DataLoader with worker processes and pinned memory, so collation overlaps the GPU.

The training loop here is the minimal one (forward through the engine, ``engine.backward``,
``engine.step``); the product trainer's step does the same calls. Run through ``bench/throughput.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from typing import Any

import torch

from bench import workload as wl
from kubetune.trainer.attention import attn_implementation_for
from kubetune.trainer.kernels import CausalLMLoss
from kubetune.trainer.packing import PackedCollator, TokenBudgetBatchSampler, model_inputs


def deepspeed_config(world_size: int = 1) -> dict[str, Any]:
    """ZeRO-2 bf16 with the same bucket sizes and clipping as the baseline's filled-in config.

    On one GPU there is nothing to overlap: ``overlap_comm`` and ``contiguous_gradients`` only add
    copies and a side stream there (+2% tokens/s without them on an H100, bench/README.md), so they
    are on only for several GPUs.

    ``KUBETUNE_BENCH_DS`` (JSON) is merged on top, one level deep, for A/B runs of DeepSpeed settings.
    """
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 2, "overlap_comm": world_size > 1, "contiguous_gradients": world_size > 1,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in json.loads(os.environ.get("KUBETUNE_BENCH_DS", "{}")).items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def run(workload: str, method: str, *, steps: int, warmup: int, device: str, tiny: bool,
        compile: bool = True, loss_backend: str = "auto", deepspeed: bool = True, seed: int = 0,
        profile_dir: str | None = None) -> dict[str, Any]:
    shape = wl.shape_for(tiny)
    cuda = device.startswith("cuda")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not deepspeed:
        raise ValueError("several processes need DeepSpeed (drop --no-deepspeed)")
    model = wl.build_model(shape, method, device, attn_implementation=attn_implementation_for(device), seed=seed)
    if compile:
        for layer in _decoder_layers(model):
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=wl.LEARNING_RATE, fused=cuda)
    module = CausalLMLoss(model, backend=loss_backend)
    if deepspeed:
        import deepspeed as ds

        engine, optimizer, _, _ = ds.initialize(model=module, optimizer=optimizer, config=deepspeed_config(world))
        backward, step = engine.backward, engine.step
    else:
        engine = module

        def backward(loss: torch.Tensor) -> None:
            loss.backward()

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    budget = shape.token_budget
    total_steps = warmup + steps
    per_step = budget // (shape.seq_len if workload == "fixed" else 150 * shape.seq_len // wl.SEQ_LEN)
    lengths = wl.lengths_for(workload, shape, per_step * (total_steps + 4) * world, seed=seed)
    examples = wl.examples_for(lengths, shape.vocab, seed=seed)
    sampler = TokenBudgetBatchSampler(lengths, budget, seed=seed, num_replicas=world, rank=rank)
    loader = torch.utils.data.DataLoader(
        examples, batch_sampler=sampler, collate_fn=PackedCollator(budget),
        num_workers=2, pin_memory=cuda, persistent_workers=False, prefetch_factor=4,
    )
    if len(sampler) < total_steps:
        raise RuntimeError(f"workload too small: {len(sampler)} micro-batches < {total_steps} steps")

    tokens, docs, padded = 0, [], 0
    start = end = 0.0
    prof = None
    profiled_steps = 2 if profile_dir else 0  # traced after the timed steps, so timing is unaffected
    for i, batch in enumerate(loader):
        if i == total_steps + profiled_steps:
            break
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        if i == total_steps:
            if cuda:
                torch.cuda.synchronize()
            end = time.perf_counter()
            prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        loss = engine(**model_inputs(batch, device))
        backward(loss)
        step()
        if warmup <= i < total_steps:
            tokens += batch["num_tokens"]
            padded += batch["input_ids"].numel()
            cu = batch["cu_seq_lens_q"].tolist()
            docs.extend(b - a for a, b in zip(cu[: batch["num_documents"]], cu[1 : batch["num_documents"] + 1]))
    if cuda:
        torch.cuda.synchronize()
    if not profiled_steps:
        end = time.perf_counter()
    if prof is not None:
        prof.__exit__(None, None, None)
        name = f"{profile_dir}/kubetune_{workload}_{method}"
        with open(f"{name}.txt", "w") as fh:
            fh.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
        prof.export_chrome_trace(f"{name}.trace.json")
        with open(f"{name}.trace.json", "rb") as src, gzip.open(f"{name}.trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(f"{name}.trace.json")
    seconds = end - start
    flops = wl.flops_for_documents(shape, method, docs)
    if world > 1:  # every rank's real tokens and FLOPs count; time is rank 0's
        totals = torch.tensor([float(tokens), flops, float(padded)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(totals)
        tokens, flops, padded = int(totals[0].item()), totals[1].item(), int(totals[2].item())
        flops /= world  # MFU is per GPU
    return {
        "side": "kubetune", "workload": workload, "method": method, "steps": steps, "gpus": world,
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "mfu": wl.mfu(flops, seconds), "fill": tokens / max(padded, 1), "final_loss": loss.detach().item(),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "setup": (f"DeepSpeed ZeRO-2 + fused AdamW, packed {budget} tokens, "
                  f"{'flash varlen' if cuda else 'SDPA block mask'}, loss={loss_backend}, compile={compile}"),
    }
