# One file, three images (pick with --target; `make images` builds all three):
#   service       vae serve on onnxruntime (CPU): numpy, onnxruntime, grpcio, protobuf, vaeserve
#   service-cuda  the same on onnxruntime-gpu, its CUDA and cuDNN libraries from PyPI wheels;
#                 serves on the CPU where no GPU is visible
#   train         torch (CPU build) for vae train / evaluate / export / client
# BASE_IMAGE is any Debian-like image with python3 3.11 and its venv module: the official
# python image where Docker Hub can be reached, else one made from Debian's packages
# (docker/debian-base.sh; `make images PYTHON_BASE=debian`).
# Dependencies are installed from pinned lists before the code is copied, so a code change
# rebuilds only the last layers.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

# --- python: a venv, the vae user, and pip that trusts the CA bundle pip trusts on the host ---
FROM ${BASE_IMAGE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/pip.sh /opt/build/pip.sh
COPY docker/local/ca/ /opt/build/ca/
RUN python3 -m venv /opt/venv \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin vae \
    && mkdir /models && chown vae /models

# --- wheel: builds vaeserve (setup.py generates the gRPC stubs from protos/) -----------------
FROM python AS wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY vaeserve vaeserve
COPY training training
COPY export export
COPY service service
COPY embed embed
RUN /opt/build/pip.sh wheel --no-deps --wheel-dir /dist .

# --- service ----------------------------------------------------------------------------------
FROM python AS service
COPY docker/requirements-service.txt /opt/build/
RUN /opt/build/pip.sh install -r /opt/build/requirements-service.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
USER vae
ENV VAESERVE_REPO=/models VAESERVE_HOST=0.0.0.0 VAESERVE_PORT=50051 VAESERVE_HTTP_PORT=8000 \
    VAESERVE_METRICS_PORT=9464 VAESERVE_POLL_S=30
VOLUME ["/models"]
EXPOSE 50051 8000 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["vae", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["vae", "serve"]

# --- train ------------------------------------------------------------------------------------
FROM python AS train
ENV MPLCONFIGDIR=/tmp/matplotlib
COPY docker/requirements-service.txt docker/requirements-train.txt /opt/build/
COPY docker/local/wheels/ /opt/build/wheels/
# torch's CPU build: the local wheel `make images` put in docker/local/wheels, else PyTorch's CPU
# index (PyPI's torch is the multi-GB CUDA build).
RUN set -e; wheel=$(ls /opt/build/wheels/torch-2.13.0*.whl 2>/dev/null | head -n 1); \
    if [ -n "$wheel" ]; then /opt/build/pip.sh install "$wheel"; \
    else /opt/build/pip.sh install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; fi; \
    rm -rf /opt/build/wheels \
    && /opt/build/pip.sh install -r /opt/build/requirements-service.txt -r /opt/build/requirements-train.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist \
    && mkdir -p /work /data && chown vae /work /data
COPY scripts/train_and_export.sh /usr/local/bin/train-and-export
USER vae
WORKDIR /work
ENV REPO=/models VAESERVE_CACHE_DIR=/work/cache
VOLUME ["/models", "/work"]
ENTRYPOINT ["train-and-export"]

# --- service-cuda: onnxruntime-gpu in place of onnxruntime, nothing else changes --------------
FROM python AS service-cuda
COPY docker/requirements-service.txt docker/requirements-cuda.txt /opt/build/
RUN grep -v '^onnxruntime==' /opt/build/requirements-service.txt > /opt/build/requirements-cpu-free.txt \
    && /opt/build/pip.sh install -r /opt/build/requirements-cpu-free.txt -r /opt/build/requirements-cuda.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
USER vae
ENV VAESERVE_REPO=/models VAESERVE_HOST=0.0.0.0 VAESERVE_PORT=50051 VAESERVE_HTTP_PORT=8000 \
    VAESERVE_METRICS_PORT=9464 VAESERVE_POLL_S=30 VAESERVE_DEVICE=auto \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/models"]
EXPOSE 50051 8000 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["vae", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["vae", "serve"]
