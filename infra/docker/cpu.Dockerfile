# comat CPU image: the light stages (prompts) on the `cpu` pool, the Prefect server and the one-shot
# setup of the compose stack (same Prefect version everywhere).
#
# Build from the repository root:
#   docker build -f infra/docker/cpu.Dockerfile -t comat-cpu:0.1.0 .
#
# The default CMD is a Prefect `process` worker on the `cpu` pool: flow runs are subprocesses of the
# worker inside this container. No ENTRYPOINT, so that any command (`prefect server start`,
# `comat deploy`, or the `prefect flow-run execute` a Kubernetes/Docker worker passes) replaces CMD.

ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}

# CPU-only torch from the PyTorch CPU index: about 200 MB instead of the multi-GB CUDA wheels of PyPI.
# The version is constraints.txt's (tests/test_infra.py checks that they agree).
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extras of the package, comma separated (e.g. "gsam").
ARG COMAT_EXTRAS=""
ARG COMAT_UID=10001

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COMAT_HOME=/opt/comat \
    HF_HOME=/cache/huggingface \
    COMAT_CACHE=/cache/comat \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

RUN groupadd --gid "${COMAT_UID}" comat \
 && useradd --uid "${COMAT_UID}" --gid comat --create-home --shell /bin/bash comat \
 && mkdir -p /cache/huggingface /cache/comat \
 && chown -R comat:comat /cache

RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# Same layout as the GPU image: code in /opt/comat, installed in editable mode.
WORKDIR /opt/comat
COPY pyproject.toml README.md constraints.txt ./
COPY comat_core ./comat_core
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments

# The pinned set of constraints.txt with the torch pair above, so that no dependency swaps the CPU build
# for PyPI's CUDA build.
RUN --mount=type=cache,target=/root/.cache/pip \
    printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /tmp/keep-torch.txt \
 && grep -v -E '^(torch|torchvision)==' constraints.txt >> /tmp/keep-torch.txt \
 && pip install -c /tmp/keep-torch.txt -e ".${COMAT_EXTRAS:+[$COMAT_EXTRAS]}" \
 && rm /tmp/keep-torch.txt \
 && python -c "import torch, comat_core, flows, prefect; assert not torch.cuda.is_available(); print('torch', torch.__version__)"

# Numeric, so that Kubernetes `runAsNonRoot` can verify it.
USER ${COMAT_UID}:${COMAT_UID}
VOLUME ["/cache"]
# 4200: Prefect server (compose), 8080: worker health endpoint (`--with-healthcheck`).
EXPOSE 4200 8080

CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process", "--install-policy", "never"]
