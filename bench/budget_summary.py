"""Summary of ``bash bench/session.sh budget``: one line per ``KUBETUNE_COMPILE_LENGTH`` candidate.

    python -m bench.budget_summary OUT        # OUT: the folder the session part wrote (budget-<label>/...)
    python -m bench.budget_summary --waste    # padding of the buckets on the bench's instruct data (CPU only)

Per candidate: timed tokens/s, every log window's tokens/s (a window that recompiled is the slow
one), the graphs torch.compile built, the recompiles ``TORCH_LOGS=recompiles`` logged, and the
largest loss difference from the ``dynamic`` run (the same packs in the same order, so the losses
should agree within bf16 noise). ``--waste`` packs the bench's instruct documents the way the trainer
does (8 documents per pack, 16,384-token budget) and reports the padding of each pack-length rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _runs(out: Path) -> tuple[dict[str, dict[str, Any]], set[str]]:
    runs: dict[str, dict[str, Any]] = {}
    setups: set[str] = set()
    for folder in sorted(out.glob("budget-*")):
        if not folder.is_dir():
            continue
        label = folder.name[len("budget-"):]
        for report in sorted(folder.glob("*.json")):
            data = json.loads(report.read_text())
            if "gpu" in data:
                setups.add(f"{data['gpu']}, torch {data.get('torch')}, transformers {data.get('transformers')}")
            for row in data.get("rows", []):
                for side_runs in row.get("runs", {}).values():
                    if side_runs:
                        runs[label] = side_runs[0]
    return runs, setups


def summary(out: Path) -> str:
    runs, setups = _runs(out)
    if not runs:
        return f"no budget runs under {out}"
    reference = runs.get("dynamic", {}).get("losses") or []
    lines = [f"kubetune-budget (instruct full) per KUBETUNE_COMPILE_LENGTH candidate; {'; '.join(sorted(setups)) or 'device unknown'}",
             "",
             "| candidate | timed tok/s | tok/s per log window | graphs | recompiles logged | docs/step | max loss diff vs dynamic |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for label, run in runs.items():
        if "error" in run:
            lines.append(f"| {label} | failed ({run['error']}) | | | | | |")
            continue
        log = out / f"log-budget-{label}.txt"
        recompiles = log.read_text().count("Recompiling function") if log.exists() else None
        losses = run.get("losses") or []
        diff = max((abs(a - b) for a, b in zip(losses, reference)), default=None) if reference else None
        windows = ", ".join("-" if w is None else f"{w:,.0f}" for w in run.get("window_tokens_per_s") or [])
        tps = run.get("tokens_per_s")
        docs = run.get("documents_per_step")
        lines.append(f"| {label} | {'-' if tps is None else f'{tps:,.0f}'} | {windows} | {run.get('compiled_graphs')} | "
                     f"{recompiles} | {'-' if docs is None else f'{docs:.1f}'} | {'-' if diff is None else f'{diff:.2e}'} |")
    return "\n".join(lines)


def waste(n_documents: int = 8 * 400, seed: int = 0) -> str:
    """Padding of budget packs on the bench's instruct documents: to 256-multiples and to the buckets."""
    from bench import workload as wl
    from kubetune.trainer import compiling
    from kubetune.trainer.packing import pack_lengths

    shape = wl.shape_for(False)
    lengths = wl.lengths_for("instruct", shape, n_documents, seed=seed)
    budget = shape.token_budget
    packs = pack_lengths(lengths, budget, max_items=shape.micro_batch)
    tokens = [sum(lengths[i] for i in pack) for pack in packs]
    buckets = compiling.bucket_lengths(budget)
    used = sorted({compiling.bucket_for(n, buckets) for n in tokens})
    return "\n".join([
        f"{len(packs)} packs of {shape.micro_batch} documents (instruct lengths, seed {seed}): "
        f"{min(tokens)}-{max(tokens)} tokens, mean {sum(tokens) / len(tokens):,.0f}",
        f"padding to a multiple of {compiling.PAD_MULTIPLE}: {compiling.padding_waste(tokens, None):.1%} of the padded tokens, "
        f"{len({-(-n // 256) for n in tokens})} distinct lengths",
        f"padding to the buckets ({len(buckets)} up to {budget}): {compiling.padding_waste(tokens, buckets):.1%}, "
        f"{len(used)} buckets used: {used}",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="the folder bench/session.sh budget wrote")
    p.add_argument("--waste", action="store_true", help="report the buckets' padding on the bench's instruct data")
    args = p.parse_args(argv)
    if args.waste:
        print(waste())
    if args.out:
        print(summary(Path(args.out)))
    elif not args.waste:
        p.error("give OUT, --waste, or both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
