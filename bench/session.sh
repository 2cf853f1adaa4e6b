#!/usr/bin/env bash
# One device call of the issue-8 benchmark (see bench/README.md). Usage: bash bench/session.sh PART
# PART 1: fixed-length pairs + A/B of the trainer's DeepSpeed defaults; PART 2: instruction-like pairs.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 KUBETUNE_BENCH_WORKDIR=/tmp/ktb
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
S=${STEPS:-9}; W=${WARMUP:-3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
ab() {  # tag env...: one kubetune fixed-full run under extra environment
  local tag=$1; shift
  env "$@" python3 -m bench.throughput --workloads fixed --methods full --sides kubetune --steps $S --warmup $W \
    --out /tmp/ab --tag "ab-$tag" 2>&1 | grep -E '^\{|^== |Error|error' | tail -5 | tee -a "$OUT/ab.txt"
}
if [ "$1" = 1 ]; then
  python3 -m bench.throughput --workloads fixed --methods full,lora --sides kubetune,baseline,loop --steps $S --warmup $W \
    --out "$OUT" --tag fixed 2>&1 | grep -vE 'Warning|warn\(|return func|it/s\]' | tee -a "$OUT/log.txt" | tail -60
  ab scan KUBETUNE_BENCH_OVERFLOW_SCAN=1
  ab nocheck 'KUBETUNE_BENCH_SPEC={"deepspeed":{"config":{"bf16":{"check_grad_overflow":false}}}}'
  ab stage1 'KUBETUNE_BENCH_SPEC={"deepspeed":{"zeroStage":1}}'
  ab stage0 'KUBETUNE_BENCH_SPEC={"deepspeed":{"zeroStage":0}}'
else
  python3 -m bench.throughput --workloads instruct --methods full,lora --sides kubetune,baseline --steps $S --warmup $W \
    --out "$OUT" --tag instruct 2>&1 | grep -vE 'Warning|warn\(|return func|it/s\]' | tee -a "$OUT/log.txt" | tail -60
fi
ls -la "$OUT"
