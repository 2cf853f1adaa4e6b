"""The padding-free baseline is a fair one: transformers keeps the flattened documents apart.

``bench/baseline_hf.py``'s ``flat`` variant feeds ``DataCollatorWithFlattening`` batches (documents
end to end in one row, ``position_ids`` restarting at 0, no attention mask) to a model with SDPA
attention. If transformers let a document attend to the one before it, the baseline would do
less work than a real padding-free trainer and its loss would be wrong; here the loss of one
flattened row equals the token-weighted loss of each document run alone. transformers looks for
packed documents only without a KV cache: with ``use_cache`` on (the Llama config default) the
documents of a flattened row attend to each other, which is why the bench's model config turns it off.
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_flattened_batch_loss_equals_documents_one_by_one(attention):
    from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention,
                         use_cache=False)  # as in bench/workload.py: with a KV cache transformers skips the packed check
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 11, 7)]
    batch = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)([{"input_ids": d} for d in docs])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 23)
    with torch.no_grad():
        flat = model(**batch).loss
        per_doc = [model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss for d in docs]
    targets = [len(d) - 1 for d in docs]
    expected = sum(loss * n for loss, n in zip(per_doc, targets)) / sum(targets)
    assert flat == pytest.approx(float(expected), rel=1e-5)


def test_baseline_variants_are_the_ones_the_bench_names():
    from bench import baseline_hf, throughput

    assert baseline_hf.VARIANTS == ("padded", "flat", "liger")
    assert {"baseline", "baseline-flat", "baseline-liger", "kubetune-budget"} <= set(throughput.SIDES)
    assert throughput.TARGETS[("instruct", "full", "baseline-flat")] == 2.5


def test_the_fp8_side_reports_speed_up_and_losses_against_bf16():
    """``kubetune-fp8`` is the product trainer with ``training.precision: fp8``, checked against ``kubetune``."""
    from pathlib import Path

    from bench import kubetune_trainer, throughput
    from bench import workload as wl

    spec = kubetune_trainer.job_manifest(Path("m"), Path("d.jsonl"), wl.shape_for(True), "full", steps=4, log_every=1,
                                         cuda=True, name="b", variant="fp8")["spec"]
    assert spec["training"]["precision"] == "fp8" and spec["resources"] == {"gpusPerNode": 1}
    from kubetune.api import parse_spec

    parse_spec(spec)  # a valid FineTuneJob
    run = {"losses": [12.0, 11.0], "loss_steps": [1, 2]}
    row = {"runs": {"kubetune": [{**run, "tokens_per_s": 100.0, "mfu": 0.4}],
                    "kubetune-fp8": [{**run, "losses": [12.0, 11.11], "tokens_per_s": 125.0, "mfu": 0.5}]}}
    row["stats"] = {side: throughput._stats(runs) for side, runs in row["runs"].items()}
    check = throughput.fp8_check(row)
    assert check["speedup"] == pytest.approx(1.25) and check["mfu"] == pytest.approx(0.5)
    assert check["losses"]["max_abs_diff"] == pytest.approx(0.11) and check["losses"]["reference"] == "kubetune"
    row.update(workload="fixed", method="full", ratios=[], loss_check=None, fp8_check=check)
    table = throughput.markdown({"gpu": "g", "date": "d", "torch": "t", "transformers": "x", "steps": 2, "warmup": 1,
                                 "repeats": 1, "rows": [row]})
    assert "fixed full: 1.250x (125 vs 100 tok/s; MFU 50.0% vs 40.0%" in table and "max |diff| 1.10e-01" in table


def test_the_budget_summary_lines_up_the_compile_candidates(tmp_path):
    """``bash bench/session.sh budget`` writes one result folder and one log per KUBETUNE_COMPILE_LENGTH
    candidate; the summary shows each one's rate per log window (a recompile's window is the slow one),
    its graphs and logged recompiles, and how far its losses are from the ``dynamic`` run's."""
    import json

    from bench import budget_summary

    def write(label: str, run: dict, log: str) -> None:
        folder = tmp_path / f"budget-{label}"
        folder.mkdir()
        row = {"workload": "instruct", "method": "full", "runs": {"kubetune-budget": [run]}}
        report = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "transformers": "5.17.0", "rows": [row]}
        (folder / f"2026-12-07-budget-{label}.json").write_text(json.dumps(report))
        (tmp_path / f"log-budget-{label}.txt").write_text(log)

    base = {"tokens_per_s": 6654.0, "window_tokens_per_s": [772.0, 2142.0, 25449.0, 2906.0], "compiled_graphs": 8,
            "documents_per_step": 8.0, "losses": [12.0, 11.5, 11.0, 10.5]}
    recompile = "[2/1] [__recompiles] Recompiling function forward\n"
    write("dynamic", base, recompile * 2)
    write("unbacked-traced", {**base, "tokens_per_s": 25000.0, "window_tokens_per_s": [900.0, 25000.0, 25100.0, 24900.0],
                              "compiled_graphs": 1, "losses": [12.0, 11.5, 11.0, 10.503]}, "")
    write("traced", {"side": "kubetune-budget", "error": "exit 1"}, "")
    table = budget_summary.summary(tmp_path)
    assert table.startswith("kubetune-budget (instruct full) per KUBETUNE_COMPILE_LENGTH candidate; NVIDIA H100 80GB HBM3, "
                            "torch 2.11.0, transformers 5.17.0")
    assert "| dynamic | 6,654 | 772, 2,142, 25,449, 2,906 | 8 | 2 | 8.0 | 0.00e+00 |" in table
    assert "| unbacked-traced | 25,000 | 900, 25,000, 25,100, 24,900 | 1 | 0 | 8.0 | 3.00e-03 |" in table
    assert "| traced | failed (exit 1) |" in table
    assert budget_summary.summary(tmp_path / "none") == f"no budget runs under {tmp_path / 'none'}"


def test_the_buckets_padding_documented_in_the_bench_readme_is_what_the_code_computes():
    """bench/README.md ("Packing budget") quotes the buckets' padding on the bench's instruct data."""
    from pathlib import Path

    from bench import budget_summary

    report = budget_summary.waste()
    assert "padding to a multiple of 256: 3.5% of the padded tokens, 26 distinct lengths" in report
    assert "padding to the buckets (16 up to 16384): 11.4%, 9 buckets used" in report
    readme = (Path(__file__).resolve().parents[2] / "bench" / "README.md").read_text()
    assert "**11.4%** of the padded tokens against 3.5% with 256-multiples (26 distinct lengths), and **9 buckets met**" in readme


def test_every_side_trains_on_one_learnable_distribution():
    """The stock sides' examples and the kubetune side's text are the same Zipf distribution over the same
    ids (the random-init loss depends on which ids are frequent), each document ending with the eos the
    kubetune tokenizer appends; the loss can fall well below ln(vocab)."""
    import json
    import math
    from pathlib import Path

    import numpy as np

    from bench import kubetune_trainer
    from bench import workload as wl

    examples = wl.examples_for([300] * 40, 1024, seed=0)
    assert all(len(e["input_ids"]) == 300 and e["input_ids"][-1] == wl.EOS_ID for e in examples)
    stock = np.concatenate([e["input_ids"][:-1] for e in examples])
    assert stock.min() >= wl.FIRST_ID and stock.max() < 1024
    path = kubetune_trainer.write_dataset(Path(__import__("tempfile").mkdtemp()) / "d.jsonl", [300] * 40, 1024, seed=0)
    texts = [json.loads(line)["text"].split() for line in path.read_text().splitlines()]
    ours = np.array([int(w[1:]) for t in texts for w in t])
    assert all(len(t) == 299 for t in texts)  # + the eos the trainer appends = 300 tokens
    # The same ranks map to the same ids: the most frequent ids agree, and the entropy is far below uniform.
    top = lambda ids: {int(i) for i in np.argsort(np.bincount(ids, minlength=1024))[-5:]}  # noqa: E731
    assert top(stock) == top(ours)
    counts = np.bincount(stock, minlength=1024) / len(stock)
    entropy = -sum(p * math.log(p) for p in counts if p)
    assert entropy < math.log(1024) - 1.5


def test_the_stock_loss_check_averages_stock_steps_over_the_trainer_windows():
    from bench import throughput

    stock = [10.0, 9.8, 9.6, 9.4, 9.2, 9.0]  # per step, falling linearly: no sampling noise
    row = {"runs": {"baseline": [{"losses": stock}, {"losses": stock}],
                    "kubetune": [{"losses": [9.8, 9.2], "loss_steps": [3, 6]}]}}
    c = throughput.stock_check(row)
    assert c["reference_losses"] == pytest.approx([9.8, 9.2]) and c["max_abs_diff"] == pytest.approx(0.0)
    assert c["step_noise"] == pytest.approx(0.0, abs=1e-9) and c["within_noise"]
    row["runs"]["kubetune"] = [{"losses": [9.8, 9.0], "loss_steps": [3, 6]}]  # falls 0.2 faster: outside
    assert not throughput.stock_check(row)["within_noise"]
    noisy = [10.0, 9.9, 9.5, 9.5, 9.1, 9.0]
    row["runs"]["baseline"] = [{"losses": noisy}]
    c = throughput.stock_check(row)
    assert c["step_noise"] > 0.05 and c["tolerance"] > 0.2 and c["within_noise"]  # the same 0.2 is within what the stock run's noise allows
    assert throughput.stock_check({"runs": {"kubetune": row["runs"]["kubetune"]}}) is None


def test_the_stock_loss_check_compares_only_steps_of_as_many_documents():
    from bench import throughput

    stock = [10.0, 9.8, 9.6, 9.4, 9.2, 9.0]
    row = {"runs": {"baseline": [{"losses": stock, "documents_per_step": 8.0}],
                    "kubetune": [{"losses": [9.5, 8.5], "loss_steps": [3, 6], "documents_per_step": 37.1}],
                    "kubetune-budget": [{"losses": [9.8, 9.2], "loss_steps": [3, 6], "documents_per_step": 8.0}]}}
    assert throughput.stock_check(row) is None  # packed steps: 4.6x the documents, another curve by design
    assert throughput.stock_check(row, "baseline", "kubetune-budget")["within_noise"]


def test_the_stock_loss_check_does_not_judge_a_run_too_short_to_estimate_its_noise():
    from bench import throughput

    row = {"runs": {"baseline": [{"losses": [10.0, 9.9, 9.7]}],
                    "kubetune": [{"losses": [10.0, 9.5, 9.0], "loss_steps": [1, 2, 3]}]}}
    c = throughput.stock_check(row)
    assert c["within_noise"] is None and c["tolerance"] is None and c["max_abs_diff"] == pytest.approx(0.7)
    report = {"rows": [dict(row, workload="fixed", method="full", ratios=[], stats={}, stock_checks=[c])],
              "gpu": "cpu", "date": "d", "torch": "t", "transformers": "x", "steps": 3, "warmup": 0}
    assert "not judged" in throughput.markdown(report)
