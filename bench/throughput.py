"""Trainer throughput: the HF + DeepSpeed baseline and kubetune, side by side on one GPU.

    python -m bench.throughput                       # full matrix on cuda:0, writes bench/results/<date>.{json,md}
    python -m bench.throughput --tiny --device cpu   # dry run of the same code on CPU

Sides: ``baseline`` (bench/baseline_hf.py), ``kubetune`` — the product trainer run from a FineTuneJob
(bench/kubetune_trainer.py) — and, on request, ``loop``: the product's building blocks in the minimal
loop of bench/kubetune_loop.py (``--sides baseline,kubetune,loop``).

Each (workload, method, side) runs in its own process, one after the other on the same GPU, so
peak memory and compile caches do not leak between runs. Tokens/s counts only real tokens (padding
excluded on both sides). Ratios are kubetune / baseline of the same workload and method.
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
TARGETS = {("fixed", "full"): 1.5, ("fixed", "lora"): 1.5, ("instruct", "full"): 5.0, ("instruct", "lora"): 5.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(args: argparse.Namespace) -> None:
    common = dict(steps=args.steps, warmup=args.warmup, device=args.device, tiny=args.tiny,
                  deepspeed=not args.no_deepspeed)
    if args.worker == "baseline":
        from bench import baseline_hf

        result = baseline_hf.run(args.workload, args.method, **common)
    elif args.worker == "kubetune":
        from bench import kubetune_trainer

        result = kubetune_trainer.run(args.workload, args.method, **common)
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
    if side == "kubetune" and nproc == 1 and args.no_deepspeed:
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


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Trainer throughput, {report['gpu']}, {report['date']} (torch {report['torch']}, "
        f"transformers {report['transformers']}); {report['steps']} timed steps after {report['warmup']} warm-up.",
        "",
        "| workload | method | baseline tok/s | kubetune tok/s | ratio | target | baseline MFU | kubetune MFU "
        "| baseline peak GiB | kubetune peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        b, k = row["baseline"], row["kubetune"]
        lines.append(
            f"| {row['workload']} | {row['method']} | {_fmt(b.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(k.get('tokens_per_s'), ',.0f')} | {_fmt(row.get('ratio'), '.2f')}x | {row['target']}x | "
            f"{_fmt(b.get('mfu'), '.1%')} | {_fmt(k.get('mfu'), '.1%')} | "
            f"{_fmt(b.get('peak_mem_gib'), '.1f')} | {_fmt(k.get('peak_mem_gib'), '.1f')} |"
        )
    lines += ["", "kubetune = the product trainer (kubetune.trainer.training.Trainer) run from a FineTuneJob, "
              "timed from its own trainer_log.jsonl. Tokens/s count real tokens only; MFU against 989 TFLOP/s "
              "with 6N (full) or 4N (LoRA) + causal attention FLOPs per token (bench/workload.py)."]
    loops = [r for r in report["rows"] if r.get("loop")]
    if loops:
        lines += ["", "| workload | method | minimal loop tok/s (bench/kubetune_loop.py) | trainer / loop |", "|---|---|---:|---:|"]
        for row in loops:
            lp, k = row["loop"].get("tokens_per_s"), row["kubetune"].get("tokens_per_s")
            lines.append(f"| {row['workload']} | {row['method']} | {_fmt(lp, ',.0f')} | "
                         f"{_fmt(k / lp if k and lp else None, '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model (CPU dry run)")
    p.add_argument("--workloads", default=",".join(wl.WORKLOADS))
    p.add_argument("--methods", default=",".join(wl.METHODS))
    p.add_argument("--sides", default="baseline,kubetune")
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
    p.add_argument("--worker", choices=["baseline", "kubetune", "loop"], help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

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
    sides = args.sides.split(",")
    for workload in args.workloads.split(","):
        for method in args.methods.split(","):
            row: dict[str, Any] = {"workload": workload, "method": method,
                                   "target": TARGETS[(workload, method)], "baseline": {}, "kubetune": {}}
            for side in sides:
                row[side] = _spawn(args, side, workload, method, out / f".{name}-{side}-{workload}-{method}.json")
            b, k = row["baseline"].get("tokens_per_s"), row["kubetune"].get("tokens_per_s")
            row["ratio"] = k / b if b and k else None
            rows.append(row)
    report = {"date": stamp, "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
              "steps": args.steps, "warmup": args.warmup, "tiny": args.tiny, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / f"{name}.md").write_text(table)
    for f in out.glob(f".{name}-*.json"):
        f.unlink()
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
