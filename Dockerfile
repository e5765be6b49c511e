# One file, three images (pick with --target; `make images` builds all three):
#   service       vae serve on onnxruntime (CPU): numpy, onnxruntime, grpcio, protobuf, vaeserve
#   service-cuda  the same on onnxruntime-gpu, its CUDA and cuDNN libraries from PyPI wheels;
#                 serves on the CPU where no GPU is visible
#   train         torch (CPU build) for vae train / evaluate / export / client
# BASE_IMAGE is any Debian-like image with python3 3.11 and its venv module: the official
# python image where Docker Hub can be reached, else one made from Debian's packages
# (docker/debian-base.sh; `make images PYTHON_BASE=debian`).
# Every install reads docker/requirements-*.txt, exported from uv.lock with their hashes
# (scripts/lock.sh), before the code is copied, so a code change rebuilds only the last layers.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm

# --- python: a venv, the vae user, and pip that trusts the CA bundle pip trusts on the host ---
FROM ${BASE_IMAGE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/pip.sh /opt/build/pip.sh
COPY docker/local/ca/ /opt/build/ca/
# The lock is for CPython 3.11: pip would skip every requirement whose marker another Python fails.
RUN python3 -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "the lock needs CPython 3.11; BASE_IMAGE has " + sys.version)' \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --create-home --shell /usr/sbin/nologin vae \
    && mkdir /models && chown vae /models

# --- wheel: builds vaeserve (setup.py generates the gRPC stubs from protos/) -----------------
# With the lock's build group and no isolation: the stubs come from the grpcio-tools pinned with
# the grpcio they run on.
FROM python AS wheel
WORKDIR /src
COPY docker/requirements-build.txt /opt/build/
RUN /opt/build/pip.sh install --require-hashes -r /opt/build/requirements-build.txt
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY vaeserve vaeserve
COPY training training
COPY export export
COPY service service
COPY embed embed
RUN /opt/build/pip.sh wheel --no-deps --no-build-isolation --wheel-dir /dist .

# --- service ----------------------------------------------------------------------------------
FROM python AS service
COPY docker/requirements-service.txt /opt/build/
RUN /opt/build/pip.sh install --require-hashes -r /opt/build/requirements-service.txt
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
COPY docker/requirements-train.txt /opt/build/
# torch's CPU build: the lock names the wheel by its path, /opt/wheels/torch-2.13.0+cpu-...whl, and
# its hash; `make images` stages the host's copy in docker/local/wheels (PyPI's torch is the
# multi-GB CUDA build).
COPY docker/local/wheels/ /opt/wheels/
RUN /opt/build/pip.sh install --require-hashes -r /opt/build/requirements-train.txt && rm -rf /opt/wheels
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
COPY docker/requirements-cuda.txt /opt/build/
RUN /opt/build/pip.sh install --require-hashes -r /opt/build/requirements-cuda.txt
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
