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
# The images' base: auto (the official python image if it can be pulled, else one made from
# Debian's packages), official or debian.
PYTHON_BASE ?= auto
BIN = $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: main test setup lint pytest engine images test-images browser clean

setup: $(VENV)/.installed

TRITONCLIENT ?= tritonclient[grpc,http]==2.73.0

$(VENV)/.installed: pyproject.toml setup.py $(wildcard protos/*/*.proto protos/*/*/*.proto)
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "vaeserve needs Python >= 3.10"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[train,embed,store,ray,test]'
	$(BIN)/python -m pip install --quiet --no-deps "$(TRITONCLIENT)"
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint test-images browser pytest

pytest: setup
	$(BIN)/python -m pytest

# A Docker engine and Compose v2: started, or installed and started (root with apt), where missing.
engine:
	scripts/docker_engine.sh

# vaeserve, vaeserve-train and vaeserve-cuda, tagged latest and the package version.
images: engine
	PYTHON_BASE=$(PYTHON_BASE) scripts/images.sh

# make test builds the images where an engine runs or can be started (tests/test_images.py runs
# them); elsewhere one line says why not, and those tests skip.
test-images:
	@if scripts/docker_engine.sh; then PYTHON_BASE=$(PYTHON_BASE) scripts/images.sh; \
	else echo "images: not built, no Docker engine can run here (tests/test_images.py skips)"; fi

# Headless Chromium for the web console's tests: installed with apt where missing (root); elsewhere
# one line says why not, and those tests skip.
browser:
	@scripts/browser.sh || echo "browser: the console's browser tests will skip"

main: setup
	DATA_DIR=$(DATA_DIR) RUN_DIR=$(RUN) scripts/main_job.sh

clean:
	rm -rf $(VENV) runs models build *.egg-info
