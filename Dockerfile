# syntax=docker/dockerfile:1
# The inspection service image, torch-free. Two runtime targets:
#   gpu (default): NVIDIA CUDA 13 + cuDNN runtime, onnxruntime-gpu and TensorRT 10 (the `gpu` extra)
#   cpu:           slim Python with onnxruntime (the `cpu` extra)
# Both carry the `plant` extra (psycopg, alembic, boto3): a station forwards its records to a central PostgreSQL
# and its NG images to object storage when `central` is configured (docs/records.md, "Plant-wide records").
# Build stages install into a virtualenv at /opt/aoi that the runtime stage copies; no compiler, pip cache or
# source tree reaches the final images. Bundles are mounted read-only at /bundles; TensorRT engines built on
# first start go to the /var/cache/aoi volume so they are built once per GPU. Inspection records (SQLite), the NG
# image archive and the signal outbox go to the /var/lib/aoi volume (AOI_DATA_DIR): the service refuses to start
# when its data dir is not writable, and the root filesystem is read-only under compose.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# --- the project wheel: only the torch-free packages the service needs (aoi CLI + service) ---
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aoi ./aoi
COPY service ./service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- cpu: venv with the cpu extra ---
FROM ${PYTHON_IMAGE} AS cpu-build
COPY --from=wheel /wheels /wheels
RUN python -m venv /opt/aoi \
    && /opt/aoi/bin/pip install --no-cache-dir "$(find /wheels -name 'aoi_inspect-*.whl')[cpu,plant]"

FROM ${PYTHON_IMAGE} AS cpu
ENV PATH=/opt/aoi/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AOI_HOST=0.0.0.0 \
    AOI_PORT=8000 \
    AOI_BUNDLE=/bundles/default \
    AOI_BACKEND=auto \
    AOI_ENGINE_CACHE=/var/cache/aoi/engines \
    AOI_DATA_DIR=/var/lib/aoi
RUN groupadd --system --gid 10001 aoi \
    && useradd --system --uid 10001 --gid aoi --no-create-home --shell /usr/sbin/nologin aoi \
    && mkdir -p /bundles /var/cache/aoi/engines /var/lib/aoi \
    && chown -R aoi:aoi /var/cache/aoi /var/lib/aoi
COPY --from=cpu-build /opt/aoi /opt/aoi
VOLUME ["/var/cache/aoi"]
VOLUME ["/var/lib/aoi"]
USER 10001:10001
EXPOSE 8000
# The slim image has no curl: probe /healthz with the interpreter that is already there.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AOI_PORT', '8000'), timeout=2)"]
# SIGTERM (docker stop, compose) is the graceful stop: readiness off, admitted requests answered, records and the
# outbox flushed within AOI_STOP_TIMEOUT_MS, exit 0. The stop grace period must be longer (compose: 30 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["aoi", "serve"]

# --- gpu: Ubuntu's Python 3.12 on the CUDA image, venv with the gpu extra ---
FROM ${CUDA_IMAGE} AS gpu-build
# Versions come from the pinned CUDA base image's Ubuntu release; pinning each Debian revision here would break
# the build at every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/aoi \
    && /opt/aoi/bin/pip install --no-cache-dir "$(find /wheels -name 'aoi_inspect-*.whl')[gpu,plant]"

FROM ${CUDA_IMAGE} AS gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 aoi \
    && useradd --system --uid 10001 --gid aoi --no-create-home --shell /usr/sbin/nologin aoi \
    && mkdir -p /bundles /var/cache/aoi/engines /var/lib/aoi \
    && chown -R aoi:aoi /var/cache/aoi /var/lib/aoi
ENV PATH=/opt/aoi/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AOI_HOST=0.0.0.0 \
    AOI_PORT=8000 \
    AOI_BUNDLE=/bundles/default \
    AOI_BACKEND=auto \
    AOI_ENGINE_CACHE=/var/cache/aoi/engines \
    AOI_DATA_DIR=/var/lib/aoi \
    CUDA_CACHE_PATH=/var/cache/aoi/cuda
COPY --from=gpu-build /opt/aoi /opt/aoi
VOLUME ["/var/cache/aoi"]
VOLUME ["/var/lib/aoi"]
USER 10001:10001
EXPOSE 8000
# Generous start period: the first start on a new GPU builds the TensorRT engine before the server listens.
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AOI_PORT', '8000'), timeout=2)"]
# Graceful stop on SIGTERM, as in the cpu stage.
STOPSIGNAL SIGTERM
ENTRYPOINT ["aoi", "serve"]
