"""Trainer throughput: the HF + DeepSpeed baselines and kubetune, side by side on one GPU.

    python -m bench.throughput                       # full matrix on cuda:0, writes bench/results/<date>.{json,md}
    python -m bench.throughput --tiny --device cpu   # dry run of the same code on CPU

Sides (``--sides``, comma-separated):

* baselines (bench/baseline_hf.py), each run ``--repeats`` times (default 2; the spread is reported):
  ``baseline`` (padded to the longest row), ``baseline-flat`` (``DataCollatorWithFlattening``,
  padding-free), ``baseline-liger`` (padded + ``use_liger_kernel=True``);
* the product trainer run from a FineTuneJob (bench/kubetune_trainer.py): ``kubetune`` (product
  defaults), ``kubetune-deepspeed`` (``deepspeed.engine: deepspeed``, the numerics reference of the
  fused engine), ``kubetune-budget`` (``training.packingMaxExamples: 8``, the baselines' documents
  per step), ``kubetune-fp8`` (``training.precision: fp8``; its speed-up and losses are reported
  against ``kubetune``, the same run in bf16), ``kubetune-saveall`` (the compiled layers save their
  elementwise results for backward, torch's default, instead of recomputing them: an A/B reference);
* ``loop``: the product's building blocks in the minimal loop of bench/kubetune_loop.py.

Each (workload, method, side, repeat) runs in its own process, one after the other on the same
GPU, so peak memory and compile caches do not leak between runs. Tokens/s counts only real tokens
(padding excluded on every side). Ratios are a kubetune side over a baseline side of the same
workload and method: the ratio of the means, and the range over the repeats (worst kubetune run
over the best baseline run, best over worst).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import workload as wl

ROOT = Path(__file__).resolve().parent.parent
#: Targets of issue 15 (issue 8 for LoRA): (workload, method, baseline side) -> the ratio the product trainer must reach.
TARGETS = {
    ("fixed", "full", "baseline"): 1.6, ("fixed", "full", "baseline-liger"): 1.2, ("fixed", "lora", "baseline"): 1.5,
    ("instruct", "full", "baseline"): 5.5, ("instruct", "full", "baseline-flat"): 2.5, ("instruct", "lora", "baseline"): 5.0,
}
BASELINE_SIDES = ("baseline", "baseline-flat", "baseline-liger")
KUBETUNE_SIDES = ("kubetune", "kubetune-deepspeed", "kubetune-budget", "kubetune-buffers", "kubetune-fp8", "kubetune-saveall", "loop")
SIDES = BASELINE_SIDES + KUBETUNE_SIDES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(args: argparse.Namespace) -> None:
    common = dict(steps=args.steps, warmup=args.warmup, device=args.device, tiny=args.tiny,
                  deepspeed=not args.no_deepspeed)
    if args.worker in BASELINE_SIDES:
        from bench import baseline_hf

        variant = "padded" if args.worker == "baseline" else args.worker.split("-", 1)[1]
        result = baseline_hf.run(args.workload, args.method, variant=variant, **common)
    elif args.worker != "loop":
        from bench import kubetune_trainer

        variant = "default" if args.worker == "kubetune" else args.worker.split("-", 1)[1]
        result = kubetune_trainer.run(args.workload, args.method, variant=variant, **common)
    else:
        from bench import kubetune_loop

        result = kubetune_loop.run(args.workload, args.method, compile=not args.no_compile,
                                   loss_backend=args.loss_backend, profile_dir=args.profile_dir, **common)
        result["side"] = "loop"
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result_file).write_text(json.dumps(result))


def _spawn(args: argparse.Namespace, side: str, workload: str, method: str, result_file: Path,
           nproc: int = 1) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if nproc == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "bench.throughput", "--worker", side, "--workload", workload,
           "--method", method, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--device", args.device, "--result-file", str(result_file), "--loss-backend", args.loss_backend]
    for flag in ("tiny", "no_deepspeed", "no_compile"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    if args.profile_dir and side == "loop":
        cmd += ["--profile-dir", args.profile_dir]
    if side.startswith("kubetune") and nproc == 1 and args.no_deepspeed:
        raise SystemExit("--no-deepspeed: the product trainer always runs DeepSpeed (use --sides baseline,loop)")
    print(f"== {side} {workload} {method} x{nproc}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0 or not result_file.exists():
        return {"side": side, "workload": workload, "method": method, "error": f"exit {proc.returncode}"}
    result = json.loads(result_file.read_text())
    print(json.dumps(result), flush=True)
    return result


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max tokens/s over the repeats of one side (failed runs left out)."""
    ok = [r for r in runs if r.get("tokens_per_s")]
    if not ok:
        return {"error": "; ".join(str(r.get("error")) for r in runs) or "no run"}
    tps = [r["tokens_per_s"] for r in ok]
    first = ok[0]
    peaks = [r["peak_mem_gib"] for r in ok if r.get("peak_mem_gib") is not None]
    return {
        "runs": len(ok), "tokens_per_s": sum(tps) / len(tps), "min": min(tps), "max": max(tps),
        "spread": (max(tps) - min(tps)) / (sum(tps) / len(tps)),
        "mfu": sum(r["mfu"] for r in ok) / len(ok) if all(r.get("mfu") is not None for r in ok) else None,
        "peak_mem_gib": max(peaks) if peaks else None,
        "documents_per_step": first.get("documents_per_step"), "engine": first.get("engine"),
    }


def _ratios(row: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    stats = row["stats"]
    for k in KUBETUNE_SIDES:
        for b in BASELINE_SIDES:
            ks, bs = stats.get(k), stats.get(b)
            if not ks or not bs or "error" in ks or "error" in bs:
                continue
            target = TARGETS.get((row["workload"], row["method"], b)) if k == "kubetune" else None
            ratio = ks["tokens_per_s"] / bs["tokens_per_s"]
            out.append({"kubetune": k, "baseline": b, "ratio": ratio, "low": ks["min"] / bs["max"],
                        "high": ks["max"] / bs["min"], "target": target,
                        "met": None if target is None else ratio >= target,
                        "peak_ok": None if ks.get("peak_mem_gib") is None or bs.get("peak_mem_gib") is None
                        else ks["peak_mem_gib"] <= bs["peak_mem_gib"]})
    return out


def loss_check(row: dict[str, Any], side: str = "kubetune", reference: str = "kubetune-deepspeed") -> dict[str, Any] | None:
    """``side``'s losses against ``reference``'s over the same steps (same data, seed, init): by default
    the fused engine against DeepSpeed's."""
    a = [r for r in row["runs"].get(side, []) if r.get("losses")]
    b = [r for r in row["runs"].get(reference, []) if r.get("losses")]
    if not a or not b or a[0].get("loss_steps") != b[0].get("loss_steps"):
        return None
    la, lb = a[0]["losses"], b[0]["losses"]
    diffs = [abs(x - y) for x, y in zip(la, lb)]
    return {"side": side, "reference": reference, "engine": a[0].get("engine"), "reference_engine": b[0].get("engine"),
            "steps": a[0]["loss_steps"], "losses": la, "reference_losses": lb, "max_abs_diff": max(diffs),
            "max_rel_diff": max(d / abs(y) for d, y in zip(diffs, lb) if y)}


def _window_means(losses: list[float], steps: list[int]) -> list[float]:
    """Per-step ``losses`` (step 1 first) averaged over the windows that end at ``steps``."""
    out, start = [], 0
    for end in steps:
        chunk = losses[start:end]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
        start = end
    return out


def stock_check(row: dict[str, Any], baseline: str = "baseline", side: str = "kubetune") -> dict[str, Any] | None:
    """The product trainer's loss curve against a stock side's over the same optimizer steps: the stock
    per-step losses averaged over the trainer's log windows. Same initial weights, data distribution,
    documents per step, learning rate, AdamW settings and clipping; not the same documents in each step
    (HF Trainer samples its own order), so the curves also differ by which tokens each step saw. That
    sampling noise is estimated from stock's own per-step losses: sigma = std of their second
    differences / sqrt(6) (a linear trend cancels), and two independent means of ``w`` steps differ by
    sigma * sqrt(2 / w) (one standard deviation). Within noise: every window within ``tolerance`` =
    3 of those plus 3 x the larger run-to-run spread of either side (nondeterminism of the kernels).
    None unless both sides train on as many documents per optimizer step (within 5%): packed
    instruction-like steps hold ~4.6x the baseline's documents, a different curve by design; there
    ``kubetune-budget`` (packingMaxExamples = the baseline's batch) is the side to compare."""
    import statistics

    ks = [r for r in row["runs"].get(side, []) if r.get("losses") and r.get("loss_steps")]
    bs = [r for r in row["runs"].get(baseline, []) if r.get("losses")]
    if not ks or not bs:
        return None
    dk, db = ks[0].get("documents_per_step"), bs[0].get("documents_per_step")
    if dk and db and abs(dk / db - 1) > 0.05:
        return None
    steps = ks[0]["loss_steps"]
    if len(bs[0]["losses"]) < steps[-1] or len(steps) < 2:
        return None
    kubetune = [sum(r["losses"][i] for r in ks) / len(ks) for i in range(len(steps))]
    per_run = [_window_means(r["losses"], steps) for r in bs]
    stock = [sum(w[i] for w in per_run) / len(per_run) for i in range(len(steps))]

    def spread(curves: list[list[float]]) -> float:
        return max((abs(c[i] - d[i]) for i in range(len(steps)) for c in curves for d in curves), default=0.0)

    spreads = {"stock": spread(per_run), "kubetune": spread([r["losses"] for r in ks])}
    x = bs[0]["losses"][:steps[-1]]
    second = [x[i + 2] - 2 * x[i + 1] + x[i] for i in range(len(x) - 2)]
    judged = len(second) >= 4  # fewer steps (a dry run) give no estimate of the noise: reported, not judged
    sigma = statistics.pstdev(second) / 6 ** 0.5 if judged else 0.0
    window = steps[-1] - steps[-2]
    tolerance = 3 * sigma * (2 / window) ** 0.5 + 3 * max(spreads.values())
    diffs = [abs(a - b) for a, b in zip(kubetune, stock)]
    return {"side": side, "reference": baseline, "steps": steps, "losses": kubetune, "reference_losses": stock,
            "max_abs_diff": max(diffs), "run_spreads": spreads, "step_noise": sigma if judged else None,
            "stock_drop": stock[0] - stock[-1], "tolerance": tolerance if judged else None,
            "within_noise": max(diffs) <= tolerance if judged else None}


def fp8_check(row: dict[str, Any]) -> dict[str, Any] | None:
    """``kubetune-fp8`` against ``kubetune`` (bf16) of the same workload: speed-up of the mean tokens/s,
    MFU of each (same FLOP count, same bf16 peak) and the loss check over the same steps."""
    fp8, bf16 = row["stats"].get("kubetune-fp8"), row["stats"].get("kubetune")
    if not fp8 or not bf16 or "error" in fp8 or "error" in bf16:
        return None
    return {"speedup": fp8["tokens_per_s"] / bf16["tokens_per_s"], "tokens_per_s": fp8["tokens_per_s"],
            "bf16_tokens_per_s": bf16["tokens_per_s"], "mfu": fp8.get("mfu"), "bf16_mfu": bf16.get("mfu"),
            "peak_mem_gib": fp8.get("peak_mem_gib"), "bf16_peak_mem_gib": bf16.get("peak_mem_gib"),
            "losses": loss_check(row, "kubetune-fp8", "kubetune")}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Trainer throughput, {report['gpu']}, {report['date']} (torch {report['torch']}, "
        f"transformers {report['transformers']}); {report['steps']} timed steps after {report['warmup']} warm-up; "
        f"runs per side in the `runs` column (interleaved: each round runs every side once).",
        "",
        "| workload | method | side | runs | tok/s (mean) | min – max | spread | MFU | peak GiB | docs/step | engine |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        for side, st in row["stats"].items():
            if "error" in st:
                lines.append(f"| {row['workload']} | {row['method']} | {side} | 0 | failed: {st['error']} | | | | | | |")
                continue
            lines.append(
                f"| {row['workload']} | {row['method']} | {side} | {st['runs']} | {_fmt(st['tokens_per_s'], ',.0f')} | "
                f"{_fmt(st['min'], ',.0f')} – {_fmt(st['max'], ',.0f')} | {_fmt(st['spread'], '.1%')} | "
                f"{_fmt(st.get('mfu'), '.1%')} | {_fmt(st.get('peak_mem_gib'), '.1f')} | "
                f"{_fmt(st.get('documents_per_step'), '.1f')} | {st.get('engine') or '—'} |"
            )
    lines += ["", "| workload | method | kubetune side | over baseline side | ratio (means) | range over repeats | target | met | peak <= baseline |",
              "|---|---|---|---|---:|---|---:|---|---|"]
    for row in report["rows"]:
        for r in row["ratios"]:
            met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
            peak = "—" if r["peak_ok"] is None else ("yes" if r["peak_ok"] else "**no**")
            lines.append(f"| {row['workload']} | {row['method']} | {r['kubetune']} | {r['baseline']} | {r['ratio']:.2f}x | "
                         f"{r['low']:.2f}–{r['high']:.2f}x | {_fmt(r['target'], '')}{'x' if r['target'] else ''} | {met} | {peak} |")
    checks = [(row, row.get("loss_check")) for row in report["rows"] if row.get("loss_check")]
    if checks:
        lines += ["", "Numerics: the product trainer's losses (mean of each log window) with its default engine "
                  "against `deepspeed.engine: deepspeed`, same data, seed and initial weights:", ""]
        for row, c in checks:
            pairs = ", ".join(f"{s}: {x:.4f}/{y:.4f}" for s, x, y in zip(c["steps"], c["losses"], c["reference_losses"]))
            lines.append(f"- {row['workload']} {row['method']}: {c['engine']} vs {c['reference_engine']}: max |diff| "
                         f"{c['max_abs_diff']:.2e} ({c['max_rel_diff']:.2e} relative); step: {pairs}")
    stock = [(row, c) for row in report["rows"] for c in row.get("stock_checks") or []]
    if stock:
        lines += ["", "Loss curves against stock (the product trainer's log windows, stock's per-step losses averaged over "
                  "the same steps; same initial weights, data, documents per step and learning rate, each side's own "
                  "document order; tolerance: 3 standard deviations of the sampling noise of two window means, from stock's per-step "
                  "losses, plus 3 x the larger run-to-run spread; `bench.throughput.stock_check`):", ""]
        for row, c in stock:
            pairs = ", ".join(f"{s}: {x:.4f}/{y:.4f}" for s, x, y in zip(c["steps"], c["losses"], c["reference_losses"]))
            if c["within_noise"] is None:
                verdict = "not judged (fewer than 6 steps: no estimate of the noise)"
            else:
                verdict = (f"tolerance {c['tolerance']:.4f} (per-step noise {c['step_noise']:.4f}; spreads: stock "
                           f"{c['run_spreads']['stock']:.4f}, kubetune {c['run_spreads']['kubetune']:.4f}): "
                           f"{'within noise' if c['within_noise'] else '**outside noise**'}")
            lines.append(f"- {row['workload']} {row['method']} {c['side']} vs {c['reference']}: max |diff| {c['max_abs_diff']:.4f}, "
                         f"stock fell {c['stock_drop']:.3f}, {verdict}; step: {pairs}")
    fp8 = [(row, row.get("fp8_check")) for row in report["rows"] if row.get("fp8_check")]
    if fp8:
        lines += ["", "FP8 (`training.precision: fp8`, torchao float8 linear layers) against the same trainer in bf16, "
                  "same data, seed and initial weights; MFU counts the same FLOPs against the same bf16 peak:", ""]
        for row, c in fp8:
            line = (f"- {row['workload']} {row['method']}: {c['speedup']:.3f}x ({_fmt(c['tokens_per_s'], ',.0f')} vs "
                    f"{_fmt(c['bf16_tokens_per_s'], ',.0f')} tok/s; MFU {_fmt(c['mfu'], '.1%')} vs {_fmt(c['bf16_mfu'], '.1%')}; "
                    f"peak {_fmt(c['peak_mem_gib'], '.1f')} vs {_fmt(c['bf16_peak_mem_gib'], '.1f')} GiB)")
            losses = c.get("losses")
            if losses:
                pairs = ", ".join(f"{s}: {x:.4f}/{y:.4f}" for s, x, y in zip(losses["steps"], losses["losses"], losses["reference_losses"]))
                line += f"; loss fp8/bf16 max |diff| {losses['max_abs_diff']:.2e} ({losses['max_rel_diff']:.2e} relative); step: {pairs}"
            lines.append(line)
    ab = [(row, row.get("saveall_check")) for row in report["rows"] if row.get("saveall_check")]
    if ab:
        lines += ["", "Recomputing elementwise results in backward (`kubetune`, the default) against saving them "
                  "(`kubetune-saveall`, torch's default partitioning), same data, seed and initial weights:", ""]
        for row, c in ab:
            st = row["stats"]
            a, b = st.get("kubetune", {}), st.get("kubetune-saveall", {})
            pairs = ", ".join(f"{s}: {x:.4f}/{y:.4f}" for s, x, y in zip(c["steps"], c["losses"], c["reference_losses"]))
            lines.append(f"- {row['workload']} {row['method']}: {_fmt(a.get('tokens_per_s'), ',.0f')} vs "
                         f"{_fmt(b.get('tokens_per_s'), ',.0f')} tok/s, peak {_fmt(a.get('peak_mem_gib'), '.1f')} vs "
                         f"{_fmt(b.get('peak_mem_gib'), '.1f')} GiB; loss max |diff| {c['max_abs_diff']:.2e}; step: {pairs}")
    lines += ["", "kubetune = the product trainer (kubetune.trainer.training.Trainer) run from a FineTuneJob, "
              "timed from its own trainer_log.jsonl. Tokens/s count real tokens only; MFU against 989 TFLOP/s "
              "with 6N (full) or 4N (LoRA) + causal attention FLOPs per token (bench/workload.py)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model (CPU dry run)")
    p.add_argument("--workloads", default=",".join(wl.WORKLOADS))
    p.add_argument("--methods", default=",".join(wl.METHODS))
    p.add_argument("--sides", default="baseline,kubetune", help=f"comma-separated, of: {', '.join(SIDES)}")
    p.add_argument("--repeats", type=int, default=2, help="runs of each baseline side (the spread is reported)")
    p.add_argument("--kubetune-repeats", type=int, default=1, help="runs of each kubetune side")
    p.add_argument("--side-repeats", default="", help="e.g. kubetune-deepspeed=1: runs of a side, overriding the two above")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--loss-backend", default="auto")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-deepspeed", action="store_true", help="plain torch optimizer step (CPU dry runs)")
    p.add_argument("--profile-dir", default=None, help="write a torch.profiler table of the kubetune runs here")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--scaling", default="", help="e.g. 1,2: kubetune fixed full on that many GPUs each, "
                   "written as <date>-scaling.{json,md} instead of the baseline comparison")
    p.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    sides = args.sides.split(",")
    unknown = [x for x in sides if x not in SIDES]
    if unknown:
        p.error(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")

    import torch
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    name = stamp + (f"-{args.tag}" if args.tag else "")
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    if args.scaling:
        return _scaling(args, out, stamp, gpu, torch.__version__)
    rows = []
    for workload in args.workloads.split(","):
        for method in args.methods.split(","):
            row: dict[str, Any] = {"workload": workload, "method": method, "runs": {}}
            # Interleave the repeats (b1 k1 b2 ...) so a slow phase of the machine hits every side.
            counts = {side: args.repeats if side in BASELINE_SIDES else args.kubetune_repeats for side in sides}
            counts.update({k: int(v) for k, v in (x.split("=", 1) for x in args.side_repeats.split(",") if x)})
            rounds = max(counts.values())
            for i in range(rounds):
                for side in sides:
                    if i < rounds - counts[side]:  # a side run fewer times runs in the last rounds
                        continue
                    result = _spawn(args, side, workload, method, out / f".{name}-{side}-{workload}-{method}-{i}.json")
                    row["runs"].setdefault(side, []).append(result)
                    # What has run so far survives a call that runs out of time.
                    (out / f"{name}.partial.json").write_text(json.dumps(rows + [row], indent=2))
            row["stats"] = {side: _stats(runs) for side, runs in row["runs"].items()}
            row["ratios"] = _ratios(row)
            row["loss_check"] = loss_check(row)
            row["fp8_check"] = fp8_check(row)
            row["saveall_check"] = loss_check(row, "kubetune", "kubetune-saveall")
            row["stock_checks"] = [c for c in (stock_check(row, b, k) for b in ("baseline", "baseline-liger", "baseline-flat")
                                               for k in ("kubetune", "kubetune-budget")) if c]
            rows.append(row)
    import importlib.metadata as md

    versions = {}
    for dist in ("deepspeed", "peft", "liger-kernel", "triton", "torchao"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    report = {"date": stamp, "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
              "versions": versions, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "tiny": args.tiny, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / f"{name}.md").write_text(table)
    for f in [*out.glob(f".{name}-*.json"), out / f"{name}.partial.json"]:
        f.unlink(missing_ok=True)
    print(table)
    return 0


def _scaling(args: argparse.Namespace, out: Path, stamp: str, gpu: str, torch_version: str) -> int:
    runs = []
    for n in (int(x) for x in args.scaling.split(",")):
        runs.append(_spawn(args, args.sides.split(",")[-1], "fixed", "full", out / f".{stamp}-scaling-{n}.json", nproc=n))
    one = runs[0].get("tokens_per_s")
    lines = [f"ZeRO-2 scaling, kubetune fixed-length full fine-tuning, {gpu}, {stamp} (torch {torch_version}).", "",
             "| GPUs | tokens/s | speed-up vs 1 GPU | MFU per GPU | peak GiB (rank 0) |", "|---:|---:|---:|---:|---:|"]
    for r in runs:
        tps = r.get("tokens_per_s")
        lines.append(f"| {r.get('gpus', '?')} | {_fmt(tps, ',.0f')} | {_fmt(tps / one if tps and one else None, '.2f')}x"
                     f" | {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('peak_mem_gib'), '.1f')} |")
    (out / f"{stamp}-scaling.json").write_text(json.dumps({"date": stamp, "gpu": gpu, "runs": runs}, indent=2))
    (out / f"{stamp}-scaling.md").write_text("\n".join(lines) + "\n")
    for f in out.glob(f".{stamp}-scaling-*.json"):
        f.unlink()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
