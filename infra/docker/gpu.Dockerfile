# comat GPU image: the GPU stages (gan_gt, masks, train, evaluate, sdxl_prefinetune) on CUDA.
#
# Build from the repository root:
#   docker build -f infra/docker/gpu.Dockerfile -t comat-gpu:0.1.0 .
#   docker build -f infra/docker/gpu.Dockerfile --build-arg COMAT_EXTRAS=gsam -t comat-gpu:0.1.0-gsam .
#
# One image, three ways to run it:
# - compose (infra/compose): the default CMD is a Prefect `process` worker on the `gpu` pool. Flow
#   runs are subprocesses inside this container and see every GPU the container reserved, so the
#   train stage's `accelerate launch` spreads over all of them. A `docker` worker type is not used
#   here: it would need the Docker socket inside the container to start sibling containers.
# - Kubernetes (infra/k8s): the Kubernetes worker runs elsewhere and starts this image as a Job;
#   the Job's `args` (`prefect flow-run execute`) replace CMD.
# - By hand: `docker run --gpus all comat-gpu:0.1.0 comat run --preset sd15 --storage s3://...`.
# There is deliberately no ENTRYPOINT: an ENTRYPOINT would be prepended to the command that
# Kubernetes and Docker workers pass, and the flow run would never start.

# torch 2.13.0 as PyPI ships it for Linux: built for CUDA 13.0, with the CUDA runtime, cuBLAS, cuDNN and
# NCCL as `nvidia-*` wheels, so the image needs no CUDA toolkit, only the host's NVIDIA driver (>= 580,
# the first with CUDA 13.0) through the NVIDIA Container Toolkit. The versions are constraints.txt's,
# the same the test suite runs with (there on a CPU build of the same torch).
ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}

# Optional extras of the package, comma separated: "gsam" adds segment-anything for the gsam masks
# backend. (The original groundingdino-py package is deliberately not used: it breaks under
# transformers 5 and its requirements replace torch with another CUDA build; comat uses
# transformers' own Grounding DINO.)
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
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --gid "${COMAT_UID}" comat \
 && useradd --uid "${COMAT_UID}" --gid comat --create-home --shell /bin/bash comat \
 && mkdir -p /cache/huggingface /cache/comat \
 && chown -R comat:comat /cache

# The code lives in /opt/comat (root-owned, read-only for the worker user): the package is installed
# from there in editable mode, so the flow entrypoints of deployments/prefect.yaml (paths relative to
# /opt/comat) and the installed package are the same files.
WORKDIR /opt/comat
COPY pyproject.toml README.md constraints.txt ./
COPY comat_core ./comat_core
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments

# The pinned set, CUDA torch included (about 4.5 GB installed); `gsam` adds the torchvision built for it.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt -e ".${COMAT_EXTRAS:+[$COMAT_EXTRAS]}" \
 && python -c "import torch, comat_core, flows, prefect; assert torch.version.cuda, 'not a CUDA build'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Numeric, so that Kubernetes `runAsNonRoot` can verify it.
USER ${COMAT_UID}:${COMAT_UID}
VOLUME ["/cache"]
# Worker health endpoint (`prefect worker start --with-healthcheck`).
EXPOSE 8080

CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--install-policy", "never"]
