# docker build -f docker/operator.Dockerfile -t ghcr.io/kubetune/operator:0.1.0 .
#
# The operator image: kubetune without the train extra, so no torch, transformers or DeepSpeed
# (the API package it validates with is torch-free by design). Runs as a non-root user with a
# read-only root filesystem (the chart mounts an emptyDir at /tmp). Build from the repository root.

# Pinned to a patch release; bump deliberately (tests/chart/test_images.py refuses floating tags).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Every folder setuptools maps onto the kubetune namespace (pyproject.toml), and the readme it reads.
COPY pyproject.toml README.md ./
COPY kubetune/ kubetune/
COPY api/ api/
COPY operator/ operator/
COPY trainer/ trainer/
COPY techniques/ techniques/
RUN python -m venv /opt/kubetune \
 && /opt/kubetune/bin/pip install . \
 && /opt/kubetune/bin/pip check \
 && if /opt/kubetune/bin/python -c "import torch" 2>/dev/null; then echo "torch must not be in the operator image" >&2; exit 1; fi

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="The kubetune operator: FineTuneJob in, DeepSpeed trainer pods out." \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/kubetune /opt/kubetune
ENV PATH=/opt/kubetune/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# Fail the build, not the pod, when the entry point or the operator package does not import.
RUN kubetune --version && python -c "import kubetune.operator.running, kubetune.operator.metrics"
# 65532 is the chart's operator.podSecurityContext.runAsUser (the distroless "nonroot" id).
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["kubetune"]
CMD ["operator"]
