"""The trainer: one FineTuneJob manifest in, a trained model out — in a pod or on a laptop.

Entry points: ``python -m kubetune.trainer --config job.json`` (``__main__``, what the operator's
pods run) and ``kubetune train -f job.yaml`` (``local``); both end in ``running.run``, which builds
one ``training.Trainer`` per process. The modules, in the order a run meets them:

==============  ==================================================================================
sources         model/data source strings (hf://, pvc://, pkg://, paths) → local folders
reading         dataset files, saved datasets and hub datasets → raw rows (errors name file + row)
encoding        rows → examples (per format) → token features (per head); prompt templates
batching        epoch order, sharding across ranks, padding collator
packing         padding-free packed micro-batches (training.packing)
models          tokenizer, pretrained model under the task head, PEFT wrapping, QLoRA check
attention       document-isolated attention for packed batches
kernels         fused/chunked causal-LM cross-entropy (packed batches)
distributing    the process group (fast rendezvous, in-memory for one process) and all-reduce
optimizing      the torch optimizer and the LR schedule from spec.training
engines         which engine (fused single-GPU or DeepSpeed) and the DeepSpeed config derived from the spec
fused_engine    one bf16 GPU process without DeepSpeed: fp32 masters, fused AdamW
float8          training.precision fp8: torchao's float8 linear layers, which layers, refusals
resharding      a checkpoint resumed on another number of processes (DeepSpeed universal form)
grouping        splitting optimizer parameter groups by a parameter-name predicate (for plugins)
losses          cross-entropy pieces shared by the loop and the plugins (hard loss, alignment)
weights         reading start weights from a checkpoint, an export or an adapter
buckets         s3:// sources and output (boto3)
previewing      the first training examples as the model will read them (kubetune validate --preview)
fetching        remote sources (s3://, hf://) fetched once per job into a cache (init container, local runs)
training        the loop and the technique hook call points
evaluating      eval loss/perplexity/accuracy/F1/exact match, all ranks
checkpoints     atomic checkpoints, rotation, best, resume
exporting       final model/adapter (safetensors), merge, tokenizer, model card
reporting       progress/checkpoints/end → FineTuneJob status (cluster) or status.json + terminal
progressing     the trainer-owned status, accumulated and bounded (what reporting records into)
publishing      that status to the API server (throttled, retried with tenacity) or status.json
showing         progress lines and the terminal progress bar
techniques      the technique plugins and their interface (``techniques.base``)
==============  ==================================================================================
"""
