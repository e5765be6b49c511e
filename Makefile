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

.PHONY: main test setup lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "vaeserve needs Python >= 3.10"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[train,test]'
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

main: setup
	$(BIN)/vae train --preset seed $(DATA_FLAG) --out $(RUN) $(if $(wildcard $(RUN)/checkpoint.pt),--resume,)
	$(BIN)/vae evaluate --run $(RUN) $(DATA_FLAG)

clean:
	rm -rf $(VENV) runs models build *.egg-info
