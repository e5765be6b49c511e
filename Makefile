# The two quickstart commands:
#   make main   set up, then run the main job end to end (train, evaluate, ...)
#   make test   set up, then lint and run the test suite (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a machine without it on disk, add
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" to avoid a CUDA download.
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
DATA_DIR ?= $(if $(wildcard ../shared/data/mnist/train-images-idx3-ubyte.gz),../shared/data/mnist,)
DATA_FLAG = $(if $(DATA_DIR),--data-dir $(DATA_DIR),)
RUN ?= runs/seed
BIN = $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: main test setup lint pytest service-image-check clean

setup: $(VENV)/.installed

TRITONCLIENT ?= tritonclient[grpc,http]==2.73.0

$(VENV)/.installed: pyproject.toml setup.py $(wildcard protos/*/*.proto protos/*/*/*.proto)
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "vaeserve needs Python >= 3.10"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[train,embed,ray,test]'
	$(BIN)/python -m pip install --quiet --no-deps "$(TRITONCLIENT)"
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint pytest service-image-check

pytest: setup
	$(BIN)/python -m pytest

# The Docker service image's dependency set, in a clean venv, serving a tiny exported model.
service-image-check: setup
	rm -rf build/image-check
	$(BIN)/vae train --preset seed $(DATA_FLAG) --hidden-sizes 32 --latent-size 4 --limit 2000 --epochs 1 \
		--no-progress --out build/image-check/run
	$(BIN)/vae export --checkpoint build/image-check/run --repo build/image-check/models --name tiny \
		--iw-samples 2 $(DATA_FLAG) --no-progress
	scripts/check_service_image.sh build/image-check/models

main: setup
	DATA_DIR=$(DATA_DIR) RUN_DIR=$(RUN) scripts/main_job.sh

clean:
	rm -rf $(VENV) runs models build *.egg-info
