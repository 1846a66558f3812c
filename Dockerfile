# syntax=docker/dockerfile:1.7
#
# Three images from one file (BuildKit), each a target:
#
#   docker build --target trainer    -t ghcr.io/xstilts/trainer:0.1.0 .     # runs, on GPU nodes
#   docker build --target controller -t ghcr.io/xstilts/controller:0.1.0 .  # `xstilts controller`
#   docker build --target mlflow     -t ghcr.io/xstilts/mlflow:0.1.0 .      # tracking server for k8s/
#
# Base images are pinned by tag; Python packages by the versions pyproject.toml pins for
# [train] (torch, DeepSpeed, transformers, datasets, accelerate, MLflow). Every final stage
# runs as user 1000 and carries no compiler.
#
# Two build arguments serve the tests, which build these images without a registry
# (scripts/build-images.sh, with buildah): PYTHON_BASE replaces the python image by a
# local one (a Debian bookworm root filesystem with Python 3.11, made offline), and
# TRAINER_FLAVOR=cpu builds the trainer on that base without the CUDA images: torch from
# PyPI, DeepSpeed with no prebuilt ops (they compile just in time; DS_ACCELERATOR=cpu).
# The defaults are the production images.
ARG PYTHON_BASE=python:3.11.14-slim-bookworm
ARG TRAINER_FLAVOR=cuda

# --- the xstilts wheel, shared by the trainer and the controller ---------------------------
FROM ${PYTHON_BASE} AS wheel
WORKDIR /src
# .dockerignore lets in only the package sources, pyproject.toml and README.md.
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- controller: the core only (spec, plan, render, reconcile, CLI), no torch ------------
FROM ${PYTHON_BASE} AS controller
LABEL org.opencontainers.image.title="xstilts controller" \
      org.opencontainers.image.description="Reconciles xstilts Experiments into Kubernetes Jobs" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# pyproject.toml's version (tests/test_dockerfile.py checks they agree).
ARG XSTILTS_VERSION=0.1.0
# A layer-cache key for builders whose cache does not see a bind mount's content (buildah
# 1.28): scripts/build-images.sh passes the sources' hash. Docker builds can leave it.
ARG SOURCE_DIGEST=none
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --find-links=/wheels "xstilts==${XSTILTS_VERSION}"
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["xstilts"]
CMD ["controller"]

# --- mlflow: the tracking server with the PostgreSQL and S3 clients ----------------------
FROM ${PYTHON_BASE} AS mlflow
LABEL org.opencontainers.image.title="xstilts mlflow" \
      org.opencontainers.image.description="MLflow tracking server with PostgreSQL and S3 support" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg[binary]==3.3.9" boto3==1.44.8
USER 1000:1000
WORKDIR /tmp
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]

# --- trainer build: Python 3.11, torch, DeepSpeed ops compiled against the CUDA toolkit -----
FROM nvidia/cuda:13.2.1-cudnn-devel-ubuntu24.04 AS trainer-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Compilers for DeepSpeed's C++/CUDA ops; this stage is discarded, only /opt is kept.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu 24.04 ships Python 3.12; a standalone CPython 3.11 build lives in /opt/python.
COPY --from=ghcr.io/astral-sh/uv:0.13.8 /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1
RUN uv python install 3.11.14 && uv venv --seed --python 3.11.14 /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Versions: the [train] pins of pyproject.toml (tests/test_dockerfile.py checks they agree).
ARG TORCH_VERSION=2.15.0
ARG DEEPSPEED_VERSION=0.19.8
ARG XSTILTS_VERSION=0.1.0
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"
# Prebuilt ops: CPU Adam for ZeRO offload, fused Adam, and the utils ZeRO-3 needs. The
# runtime image has no nvcc, so nothing is compiled just in time on a GPU node.
# Architectures: A100 (8.0), H100/H200 (9.0), B200 (10.0). A layer of its own: torch's
# layer (several GB) stays cached when only DeepSpeed's build changes.
# hadolint ignore=DL3059
RUN DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0" \
    pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --find-links=/wheels "xstilts[train]==${XSTILTS_VERSION}"

# --- trainer (CUDA): the image every run's pod executes --------------------------------------
FROM nvidia/cuda:13.2.1-cudnn-runtime-ubuntu24.04 AS trainer-cuda
LABEL org.opencontainers.image.title="xstilts trainer" \
      org.opencontainers.image.description="One xstilts training run: python -m xstilts.trainer RUN.json" \
      org.opencontainers.image.licenses="Apache-2.0"
# libgomp: the OpenMP runtime of DeepSpeed's CPU Adam. The image's default user `ubuntu`
# holds uid 1000; it becomes `xstilts`, the uid the Jobs run as.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu || true) \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin xstilts
COPY --from=trainer-build /opt/python /opt/python
COPY --from=trainer-build /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /tmp
CMD ["python", "-m", "xstilts.trainer", "--help"]

# --- trainer (CPU, for tests): TRAINER_FLAVOR=cpu --------------------------------------------
# No compiler: DeepSpeed installs without building ops. Torch gets a layer of its own, so a
# change of the xstilts sources rebuilds only the last, small layer.
FROM ${PYTHON_BASE} AS trainer-cpu
LABEL org.opencontainers.image.title="xstilts trainer (CPU)" \
      org.opencontainers.image.description="One xstilts training run on CPU: python -m xstilts.trainer RUN.json" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DS_ACCELERATOR=cpu \
    DS_BUILD_OPS=0
ARG TORCH_VERSION=2.15.0
ARG DEEPSPEED_VERSION=0.19.8
ARG XSTILTS_VERSION=0.1.0
RUN (id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin xstilts) \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}"
# hadolint ignore=DL3059
RUN pip install --no-cache-dir --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"
# A layer-cache key for builders whose cache does not see a bind mount's content (buildah
# 1.28): scripts/build-images.sh passes the sources' hash. Docker builds can leave it.
ARG SOURCE_DIGEST=none
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-cache-dir --find-links=/wheels "xstilts[train]==${XSTILTS_VERSION}"
USER 1000:1000
WORKDIR /tmp
CMD ["python", "-m", "xstilts.trainer", "--help"]

# --- trainer: the target to build; TRAINER_FLAVOR picks CUDA (default) or CPU --------------
# hadolint ignore=DL3006
FROM trainer-${TRAINER_FLAVOR} AS trainer
