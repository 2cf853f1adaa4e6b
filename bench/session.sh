#!/usr/bin/env bash
# One device call of the trainer benchmark (issues 8 and 15; see bench/README.md). Usage: bash bench/session.sh PART
# PART fixed:    fixed-length full FT: stock HF+DS ZeRO-2 and stock + use_liger_kernel against the product trainer
#                (fused engine, the default on one GPU), 2 runs each, and the trainer on DeepSpeed (numerics reference, 1 run).
# PART instruct: instruction-like full FT: the padded and the padding-free (DataCollatorWithFlattening) baselines
#                (2 runs each) against the product trainer and the trainer at the baselines' 8 documents per step.
# PART recompute: the compiled layers recomputing elementwise results in backward (kubetune, the default) against
#                saving them (kubetune-saveall, torch's default), fixed full, once each (~1.5 min); for instruct-like data
#                KUBETUNE_EXTRA_SIDES=kubetune-saveall bash bench/session.sh instruct.
# PART fp8:      training.precision fp8 (torchao float8 linear layers) against the same trainer in bf16, fixed full.
# PART ab:       the product trainer against itself with environment switches (AB=..., below), fixed full.
# PART pending:  fixed (stock, Liger, trainer x2), instruct trainer x1 (peak), budget as is and unbacked+traced (~8 min).
# PART budget:   the trainer at 8 documents per step (instruct) as is and per KUBETUNE_COMPILE_LENGTH candidate, with
#                TORCH_LOGS=recompiles (~5 runs of ~1 min; BUDGET=..., below).
# Each part fits one 10-minute device call on an H100 (~6 runs of ~1 min); PART all runs both. Results and the log go to $OUT.
set -u
# .whl/ (peft, deepspeed, liger-kernel, ...; ../shared/gpu/prepare-wheels.sh) is installed if it is here; else the caller did it.
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -e /tmp/site/.kubetune-bench ]; then  # once per machine (parts run in one call)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  touch /tmp/site/.kubetune-bench
fi
export PYTHONPATH=/tmp/site${KUBETUNE_BENCH_DEPS:+:$KUBETUNE_BENCH_DEPS} PYTHONUNBUFFERED=1 KUBETUNE_BENCH_WORKDIR=/tmp/ktb
# The trainer imports tenacity, torchmetrics (+ lightning_utilities) and seqeval, which the GPU image lacks: put them
# in .whl/ or in a folder named by KUBETUNE_BENCH_DEPS (the 2026-12-06 run copied them from a local venv; seqeval stubbed).
python3 -c "import tenacity, torchmetrics, seqeval" || echo "WARNING: the kubetune sides will fail to import (see above)" >&2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=${STEPS:-9}; W=${WARMUP:-3}; R=${REPEATS:-2}; KR=${KUBETUNE_REPEATS:-$R}
# Every side runs R times (the product trainer's sides too, KUBETUNE_REPEATS to change that; the DeepSpeed numerics
# reference and the extra sides (KUBETUNE_EXTRA_SIDES=kubetune-fp8,kubetune-buffers) once, last); with KUBETUNE_BENCH_PROFILE=DIR each kubetune run traces two extra steps (profile-*.txt, untimed).
FIXED_SIDES=baseline,baseline-liger,kubetune,kubetune-deepspeed${KUBETUNE_EXTRA_SIDES:+,$KUBETUNE_EXTRA_SIDES}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || echo "no nvidia-smi (a CPU dry run)" > "$OUT/gpu.txt"
quiet() { grep -vE 'Warning|warn\(|return func|it/s\]' | tee -a "$OUT/log-$1.txt" | tail -${2:-80}; }
case "${1:-}" in
  fixed)
    python3 -m bench.throughput --workloads fixed --methods full --sides $FIXED_SIDES --side-repeats kubetune-deepspeed=1,kubetune-fp8=1,kubetune-buffers=1,kubetune-saveall=1 \
      --repeats $R --kubetune-repeats $KR --steps $S --warmup $W --out "$OUT" --tag fixed 2>&1 | quiet fixed ;;
  instruct)
    python3 -m bench.throughput --workloads instruct --methods full \
      --sides baseline,baseline-flat,kubetune,kubetune-budget${KUBETUNE_EXTRA_SIDES:+,$KUBETUNE_EXTRA_SIDES} --side-repeats kubetune-saveall=1 \
      --repeats $R --kubetune-repeats $KR --steps $S --warmup $W --out "$OUT" --tag instruct 2>&1 | quiet instruct ;;
  recompute)
    python3 -m bench.throughput --workloads fixed --methods full --sides kubetune,kubetune-saveall \
      --repeats 1 --kubetune-repeats 1 --steps $S --warmup $W --out "$OUT" --tag recompute 2>&1 | quiet recompute ;;
  fp8)  # training.precision fp8 (torchao in .whl/): a tiny smoke first, then fixed full in bf16 and fp8 once each; ~4 min
    python3 -m bench.throughput --tiny --device cuda --workloads fixed --methods full --sides kubetune-fp8 \
      --repeats 1 --steps 2 --warmup 1 --out "$OUT/tiny" --tag fp8-tiny 2>&1 | quiet fp8-tiny 40
    grep -q '"tokens_per_s": [0-9]' "$OUT"/tiny/*-fp8-tiny.json || { echo "fp8 smoke failed" >&2; exit 1; }
    python3 -m bench.throughput --workloads fixed --methods full --sides kubetune,kubetune-fp8 \
      --repeats 1 --steps $S --warmup $W --out "$OUT" --tag fp8 2>&1 | quiet fp8 ;;
  ab)  # the product trainer against itself, fixed full, once each: as is, then once per AB item 'label:VAR=value,VAR=value'
        # (e.g. AB='after:KUBETUNE_COMPILE_TANGENTS=outputs,KUBETUNE_LOSS_CHUNK_MEM=8'), interleaved REPEATS times; ~40 s a run
    for r in $(seq "$R"); do
      python3 -m bench.throughput --workloads fixed --methods full --sides kubetune --repeats 1 --steps $S --warmup $W \
        --out "$OUT/default-$r" --tag ab-default 2>&1 | quiet ab-default 12
      for item in ${AB:-}; do
        label=${item%%:*}; vars=${item#*:}
        env ${vars//,/ } python3 -m bench.throughput --workloads fixed --methods full --sides kubetune --repeats 1 \
          --steps $S --warmup $W --out "$OUT/$label-$r" --tag "ab-$label" 2>&1 | quiet "ab-$label" 12
      done
    done ;;
  budget)  # training.packingMaxExamples 8 (kubetune-budget, instruct full) with TORCH_LOGS=recompiles: as is, then once per
            # BUDGET item 'label:VAR=value,...' (default: the KUBETUNE_COMPILE_LENGTH candidates); ~1 min a run on an H100 (6 runs).
            # BENCH_ARGS='--tiny --device cpu' for a dry run. Summary (tok/s per log window, graphs, losses): budget-table.md
    B=${BUDGET:-unbacked-traced:KUBETUNE_COMPILE_LENGTH=unbacked+traced unbacked-traced-hints:KUBETUNE_COMPILE_LENGTH=unbacked+traced+hints hints:KUBETUNE_COMPILE_LENGTH=hints unbacked:KUBETUNE_COMPILE_LENGTH=unbacked buckets:KUBETUNE_COMPILE_LENGTH=buckets}
    for item in "dynamic:KUBETUNE_COMPILE_LENGTH=dynamic" $B; do
      label=${item%%:*}; vars=${item#*:}
      env TORCH_LOGS=recompiles ${vars//,/ } python3 -m bench.throughput --workloads instruct --methods full --sides kubetune-budget \
        --repeats 1 --kubetune-repeats 1 --steps $S --warmup $W ${BENCH_ARGS:-} --out "$OUT/budget-$label" --tag "budget-$label" 2>&1 \
        | quiet "budget-$label" 14
      echo "$label: $(grep -c 'Recompiling function' "$OUT/log-budget-$label.txt") recompiles logged" | tee -a "$OUT/budget-summary.txt"
      python3 -m bench.budget_summary "$OUT" > "$OUT/budget-table.md"  # after every run: a call cut short keeps its table
    done
    cat "$OUT/budget-table.md" | tee -a "$OUT/budget-summary.txt" ;;
  pending)  # what the sessions of 2026-12-07 could not run (no device started), in one call of ~8 min on an H100:
             # fixed full stock, stock + Liger and the trainer twice each (the 1.6x and 1.2x targets, the loss curves
             # against stock), the trainer once on instruct (peak memory with the default loss chunks against the
             # flattening baseline's 32.86 GiB), then the budget side as is and with KUBETUNE_COMPILE_LENGTH=unbacked+traced
    python3 -m bench.throughput --workloads fixed --methods full --sides baseline,baseline-liger,kubetune \
      --repeats $R --kubetune-repeats $KR --steps $S --warmup $W ${BENCH_ARGS:-} --out "$OUT" --tag fixed 2>&1 | quiet fixed 40
    python3 -m bench.throughput --workloads instruct --methods full --sides kubetune \
      --repeats 1 --kubetune-repeats 1 --steps $S --warmup $W ${BENCH_ARGS:-} --out "$OUT" --tag instruct-peak 2>&1 | quiet instruct-peak 12
    BUDGET=${BUDGET:-unbacked-traced:KUBETUNE_COMPILE_LENGTH=unbacked+traced} bash "$0" budget ;;
  all)  # both parts in one call (when device time is short): ~12 runs, ~9 minutes on an H100/H200
    bash "$0" fixed; bash "$0" instruct ;;
  *) echo "usage: bash bench/session.sh fixed|instruct|recompute|fp8|ab|budget|pending|all" >&2; exit 2 ;;
esac
ls -la "$OUT"
