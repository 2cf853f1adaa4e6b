"""The kubetune side of the throughput benchmark: the product trainer, driven by a FineTuneJob.

What a user runs (``kubetune train`` / the trainer pods) is :class:`kubetune.trainer.training.Trainer`;
this module measures exactly that on the benchmark workload (:mod:`bench.workload`):

* the Llama-3.2-1B-shaped random-init model is saved once (bf16 safetensors) into a work folder,
  with a word-level tokenizer of the same 128,256-entry vocabulary (``t<id>`` words map to token id
  ``<id>``, so the synthetic text is the token stream, no tokenizer artefacts);
* the workload's documents (fixed 2048 or instruction-like lengths) are written as a ``text``
  jsonl dataset: each line is ``length - 1`` random words, the trainer appends the eos token;
* the FineTuneJob: ``training.packing`` on with ``microBatchSize x maxSeqLength`` = 8 x 2048 =
  16,384 tokens per micro-batch, bf16, ``deepspeed.zeroStage`` 2, LoRA r=16 alpha=32 (dropout 0)
  on all linear layers for ``lora``; everything else is the product's default (compile, loss
  kernel, DataLoader workers, fused AdamW, DeepSpeed settings);
* tokens/s comes from the trainer's own ``trainer_log.jsonl`` (``window_tokens`` /
  ``window_seconds`` of each log interval), the warm-up interval (compilation, first allocations)
  excluded; peak memory from its ``gpu_peak_memory_gib``.

Only the end of the run is cut: the final checkpoint (~15 GB of fp32 master weights and Adam
state for this model) and the export are skipped, since they are not training steps.
``KUBETUNE_BENCH_SPEC`` (JSON, deep-merged into ``spec``) overrides spec fields for A/B runs.
Variants (sides of ``bench/throughput.py``): ``kubetune`` (the product defaults: on one GPU the
fused engine, ``deepspeed.engine`` unset), ``kubetune-deepspeed`` (``deepspeed.engine: deepspeed``,
the DeepSpeed ZeRO-2 engine the trainer used before; same data and seed, so its losses are the
numerics reference for the fused engine), ``kubetune-budget`` (``training.packingMaxExamples``
= the baseline's micro-batch of 8: as many documents per optimizer step as the baselines),
``kubetune-buffers`` (the fused engine's step before the one-pass kernel: fp32 gradient buffers,
``torch._fused_adamw_`` and a copy into the weights; an A/B reference), ``kubetune-saveall``
(``KUBETUNE_COMPILE_SAVE_ALL=1``: the compiled layers save their elementwise results for backward,
torch's default partitioning, instead of recomputing them; an A/B reference for speed and peak memory),
``kubetune-fp8`` (``training.precision: fp8``: torchao float8 linear layers, same data, seed and
weights as ``kubetune``, whose losses are its reference; its MFU counts the same FLOPs against the
same bf16 peak, so it reads as "bf16-equivalent" utilisation).
``KUBETUNE_BENCH_PROFILE=DIR`` adds one log interval after the timed ones and traces its last two
steps with torch.profiler (:func:`profile_engine`; that interval is not timed).
Run through ``bench/throughput.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bench import workload as wl

EOS, UNK = "<eos>", "<unk>"


def _tokenizer(folder: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {EOS: 0, UNK: 1, **{f"t{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token=UNK, pad_token=EOS)
    fast.save_pretrained(str(folder))


def prepare_model(root: Path, shape: wl.Shape, cuda: bool) -> Path:
    """The random-init model + tokenizer folder for ``shape`` (built once, reused)."""
    import torch
    from transformers import LlamaForCausalLM

    folder = root / f"model-{shape.layers}x{shape.hidden}-{'bf16' if cuda else 'fp32'}"
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(wl.llama_config(shape)).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(str(tmp))
    _tokenizer(tmp, shape.vocab)
    tmp.rename(folder)
    return folder


def write_dataset(path: Path, lengths: list[int], vocab: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed + 1)
    with path.open("w", encoding="utf-8") as fh:
        for n in lengths:
            ids = wl.token_ids(rng, n - 1, vocab)  # from wl.FIRST_ID = 2, the first t{i}  # + eos appended by the trainer = n tokens
            fh.write(json.dumps({"text": " ".join(f"t{i}" for i in ids)}) + "\n")
    return path


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


VARIANTS = ("default", "deepspeed", "budget", "buffers", "fp8", "saveall")

# Kernel names -> the part of a training step they belong to (the profile summary's rows).
KERNEL_KINDS = (
    ("attention", re.compile(r"flash|fmha|sdpa|cudnn|attention", re.I)),
    ("loss (fused linear + cross-entropy)", re.compile(r"liger|cross_entropy|_ce_|logsumexp", re.I)),
    ("optimizer (norm, Adam, copies)", re.compile(r"adam|multi_tensor|foreach|norm_kernel|reduce_kernel", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|sm90_xmma|matmul|splitk", re.I)),
    ("compiled elementwise (triton)", re.compile(r"^triton_", re.I)),
    ("copies / casts / fills", re.compile(r"copy|elementwise|fill|memcpy|memset|cast", re.I)),
)


def profile_engine(engine: Any, folder: Path, label: str, first: int, count: int) -> None:
    """Trace micro-steps ``first`` .. ``first + count - 1`` of ``engine`` (0-based) with torch.profiler.

    Wraps ``engine.step`` (called after each micro-batch's backward): the profiler starts after step
    ``first - 1`` and stops after step ``first + count - 1``, so the trace holds whole steps with the
    trainer loop between them (data, hooks, logging). Writes ``profile-<label>.txt``: the GPU time per
    kind of kernel, the GPU idle time (wall minus kernels: host gaps) and torch's kernel table.
    """
    import time

    import torch

    original = engine.step
    calls = {"n": 0}
    state: dict[str, Any] = {}

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == first:
            torch.cuda.synchronize()
            state["prof"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        elif calls["n"] == first + count and "prof" in state:
            torch.cuda.synchronize()
            wall = time.perf_counter() - state["t0"]
            prof = state.pop("prof")
            prof.__exit__(None, None, None)
            _write_profile(prof, wall, count, folder / f"profile-{label}.txt")
        return out

    engine.step = step


def _write_profile(prof: Any, wall: float, steps: int, path: Path) -> None:
    kinds: dict[str, float] = {}
    kernel_us = 0.0
    for event in prof.events():
        if "CUDA" not in str(getattr(event, "device_type", "")):  # kernels, memcpy, memset: the GPU's own events
            continue
        us = float(event.time_range.elapsed_us())
        kernel_us += us
        kind = next((k for k, rx in KERNEL_KINDS if rx.search(event.name)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    per_step = 1e3 * wall / steps
    lines = [f"{steps} steps traced; wall {per_step:.1f} ms/step, GPU kernels {kernel_us / 1e3 / steps:.1f} ms/step, "
             f"GPU idle (host gaps) {per_step - kernel_us / 1e3 / steps:.1f} ms/step (profiler overhead included)", ""]
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {kind:40s} {us / 1e3 / steps:8.1f} ms/step")
    lines += ["", prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=70)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: len(kinds) + 3]), flush=True)


def _compiled_graphs() -> int | None:
    """Graphs torch.compile built in this process (each recompile adds one); None if dynamo never ran."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return None
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def job_manifest(model_dir: Path, data: Path, shape: wl.Shape, method: str, *, steps: int, log_every: int,
                 cuda: bool, name: str, variant: str = "default") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"source": str(model_dir)},
        "data": {"datasets": [{"name": "bench", "source": str(data), "format": "text"}]},
        "training": {
            "maxSteps": steps, "microBatchSize": shape.micro_batch, "maxSeqLength": shape.seq_len,
            "packing": True, "precision": "bf16" if cuda else "fp32", "learningRate": wl.LEARNING_RATE,
            "lrScheduler": "constant", "warmupSteps": 0, "logEverySteps": log_every,
        },
        "deepspeed": {"zeroStage": 2},
        "checkpointing": {"resume": False},
    }
    if variant == "deepspeed":
        spec["deepspeed"]["engine"] = "deepspeed"
    elif variant == "budget":
        spec["training"]["packingMaxExamples"] = shape.micro_batch
    elif variant == "buffers":  # the fused engine's step before the one-pass kernel (engines._build_fused)
        os.environ["KUBETUNE_FUSED_UPDATE"] = "buffers"
    elif variant == "saveall":  # torch.compile's default partitioning: elementwise results saved, not recomputed
        os.environ["KUBETUNE_COMPILE_SAVE_ALL"] = "1"
    elif variant == "fp8":  # float8 linear layers (torchao); the API wants the GPU it needs declared
        spec["training"]["precision"] = "fp8"
        spec["resources"] = {"gpusPerNode": 1}
    elif variant != "default":
        raise ValueError(f"variant: must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if method == "lora":
        spec["peft"] = {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targetModules": list(wl.LORA_TARGETS)}
    _merge(spec, json.loads(os.environ.get("KUBETUNE_BENCH_SPEC", "{}")))
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}


def run(workload: str, method: str, *, steps: int, warmup: int, device: str, tiny: bool, seed: int = 0,
        workdir: str | None = None, variant: str = "default", **_: Any) -> dict[str, Any]:
    from kubetune.api import parse_job
    from kubetune.trainer import training
    from kubetune.trainer.running import RunOptions, RunPaths
    from kubetune.trainer.running import run as run_job

    shape = wl.shape_for(tiny)
    cuda = device.startswith("cuda")
    if not cuda:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks the GPU whenever it sees one
    root = Path(workdir or os.environ.get("KUBETUNE_BENCH_WORKDIR", "/tmp/kubetune-bench"))
    root.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(root, shape, cuda)
    # Warm-up is one log interval; the timed steps are whole intervals of the same size.
    log_every = max(1, warmup)
    timed = -(-steps // log_every) * log_every
    total = log_every + timed
    profile_dir = os.environ.get("KUBETUNE_BENCH_PROFILE")
    if profile_dir and cuda:  # one more log interval after the timed ones, its last two steps traced
        total += log_every
    per_step = shape.token_budget // (shape.seq_len if workload == "fixed" else 150 * shape.seq_len // wl.SEQ_LEN)
    if variant == "budget":
        per_step = shape.micro_batch
    lengths = wl.lengths_for(workload, shape, per_step * (total + 4), seed=seed)
    run_dir = root / f"run-{workload}-{method}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    data = write_dataset(run_dir / "data.jsonl", lengths, shape.vocab, seed)
    job = parse_job(job_manifest(model_dir, data, shape, method, steps=total, log_every=log_every, cuda=cuda,
                                 name=f"bench-{workload}-{method}", variant=variant))
    paths = RunPaths(base_dir=run_dir, output_dir=run_dir / "output", checkpoint_dir=run_dir / "checkpoints", run_dir=run_dir)

    # Not training steps: the final checkpoint and the export (see the module doc).
    training.Trainer.save_checkpoint = lambda self: paths.checkpoint_dir  # type: ignore[method-assign]
    training.Trainer._export = lambda self: paths.output_dir  # type: ignore[method-assign]
    from kubetune.trainer import engines

    if os.environ.get("KUBETUNE_BENCH_OVERFLOW_SCAN") == "1":  # A/B: DeepSpeed's own per-tensor scan
        engines.use_norm_overflow_check = lambda engine: False
    kernel = {}
    original_build = training.build_engine  # the name the trainer calls

    def build_engine(*args: Any, **kwargs: Any) -> Any:
        engine = original_build(*args, **kwargs)
        kernel["update"] = getattr(getattr(engine, "optimizer", None), "kernel", None)
        if profile_dir and cuda:
            label = f"{variant}-{workload}-{method}-{os.environ.get('KUBETUNE_BENCH_LABEL', os.getpid())}"
            profile_engine(engine, Path(profile_dir), label, first=total - 2, count=2)
        return engine

    training.build_engine = build_engine  # type: ignore[assignment]
    code = run_job(job, paths, RunOptions(local=True, progress=False))
    if code != 0:
        raise RuntimeError(f"the trainer exited with {code}")
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    records = [json.loads(line) for line in (paths.output_dir / "trainer_log.jsonl").read_text().splitlines() if line]
    windows = [r for r in records if log_every < r["step"] <= log_every + timed]  # not the profiled interval
    tokens = sum(r["window_tokens"] for r in windows)
    examples = sum(r.get("window_examples", 0) for r in windows)
    seconds = sum(r["window_seconds"] for r in windows)
    # FLOPs: 6N/4N per token plus attention for the workload's documents (the mean attended
    # context per token of the written dataset; exact for fixed-length data). The same count for
    # fp8, against the same bf16 peak (wl.PEAK_FLOPS): fp8 MFU is comparable with bf16 MFU.
    arr = np.asarray(lengths, dtype=np.float64)
    per_token_attention = float((arr * (arr + 1) / 2).sum() / arr.sum())
    flops = tokens * ((6 if method == "full" else 4) * wl.n_params(shape)
                      + 12 * shape.layers * shape.hidden * per_token_attention)
    side = "kubetune" if variant == "default" else f"kubetune-{variant}"
    return {
        "side": side, "workload": workload, "method": method, "steps": timed, "gpus": int(os.environ.get("WORLD_SIZE", "1")),
        "engine": engines.LAST_ENGINE_KIND, "update": kernel.get("update"), "label": os.environ.get("KUBETUNE_BENCH_LABEL"),
        "documents_per_step": examples / timed if timed else None,
        "losses": [r["loss"] for r in records], "loss_steps": [r["step"] for r in records],
        # Every log window's rate, warm-up included: a window that recompiled shows here (packing budget).
        "window_tokens_per_s": [r["window_tokens"] / r["window_seconds"] if r.get("window_seconds") else None
                                for r in records],
        "compiled_graphs": _compiled_graphs(),
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None,
        # The trainer's tokens count every rank; MFU is per GPU.
        "mfu": wl.mfu(flops / int(os.environ.get("WORLD_SIZE", "1")), seconds) if seconds else None, "final_loss": records[-1]["loss"],
        "peak_mem_gib": records[-1].get("gpu_peak_memory_gib"), "precision": job.spec.training.precision,
        "setup": ("product Trainer (kubetune.trainer.training) from a FineTuneJob: packing 16,384 tokens, "
                  f"{job.spec.training.precision}, engine {engines.LAST_ENGINE_KIND}, ZeRO stage {job.spec.deepspeed.zero_stage}, "
                  f"packingMaxExamples {job.spec.training.packing_max_examples}, compile {job.spec.training.compile} (unset = auto), "
                  f"{timed} timed steps after {log_every} warm-up, from trainer_log.jsonl"),
    }
