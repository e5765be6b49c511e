# syntax=docker/dockerfile:1.7
# One file, three images (pick with --target):
#   service       vae serve on onnxruntime (CPU): numpy, onnxruntime, grpcio, protobuf, vaeserve
#   service-cuda  the same on onnxruntime-gpu over an NVIDIA CUDA runtime base
#   train         torch (CPU build) for vae train / evaluate / export
# Dependencies are installed from pinned lists before the code is copied, so a code change
# rebuilds only the last layers.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- wheel: builds vaeserve (setup.py generates the gRPC stubs from protos/) -----------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2.post1
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY vaeserve vaeserve
COPY training training
COPY export export
COPY service service
RUN python -m build --wheel --outdir /dist

# --- service ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS service
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY docker/requirements-service.txt /tmp/requirements-service.txt
RUN pip install --no-cache-dir -r /tmp/requirements-service.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin vae \
    && mkdir /models && chown vae /models
USER vae
ENV VAESERVE_REPO=/models VAESERVE_HOST=0.0.0.0 VAESERVE_PORT=50051 VAESERVE_HTTP_PORT=8000 \
    VAESERVE_METRICS_PORT=9464 VAESERVE_POLL_S=30
VOLUME ["/models"]
EXPOSE 50051 8000 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["vae", "health"]
ENTRYPOINT ["vae", "serve"]

# --- service-cuda -----------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS service-cuda
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
COPY docker/requirements-service.txt /tmp/requirements-service.txt
RUN sed 's/^onnxruntime==/onnxruntime-gpu==/' /tmp/requirements-service.txt > /tmp/requirements-gpu.txt \
    && pip install --no-cache-dir -r /tmp/requirements-gpu.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin vae \
    && mkdir /models && chown vae /models
USER vae
ENV VAESERVE_REPO=/models VAESERVE_HOST=0.0.0.0 VAESERVE_PORT=50051 VAESERVE_HTTP_PORT=8000 \
    VAESERVE_METRICS_PORT=9464 VAESERVE_POLL_S=30 VAESERVE_DEVICE=cuda
VOLUME ["/models"]
EXPOSE 50051 8000 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["vae", "health"]
ENTRYPOINT ["vae", "serve"]

# --- train ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS train
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp/matplotlib
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY docker/requirements-service.txt docker/requirements-train.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/requirements-service.txt -r /tmp/requirements-train.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin vae \
    && mkdir -p /models /work /data && chown vae /models /work /data
COPY --chown=vae scripts/train_and_export.sh /usr/local/bin/train-and-export
USER vae
WORKDIR /work
ENV REPO=/models VAESERVE_CACHE_DIR=/work/cache
VOLUME ["/models", "/work"]
ENTRYPOINT ["train-and-export"]
