# The two quickstart commands:
#   make main   set up, then run the main job end to end (train, evaluate, ...)
#   make test   set up, then lint and run the test suite (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= $(if $(wildcard ../shared/data/mnist/train-images-idx3-ubyte.gz),../shared/data/mnist,)
DATA_FLAG = $(if $(DATA_DIR),--data-dir $(DATA_DIR),)
RUN ?= runs/seed
# The images' base: auto (the official python image if it can be pulled, else one made from
# Debian's packages), official or debian.
PYTHON_BASE ?= auto
BIN = $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: main test setup lock lint pytest engine images test-images browser clean

setup: $(VENV)/.installed

# .venv exactly as uv.lock pins it (scripts/setup.sh): a CPython 3.11, torch's CPU wheel from
# /opt/wheels, everything else from PyPI with the lock's hashes.
$(VENV)/.installed: pyproject.toml uv.lock setup.py scripts/setup.sh $(wildcard protos/*/*.proto protos/*/*/*.proto)
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh
	touch $@

# After editing pyproject.toml's dependencies: uv.lock follows (changing no pin it need not) and the
# images' docker/requirements-*.txt are exported from it. UPGRADE=1 moves every pin to the newest
# release pyproject.toml admits.
lock:
	@test -x $(BIN)/uv || PYTHON=$(PYTHON) VENV=$(VENV) scripts/setup.sh
	UV=$(BIN)/uv scripts/lock.sh $(if $(UPGRADE),--upgrade,)

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
