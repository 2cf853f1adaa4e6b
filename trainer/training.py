"""The training loop: one readable recipe from a validated FineTuneJob to a trained model.

Called by :func:`kubetune.trainer.running.run` (pods and ``kubetune train`` alike), one instance per
process. :class:`Trainer` follows torchtune's recipe shape — ``setup()``, ``train()``,
``save_checkpoint()``, ``cleanup()`` — and calls the technique plugins' hooks at the points listed
in ``kubetune.trainer.techniques.base`` (which is the documentation plugins rely on):

setup
    seed → process group (gloo on CPU) → the latest checkpoint's batch shape (kept on another number
    of processes, :mod:`kubetune.trainer.resharding`) → tokenizer → context (``on_setup``) → examples
    (``transform_examples``) → labels → encode → model with head and PEFT → ``start_weights`` →
    ``prepare_model`` → ``param_groups`` → DeepSpeed engine → resume from the latest checkpoint, if any
    (through DeepSpeed's universal form when it was taken on another number of processes).
train
    an evaluation before training on a fresh run; then micro-batches in epoch order
    (``order_batches``, ``augment``), forward, ``compute_loss``, ``engine.backward``/``engine.step``;
    after each optimizer step ``on_step_end``, progress every ``training.logEverySteps``,
    evaluation (``on_evaluate``) every ``data.eval.everySteps`` or at epoch ends, a checkpoint
    every ``checkpointing.everySteps``; a SIGTERM makes every rank checkpoint at the next optimizer
    step and exit (:class:`Terminated`); at the end a last evaluation, checkpoint, each technique's
    one line on what it did (``describe``), and the export.

Steps are optimizer steps. The total is ``training.maxSteps``, else ``epochs`` × micro-batches per
epoch ÷ accumulation (rounded up), and a resumed run continues the count until exactly that total.
Rank 0 writes TensorBoard events to ``<output>/tensorboard`` and one JSON line per log interval to
``<output>/trainer_log.jsonl`` (appended across restarts, so a resumed run continues the curve).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import torch

from kubetune.api.statuses import EARLY_STOP_PREFIX
from kubetune.trainer import checkpoints, compiling, resharding
from kubetune.trainer.batching import Collator, EncodedDataset, epoch_order, micro_batches, model_inputs, shard, weighted_dataset_order
from kubetune.trainer.encoding import Encoder, label_names, load_examples
from kubetune.trainer.distributing import all_reduce, init_distributed
from kubetune.trainer.engines import build_engine, resolve_precision
from kubetune.trainer.optimizing import default_param_groups
from kubetune.trainer.fingerprinting import run_length, training_spec
from kubetune.trainer.running import RunOptions, RunPaths, make_run_reporter
from kubetune.trainer.techniques.base import TechniqueContext, enabled_techniques

log = logging.getLogger("kubetune.trainer")


class Terminated(Exception):
    """Raised after the SIGTERM (or Ctrl-C) checkpoint; the process exits with 143 (130 for Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGTERM, step: int = 0) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step = signum, step


class Trainer:
    """One process of a training run (see the module doc)."""

    def __init__(self, job: Any, paths: RunPaths, options: RunOptions) -> None:
        self.job = job
        self.paths = paths
        self.options = options
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.on_gpu = torch.cuda.is_available()
        # Settings left to the trainer are decided once, here, so every module and plugin reads
        # the same concrete values (packing is on by default for safe GPU runs of a causal LM).
        packing = job.spec.packing_enabled(self.on_gpu)
        self.spec = job.spec.model_copy(update={"training": job.spec.training.model_copy(update={"packing": packing})})
        self.device = torch.device(f"cuda:{self.local_rank}" if self.on_gpu else "cpu")
        self.reporter: Any = None
        self.writer: Any = None
        self.engine: Any = None
        self.step = 0
        self.epoch = 0
        self.offset = 0  # micro-batches of the current epoch already trained
        self.metrics: dict[str, float] = {}
        self.metrics_step = -1
        self.terminate_requested = False
        self.terminate_signal: int = signal.SIGTERM
        self.resumed_from: Path | None = None
        self.initial_metrics: dict[str, float] | None = None
        self._first_epoch: tuple[int, list[list[int]]] | None = None
        self.technique_lines: list[str] = []

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        spec = self.spec
        seed = spec.training.seed
        random.seed(seed)
        torch.manual_seed(seed)
        if self.on_gpu:
            torch.cuda.set_device(self.local_rank)
        init_distributed(self.on_gpu)
        spec = self.spec = self._resume_batch_shape(spec)
        self.precision = resolve_precision(spec, self.on_gpu)
        t = spec.training
        modes = compiling.length_modes()  # a bad KUBETUNE_COMPILE_LENGTH fails every run, not only budget ones
        self.length_modes = modes if t.packing and t.packing_max_examples is not None else frozenset()
        self.buckets = (compiling.bucket_lengths(t.micro_batch_size * t.max_seq_length)
                        if "buckets" in self.length_modes else None)
        self.reporter = make_run_reporter(self.job, self.rank, self.options.local, self.paths.run_dir, self.options.progress)

        from kubetune.trainer.models import build_model, load_tokenizer

        self.techniques = enabled_techniques(spec)
        self.tokenizer, tokenizer_dir = load_tokenizer(spec, self.paths.base_dir)
        self.ctx = TechniqueContext(
            spec=spec,
            tokenizer=self.tokenizer,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
            base_dir=self.paths.base_dir,
            output_dir=self.paths.output_dir,
            head=spec.head,
            micro_batch_size=spec.training.micro_batch_size,
        )
        for technique in self.techniques:
            technique.on_setup(self.ctx)
        sets = load_examples(spec, self.paths.base_dir)
        train_examples, eval_examples = sets.train, sets.eval
        for technique in self.techniques:
            train_examples = technique.transform_examples(self.ctx, train_examples, "train")
            if eval_examples:
                eval_examples = technique.transform_examples(self.ctx, eval_examples, "eval")
        self.tasks = list(dict.fromkeys(e.get("_task", "") for e in train_examples + eval_examples))
        self.labels = label_names(spec, train_examples + eval_examples)
        self.ctx.labels = self.labels
        self.encoder = Encoder(spec, self.tokenizer, self.labels)
        self.ctx.encode = self.encoder
        self.collate = Collator(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.ctx.collate = self.collate
        augment = self._augment if any(_overrides(t, "augment") for t in self.techniques) else None
        self.train_set = EncodedDataset([self.encoder(e) for e in train_examples], train_examples, augment, seed)
        self.eval_set = EncodedDataset([self.encoder(e) for e in eval_examples], eval_examples) if eval_examples else None
        self.ctx.examples = {"train": train_examples, "eval": eval_examples}
        self.ctx.datasets = {"train": self.train_set, "eval": self.eval_set}

        self.model = build_model(spec, self.paths.base_dir, self.tokenizer, tokenizer_dir, self.labels)
        self.tokenizer_dir = tokenizer_dir
        self.ctx.model = self.model
        for technique in self.techniques:
            technique.start_weights(self.ctx, self.model)
        for technique in self.techniques:
            self.model = technique.prepare_model(self.ctx, self.model)
            self.ctx.model = self.model
        groups = default_param_groups(self.model, spec)
        for technique in self.techniques:
            groups = technique.param_groups(self.ctx, self.model, groups)

        if self.precision == "fp8":  # after the hooks: only layers trainable now go float8
            from kubetune.trainer import float8

            float8.convert(self.model, pad_inner_dim=not float8.tokens_aligned(spec.training))

        self.total_steps = self._total_steps()
        self.ctx.total_steps = self.total_steps
        resume_from = checkpoints.find_latest(self.paths.checkpoint_dir) if spec.checkpointing.resume else None
        self.engine = build_engine(spec, self.model, groups, self.total_steps, self.world_size, self.precision,
                                   on_gpu=self.on_gpu, resume_from=resume_from)
        if self._compile_enabled():
            # Packs capped by examples vary in length: compile for a dynamic length from the start
            # (one graph) rather than static first and dynamic on the second shape (two or three).
            # KUBETUNE_COMPILE_LENGTH picks how (kubetune.trainer.compiling); buckets compile static lengths.
            _compile(self.engine, dynamic=compiling.compile_dynamic(spec.training.packing_max_examples, self.length_modes),
                     length_modes=self.length_modes, buckets=len(self.buckets or ()))
        self.ctx.engine = self.engine
        self.ctx.model = self.engine.module
        self._resume()
        for technique in self.techniques:
            technique.on_train_start(self.ctx)
        if self.rank == 0:
            from kubetune.trainer.models import trainable_parameters

            trainable, total = trainable_parameters(self.engine.module)
            log.info(
                "%s: %s head, peft %s, %d train / %d eval examples, %d processes, %s, %d steps; trainable %s of %s parameters",
                self.job.name, spec.head, spec.peft.method, len(self.train_set), len(self.eval_set or []),
                self.world_size, self.precision, self.total_steps, f"{trainable:,}", f"{total:,}",
            )
            self.paths.output_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # an image without the train extra's tensorboard: train anyway
                log.warning("tensorboard is not installed; no TensorBoard events will be written (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(str(self.paths.output_dir / "tensorboard"), purge_step=self.step or None)

    def _resume_batch_shape(self, spec: Any) -> Any:
        """``spec`` with the micro-batch and accumulation that keep the latest checkpoint's global batch.

        A run resumed on another number of processes (``resources`` changed between attempts)
        continues with the global batch it was trained with, so its schedule, step count and data per
        step stay the same (:func:`kubetune.trainer.resharding.plan_batch`; a count that cannot keep it
        is refused with one line). Without a checkpoint, or on the same count, nothing changes.
        """
        if not spec.checkpointing.resume:
            return spec
        latest = checkpoints.find_latest(self.paths.checkpoint_dir)
        if latest is None:
            return spec
        state = checkpoints.read_state(latest)
        micro, accum = resharding.plan_batch(state, spec, self.world_size, checkpoint=f"checkpoint {latest.name}")
        t = spec.training
        if (micro, accum) == (t.micro_batch_size, t.gradient_accumulation_steps):
            return spec
        if self.rank == 0:
            old_micro, old_accum, saved = resharding.batch_of(state, spec)
            log.info(
                "%s was trained on %d processes (micro-batch %d × accumulation %d); on %d the global batch stays %d: "
                "micro-batch %d × accumulation %d", latest.name, saved, old_micro, old_accum, self.world_size,
                old_micro * old_accum * saved, micro, accum,
            )
        update = {"micro_batch_size": micro, "gradient_accumulation_steps": accum}
        return spec.model_copy(update={"training": t.model_copy(update=update)})

    def _compile_enabled(self) -> bool:
        """``training.compile``; unset, it is on for GPU runs of a packed causal LM (one graph shape)
        and for fp8 runs (float8 casts are fast only when compiled)."""
        t = self.spec.training
        if t.compile is not None:
            return bool(t.compile) and self.on_gpu
        return self.on_gpu and ((t.packing and self.spec.head == "causal-lm") or t.precision == "fp8")

    def _loader(self, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        """Micro-batches ``batches`` (index lists) collated by worker processes into pinned memory.

        On a GPU two workers collate ahead of the training step, so the GPU never waits for the
        host; on CPU (and when a technique's ``augment`` hook must run in this process, where its
        state lives) collation stays in this process.
        """
        augmenting = self.train_set.augment is not None
        workers = 2 if self.on_gpu and not augmenting else 0
        return torch.utils.data.DataLoader(
            self.train_set, batch_sampler=batches, collate_fn=self._collate, num_workers=workers,
            pin_memory=self.on_gpu, prefetch_factor=4 if workers else None,
        )

    def _start_fresh_log(self) -> None:
        """A run that does not resume starts its training log anew (a resumed one appends)."""
        if self.rank == 0:
            (self.paths.output_dir / "trainer_log.jsonl").unlink(missing_ok=True)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _augment(self, item: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        for technique in self.techniques:
            item = technique.augment(self.ctx, item, rng)
        return item

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of example indices) for ``epoch``.

        Epoch 0 is also needed to size the run before training; it is computed once, so
        ``order_batches`` runs exactly once per epoch.
        """
        cached = self._first_epoch
        if cached is not None and cached[0] == epoch:
            self._first_epoch = None
            return cached[1]
        self.ctx.epoch = float(epoch)
        hooked = None
        for technique in self.techniques:
            hooked = technique.order_batches(self.ctx, self.train_set)
            if hooked is not None:
                break
        if hooked is None:  # mixing weights of several datasets apply without any technique
            hooked = weighted_dataset_order(self.spec, self.train_set.examples, epoch)
        order = epoch_order(len(self.train_set), epoch, self.spec.training.seed, self.spec.data.shuffle, hooked)
        t = self.spec.training
        if t.packing:
            from kubetune.trainer.packing import pack_lengths

            lengths = self.train_set.lengths()
            packs = pack_lengths(lengths, t.micro_batch_size * t.max_seq_length, order=order, max_items=t.packing_max_examples)
            if len(packs) < self.world_size:
                packs = (packs * self.world_size)[: self.world_size]
            usable = len(packs) - len(packs) % self.world_size
            return packs[:usable][self.rank :: self.world_size]
        return micro_batches(shard(order, self.rank, self.world_size), t.micro_batch_size)

    def _total_steps(self) -> int:
        t = self.spec.training
        if t.max_steps:
            return t.max_steps
        batches = self._epoch_batches(0)
        self._first_epoch = (0, batches)
        per_epoch = len(batches)
        return max(1, math.ceil((t.epochs or 1.0) * per_epoch / t.gradient_accumulation_steps))

    def _resume(self) -> None:
        root = self.paths.checkpoint_dir
        if self.rank == 0:
            checkpoints.clean_partial(root)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if not self.spec.checkpointing.resume:
            if self.rank == 0 and checkpoints.find_latest(root) is not None:
                log.warning("checkpointing.resume is off: removing the checkpoints of an earlier attempt in %s", root)
                checkpoints.remove_all(root)
            self._start_fresh_log()
            return
        latest = checkpoints.find_latest(root)
        if latest is None:
            self._start_fresh_log()
            return
        state = self._load_checkpoint(latest)
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        offset = int(state["offset"])
        saved = resharding.saved_world_size(state, self.world_size)
        if saved != self.world_size:
            offset = resharding.map_offset(offset, state, self.spec, self.world_size, self.spec.training.micro_batch_size)
        self.offset = offset
        self.metrics = state.get("metrics") or {}
        self.resumed_from = latest
        self.ctx.step = self.step
        moved = f", resharded from {saved} to {self.world_size} processes" if saved != self.world_size else ""
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d%s)", latest, self.step, self.epoch, self.offset, moved)

    def _load_checkpoint(self, path: Path, weights_only: bool = False) -> dict[str, Any]:
        """Restore the engine (and, unless ``weights_only``, optimizer, scheduler, RNG) from ``path``;
        a checkpoint of another world size goes through DeepSpeed's universal form
        (:mod:`kubetune.trainer.resharding`)."""
        state = checkpoints.read_state(path)
        if not resharding.needs_universal(path, state, self.world_size):
            state = checkpoints.load(self.engine, path, rank=self.rank, weights_only=weights_only)
            restored = (path / f"rng-{self.rank}.pt").exists()
        else:
            resharding.convert(path, rank=self.rank)
            resharding.load(self.engine, path, weights_only=weights_only)
            restored = not weights_only and checkpoints.restore_rng(path, self.rank)
        if not weights_only and not restored:
            resharding.seed_new_rank(self.spec.training.seed, int(state["step"]), self.rank)
        return state

    # ------------------------------------------------------------------ train

    def train(self) -> str:
        """Run to the end; returns the stop reason (also given to ``reporter.finished``)."""
        spec = self.spec
        t = spec.training
        engine = self.engine
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        # Ctrl-C takes the SIGTERM path: checkpoint at the next step, then exit (130).
        previous_int = signal.signal(signal.SIGINT, self._on_sigterm)
        try:
            ev = spec.data.eval
            eval_every = ev.every_steps if ev is not None else None
            if self.eval_set is not None and self.resumed_from is None:
                self.initial_metrics = self._evaluate()
                if self.rank == 0:
                    log.info("eval before training: %s", _fmt(self.initial_metrics))
            reason = "max-steps" if t.max_steps else "completed"
            # The loss sum stays on the device between log intervals: no host sync per step.
            window_loss: torch.Tensor | float = 0.0
            window_n, window_tokens, window_examples = 0, 0, 0
            window_start = time.monotonic()
            run_start = time.monotonic()
            steps_at_start = self.step
            micro_in_step = 0
            engine.train()
            stop = self.step >= self.total_steps
            while not stop:
                batches = self._epoch_batches(self.epoch)
                self.train_set.epoch = self.epoch
                if not batches:
                    from kubetune.trainer.reading import DataError

                    raise DataError("spec.data: no micro-batch can be formed from the training data")
                loader = iter(self._loader(batches[self.offset :]))
                while self.offset < len(batches) and not stop:
                    batch = next(loader)
                    self.ctx.loss_terms = {}
                    loss, tokens = self._forward(batch)
                    engine.backward(loss)
                    engine.step()
                    self.offset += 1
                    micro_in_step += 1
                    window_loss = window_loss + loss.detach().float()
                    window_n += 1
                    window_tokens += tokens
                    window_examples += len(batch["_index"]) if "_index" in batch else 0
                    if micro_in_step < t.gradient_accumulation_steps:
                        continue
                    micro_in_step = 0
                    self.step += 1
                    self.ctx.step = self.step
                    self.ctx.epoch = self.epoch + self.offset / len(batches)
                    for technique in self.techniques:
                        technique.on_step_end(self.ctx)
                    if self.step % t.log_every_steps == 0 or self.step == self.total_steps:
                        loss_sum = float(window_loss)  # waits for this step's GPU work: the window's time is exact
                        self._log_progress(loss_sum, window_n, window_tokens, time.monotonic() - window_start,
                                           (time.monotonic() - run_start) / max(1, self.step - steps_at_start),
                                           window_examples)
                        window_loss, window_n, window_tokens, window_examples = 0.0, 0, 0, 0
                        window_start = time.monotonic()
                    if eval_every and self.eval_set is not None and self.step % eval_every == 0:
                        self._evaluate()
                    if self.ctx.should_stop:
                        reason = f"{EARLY_STOP_PREFIX}{self.ctx.stop_reason or 'a technique asked to stop'}"
                        stop = True
                    if self.step >= self.total_steps:
                        stop = True
                    every = spec.checkpointing.every_steps
                    if (every and self.step % every == 0 or self.ctx.checkpoint_requested) and not stop:
                        self.save_checkpoint()
                    if self._terminating():
                        self.save_checkpoint()
                        raise Terminated(self.terminate_signal, self.step)
                del loader  # stops its workers before evaluation and the next epoch
                if self.offset >= len(batches):
                    self.epoch += 1
                    self.offset = 0
                    if not eval_every and self.eval_set is not None and not stop:
                        self._evaluate()
                        if self.ctx.should_stop:
                            reason = f"{EARLY_STOP_PREFIX}{self.ctx.stop_reason or 'a technique asked to stop'}"
                            stop = True
                        if self.ctx.checkpoint_requested and not stop:
                            self.save_checkpoint()
            if self.eval_set is not None and self.metrics_step != self.step:
                self._evaluate()
            self.save_checkpoint()
            self._say_what_techniques_did()
            output: Path | str = self._export()
            if self.rank == 0 and (spec.output.path or "").startswith("s3://"):
                from kubetune.trainer.buckets import upload_output

                output = upload_output(Path(output), spec.output.path)
            if self.rank == 0:
                if self.initial_metrics is not None:
                    log.info("eval before training: %s", _fmt(self.initial_metrics))
                if self.eval_set is not None:
                    log.info("eval after training:  %s", _fmt(self.metrics))
                log.info("finished (%s) after %d steps; model written to %s", reason, self.step, output)
            self.reporter.finished(str(output), reason)
            return reason
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)

    def _say_what_techniques_did(self) -> list[str]:
        """Each enabled technique's line on what it did (its ``describe`` hook), under one header.

        Printed once, by rank 0, when training ends: in the terminal of a local run and in the
        pod's log. Returns the lines (tests read them).
        """
        lines = []
        for technique in self.techniques:
            said = technique.describe(self.ctx)
            if said:
                lines.append(f"  {technique.name}: {said}")
        if self.rank == 0 and lines:
            log.info("techniques:\n%s", "\n".join(lines))
        self.technique_lines = lines
        return lines

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.spec.training.packing:
            return self.collate(items)
        from kubetune.trainer.packing import PackedCollator

        t = self.spec.training
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if t.packing_max_examples is None:
            batch = PackedCollator(t.micro_batch_size * t.max_seq_length, pad_token_id=pad)(items)
        elif self.buckets:  # KUBETUNE_COMPILE_LENGTH=buckets: a few static lengths (kubetune.trainer.compiling)
            tokens = sum(len(it["input_ids"]) for it in items)
            batch = PackedCollator(compiling.bucket_for(tokens, self.buckets), pad_token_id=pad)(items)
        else:
            # Packs capped by examples are mostly short of the token budget: pad them only to a
            # multiple of 256 tokens (a handful of shapes; torch.compile turns the length dynamic).
            batch = PackedCollator(None, pad_token_id=pad, pad_to_multiple_of=compiling.PAD_MULTIPLE)(items)
        batch["_index"] = torch.tensor([it["_index"] for it in items])
        batch["_task"] = [it.get("_task", "") for it in items]
        return batch

    def _forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Loss of one training micro-batch (after the compute_loss hooks) and its real token count."""
        if self.spec.training.packing:
            from kubetune.trainer.kernels import causal_lm_loss
            from kubetune.trainer.packing import model_inputs as packed_inputs

            outputs = None
            loss = causal_lm_loss(self.engine.module, **packed_inputs(batch, self.device))
            tokens = int(batch["num_tokens"])
        else:
            inputs = model_inputs(batch, self.device)
            outputs = self.engine(**inputs)
            loss = outputs.loss
            tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        for technique in self.techniques:
            loss = technique.compute_loss(self.ctx, self.engine.module, batch, outputs, loss)
        return loss, tokens

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.terminate_requested = True
        self.terminate_signal = signum

    def _terminating(self) -> bool:
        """Whether any rank got SIGTERM (all ranks agree, so they checkpoint at the same step)."""
        flag = torch.tensor([1.0 if self.terminate_requested else 0.0])
        if self.world_size > 1:
            flag = all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _log_progress(self, loss_sum: float, n: int, tokens: int, elapsed: float, seconds_per_step: float,
                      examples: int = 0) -> None:
        stats = torch.tensor([loss_sum, float(n), float(tokens), float(examples)], dtype=torch.float64)
        if self.world_size > 1:
            stats = all_reduce(stats)
        loss = float(stats[0] / max(stats[1], 1))
        lr = float(self.engine.get_lr()[0]) if self.engine.get_lr() else 0.0
        progress = {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": round(float(self.ctx.epoch), 4),
            "percent": round(100.0 * self.step / self.total_steps, 2),
            "loss": loss,
            "learning_rate": lr,
            "tokens_per_second": float(stats[2]) / elapsed if elapsed > 0 else None,
            "eta_seconds": round(seconds_per_step * (self.total_steps - self.step), 1),
        }
        if self.metrics:
            progress["eval_loss"] = self.metrics.get("eval_loss")
            progress["metrics"] = dict(self.metrics)
            progress["eval_step"] = self.metrics_step  # so a step line never passes them off as new
        if self.ctx.loss_terms:
            progress["loss_terms"] = dict(self.ctx.loss_terms)
        self.reporter.progress(progress)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.step)
            self.writer.add_scalar("train/learning_rate", lr, self.step)
            if progress["tokens_per_second"]:
                self.writer.add_scalar("train/tokens_per_second", progress["tokens_per_second"], self.step)
            for name, value in self.ctx.loss_terms.items():
                self.writer.add_scalar(f"train/{name}", value, self.step)
        if self.rank == 0:
            # The log line also keeps the window's own numbers, so throughput can be summed exactly.
            record = dict(progress, window_tokens=int(stats[2]), window_examples=int(stats[3]), window_seconds=round(elapsed, 6))
            if self.on_gpu:
                record["gpu_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
            with (self.paths.output_dir / "trainer_log.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _evaluate(self) -> dict[str, float]:
        # Imported here, not with this module: torchmetrics (and the scipy it loads) costs about 1.5 s
        # of CPU at every process start, and runs without an eval split never need it.
        from kubetune.trainer.evaluating import evaluate

        assert self.eval_set is not None
        metrics = evaluate(
            self.engine, self.eval_set, self.collate, head=self.spec.head,
            micro_batch_size=self.spec.training.micro_batch_size, rank=self.rank, world_size=self.world_size,
            device=self.device, num_labels=len(self.labels or []), labels=self.labels, tasks=self.tasks,
        )
        self.metrics = metrics
        self.metrics_step = self.step
        self.ctx.metrics = metrics
        for technique in self.techniques:
            technique.on_evaluate(self.ctx, metrics)
        self.reporter.evaluated(dict(metrics), self.step)
        if self.options.after_evaluation is not None and self.step > 0:
            reason = self.options.after_evaluation(self.step, dict(metrics))
            if reason:
                self.ctx.should_stop, self.ctx.stop_reason = True, reason
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name if "/" in name else f"eval/{name[len('eval_'):] if name.startswith('eval_') else name}", value, self.step)
        return metrics

    # ------------------------------------------------------------------ checkpoints and output

    def save_checkpoint(self) -> Path:
        """A checkpoint of the current step on every rank; reported by rank 0."""
        c = self.spec.checkpointing
        metrics = self.metrics if self.metrics_step == self.step else {}
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "offset": self.offset,
            "world_size": self.world_size,
            # The batch shape this run trains with (kept across a change of process count).
            "micro_batch_size": self.spec.training.micro_batch_size,
            "gradient_accumulation_steps": self.spec.training.gradient_accumulation_steps,
            "total_steps": self.total_steps,
            "metrics": metrics,
            "job": self.job.name,
            "spec": training_spec(self.job),  # a rerun of an edited manifest is refused, not resumed
            "length": run_length(self.job),
        }
        self.ctx.checkpoint_requested = False
        path, best, deleted = checkpoints.save(
            self.engine, self.paths.checkpoint_dir, state, rank=self.rank, keep_last=c.keep_last,
            keep_best=c.keep_best, metric=c.metric, mode=c.mode,
        )
        self.reporter.checkpoint(self.step, str(path), metrics or None, best=best)
        for gone in deleted:
            self.reporter.checkpoint_removed(str(gone))
        return path

    def _export(self) -> Path:
        from kubetune.trainer.exporting import export

        spec = self.spec
        best = checkpoints.read_best(self.paths.checkpoint_dir) if spec.output.export_best and spec.checkpointing.keep_best else None
        metrics = self.metrics
        if best is not None and int(best["step"]) != self.step:
            best_dir = self.paths.checkpoint_dir / best["name"]
            if best_dir.exists():
                log.info("exporting the best checkpoint (%s %s = %.4g) rather than the last", best["name"], best["metric"], best["value"])
                state = self._load_checkpoint(best_dir, weights_only=True)
                metrics = state.get("metrics") or metrics
        return export(
            self.engine.module, self.tokenizer, self.paths.output_dir, job=self.job, rank=self.rank,
            zero_stage=spec.deepspeed.zero_stage, metrics=metrics, rebuild=self._rebuild_on_cpu,
        )

    def _rebuild_on_cpu(self) -> Any:
        from kubetune.trainer.models import build_model

        return build_model(self.spec, self.paths.base_dir, self.tokenizer, self.tokenizer_dir, self.labels)

    def cleanup(self, succeeded: bool = True) -> None:
        """Close writers and the process group (a barrier first only when every rank got here)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        close = getattr(self.reporter, "close", None)
        if close is not None:
            close()
        # A single local process keeps its (one-member) process group: DeepSpeed caches groups
        # module-wide, and a later run in the same process (tests, notebooks) reuses it.
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            try:
                if succeeded:
                    torch.distributed.barrier()
            finally:
                torch.distributed.destroy_process_group()


def _compile(engine: Any, dynamic: bool | None = None, length_modes: frozenset[str] = frozenset(), buckets: int = 0) -> None:
    """``torch.compile`` each decoder layer (one graph, reused by every layer), else the whole model.

    Per layer keeps the packed attention call (whose boundaries change every batch) and the fused
    loss outside the graphs, and compiles in seconds however deep the model is. ``dynamic=True``
    for micro-batches whose length varies (``training.packingMaxExamples``): by default torch
    compiles the first length statically and recompiles on the second, and further guards on the
    length can add a third graph; a tiny Llama's layers on CPU, 12 packs of 8 documents, compiled
    3 graphs in 121 s by default and 2 in 32 s with ``dynamic=True``.

    The graphs recompute their elementwise results in backward instead of saving them
    (:func:`recompute_elementwise_in_backward`); ``KUBETUNE_COMPILE_SAVE_ALL=1`` keeps torch's
    default (A/B runs: bench side ``kubetune-saveall``). ``length_modes`` (``KUBETUNE_COMPILE_LENGTH``,
    :mod:`kubetune.trainer.compiling`) keep Inductor from guarding on ranges of the varying length.
    """
    compiling.prepare_layers(length_modes, buckets=buckets)
    if os.environ.get("KUBETUNE_COMPILE_SAVE_ALL", "") != "1":
        recompute_elementwise_in_backward()
    _tangents_like_outputs()
    model = engine.module
    get_decoder = getattr(model, "get_decoder", None)
    layers = getattr(get_decoder(), "layers", None) if callable(get_decoder) else None
    if isinstance(layers, torch.nn.ModuleList) and len(layers):
        for layer in layers:
            layer.compile(dynamic=dynamic)
            if "unbacked" in length_modes:
                compiling.wrap_layer(layer)
    elif dynamic is None:
        engine.compile()
    else:  # DeepSpeed's engine.compile takes its own arguments; the module's takes torch.compile's
        engine.module.compile(dynamic=dynamic)


def recompute_elementwise_in_backward() -> None:
    """Let torch.compile's partitioner recompute elementwise results in backward that a matrix
    product reads there (torch's ``ban_recompute_materialized_backward``, on by default, saves them).

    In a Llama layer those are ``silu(gate) * up`` (the down projection's input, 16 KiB per token
    in bf16 at the 1B shape) and the post-attention RMSNorm's output (4 KiB): both are recomputed
    from tensors backward keeps anyway (gate, up; the residual and its 1/rms), in the fused kernels
    backward runs anyway. Measured on CPU with saved-tensor hooks, one compiled layer at the
    Llama-3.2-1B shape: 74.4 KiB saved per token by default, 54.4 KiB with this; at 16,384 tokens
    per micro-batch and 16 layers, 5 GiB less at the peak (bench/README.md, "Peak memory").
    Process-wide (torch's config is global), read when a graph is compiled; set before any.
    """
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "ban_recompute_materialized_backward"):
        functorch_config.ban_recompute_materialized_backward = False


def _tangents_like_outputs() -> None:
    """Have AOTAutograd expect each incoming gradient laid out like its forward output.

    The packed attention call is kept out of the compiled graphs (:mod:`kubetune.trainer.attention`),
    so each layer's graph ends with q/k/v as transformers shapes them ([B, H, S, D] views of
    token-major projections) and their gradients come back in that same layout. Where torch guesses
    gradients contiguous (``torch._functorch.config.guess_tangent_strides_as_outputs`` off: torch
    2.11's default), it copies each of them before the compiled backward: 3 per layer, 48 copies and
    ~2.5 ms per step of a 16-layer 1B model on an H100 (bench/README.md). Guessing "like the output"
    (torch 2.13's default outside fbcode) needs no copy: on CPU, with 2.11's guess emulated, a tiny
    Llama's compiled layers make 3 copies per layer without it and none with it
    (tests/trainer/test_speed_paths.py). On by default: an H100 A/B (2026-12-07, bench/README.md)
    gave the fixed-length step +1.0% alone and +3.8% with the larger loss chunks (kernels.py), with
    the same losses and peak memory; ``KUBETUNE_COMPILE_TANGENTS=torch`` leaves torch's own setting.
    Dynamic shapes still get the contiguous guess (torch's rule).
    """
    if os.environ.get("KUBETUNE_COMPILE_TANGENTS", "outputs") != "outputs":
        return
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "guess_tangent_strides_as_outputs"):
        functorch_config.guess_tangent_strides_as_outputs = True


def _overrides(technique: Any, hook: str) -> bool:
    from kubetune.trainer.techniques.base import Technique

    return getattr(type(technique), hook) is not getattr(Technique, hook)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
