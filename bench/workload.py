"""The fixed GPU throughput workload of issue 8, shared by the baseline and the kubetune side.

Model: Llama-3.2-1B shape (vocab 128256, hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, tied embeddings), random init from config, bf16. Data: random token ids with
either fixed lengths (2048 tokens, micro-batch 8) or instruction-like lengths (log-normal, median 300,
sigma 0.9, clipped to [16, 2048]). Tokens are drawn from a Zipf distribution (exponent 1.1, ranks
shuffled over the vocabulary by a fixed permutation; entropy ~6.8 nats at this vocabulary) and every
side trains at ``LEARNING_RATE``: the random-init model starts near ln(vocab) and learns the unigram
frequencies within the bench's dozen steps, so the sides' loss curves fall and can be compared (on
uniform tokens the loss stayed flat at ~12.17, which showed little). Speed does not depend on the ids. Methods: full fine-tuning, or LoRA r=16 alpha=32 on every linear
layer of the decoder. ``tiny=True`` swaps in a 2-layer, hidden-64 model for CPU dry runs.

MFU counts FLOPs per real token as 6N (full) or 4N (frozen base, LoRA) with N every parameter of
the model (tied embedding counted once: its lm_head matmul is real work), plus attention:
12 * layers * hidden * (mean attended context) for forward+backward, the context of token i of a
causal document being i+1. Peak bf16 dense: 989 TFLOP/s (H100 SXM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PEAK_FLOPS = 989e12
SEQ_LEN = 2048
MICRO_BATCH = 8
TOKEN_BUDGET = SEQ_LEN * MICRO_BATCH  # kubetune packs this many tokens per micro-batch
WORKLOADS = ("fixed", "instruct")
METHODS = ("full", "lora")
LEARNING_RATE = 1e-4  # every side, constant schedule
ZIPF_EXPONENT = 1.1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq_len: int
    micro_batch: int

    @property
    def token_budget(self) -> int:
        return self.seq_len * self.micro_batch


LLAMA_1B = Shape(128256, 2048, 16, 32, 8, 8192, SEQ_LEN, MICRO_BATCH)
TINY = Shape(1024, 64, 2, 4, 2, 128, 256, 4)


def shape_for(tiny: bool) -> Shape:
    return TINY if tiny else LLAMA_1B


def llama_config(shape: Shape, attn_implementation: str = "sdpa"):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=max(shape.seq_len, 2048),
        tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5,
        attn_implementation=attn_implementation, use_cache=False,
    )


def build_model(shape: Shape, method: str, device: str, attn_implementation: str = "sdpa", seed: int = 0):
    """Random-init bf16 (fp32 on CPU) Llama of ``shape``; LoRA adapters added for ``method='lora'``."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = llama_config(shape, attn_implementation)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    elif method != "full":
        raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    return model


def lengths_for(workload: str, shape: Shape, n: int, seed: int = 0) -> list[int]:
    """Document lengths of the workload: fixed ``seq_len``, or log-normal instruction-like."""
    if workload == "fixed":
        return [shape.seq_len] * n
    if workload == "instruct":
        rng = np.random.default_rng(seed)
        median = 300 * shape.seq_len / SEQ_LEN
        lo = max(2, 16 * shape.seq_len // SEQ_LEN)
        raw = rng.lognormal(mean=math.log(median), sigma=0.9, size=n)
        return np.clip(np.round(raw), lo, shape.seq_len).astype(int).tolist()
    raise ValueError(f"workload: must be one of {', '.join(WORKLOADS)}, got {workload!r}")


FIRST_ID = 2  # ids 0 and 1 are the kubetune side's tokenizer specials (eos, unk): no side draws them


def token_ids(rng: np.random.Generator, n: int, vocab: int, low: int = FIRST_ID) -> np.ndarray:
    """``n`` ids in ``[low, vocab)``: Zipf ranks (resampled while past the range) mapped through a
    permutation fixed by the vocabulary size, so frequent ids are spread over the table. Every side
    draws through here with the same ``low``, so they train on one distribution over the same ids
    (the random-init model's loss on it depends on which ids are the frequent ones)."""
    span = vocab - low
    ranks = rng.zipf(ZIPF_EXPONENT, size=n) - 1
    while (over := ranks >= span).any():
        ranks[over] = rng.zipf(ZIPF_EXPONENT, size=int(over.sum())) - 1
    order = np.random.default_rng(span).permutation(span)
    return order[ranks] + low


EOS_ID = 0  # the kubetune side's tokenizer appends it to every document; the stock sides' examples end with it too


def examples_for(lengths: list[int], vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Zipf-token examples of ``lengths`` tokens, the last one ``EOS_ID`` (``input_ids`` = ``labels``:
    every token is a target), the documents the kubetune side's tokenizer makes of its text."""
    rng = np.random.default_rng(seed + 1)
    return [{"input_ids": token_ids(rng, n - 1, vocab).tolist() + [EOS_ID]} for n in lengths]


def n_params(shape: Shape) -> int:
    """Parameters of the base model (tied embedding once)."""
    d, f, v = shape.hidden, shape.intermediate, shape.vocab
    kv = d // shape.heads * shape.kv_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    return v * d + shape.layers * per_layer + d


def flops_for_documents(shape: Shape, method: str, lengths: list[int]) -> float:
    """Training FLOPs (forward + backward) for documents of ``lengths`` (real tokens only)."""
    per_token = (6 if method == "full" else 4) * n_params(shape)
    tokens = sum(lengths)
    # sum over tokens of (position + 1) = s(s+1)/2 attended keys per causal document
    attended = sum(s * (s + 1) / 2 for s in lengths)
    return per_token * tokens + 12 * shape.layers * shape.hidden * attended


def mfu(flops: float, seconds: float) -> float:
    return flops / seconds / PEAK_FLOPS
