# rwkv7-appliance: `make train` (CPU default recipe `tiny`) and `make test` work on a fresh clone.
# GPU:  make train RECIPE=0.1b [DEVICES=N]        Container: make image && make up        Tests on a GPU: make gpu-test
PY ?= python3
VENV ?= .venv
RECIPE ?= tiny
ARGS ?=
# torch is installed first and on its own: deepspeed's build imports it, and a bare `pip install deepspeed` would
# pull a multi-GB CUDA torch. On a GPU VM pick the build for your CUDA, e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin
export WANDB_MODE ?= disabled

.PHONY: setup train test golden gpu-test image up clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools<81" wheel
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

# DEVICES=N (GPUs on this host) and NODES=M (hosts; see scripts/multihost.sh) override the recipe
train: setup
	$(BIN)/python entrypoint.py train --recipe $(RECIPE) $(if $(DEVICES),--set train.devices=$(DEVICES)) \
		$(if $(NODES),--set train.num_nodes=$(NODES)) $(ARGS)

# TEST_JOBS pytest processes (pytest-xdist; 0: one process). Whole files go to a worker, so that the tests of a file
# share its module fixtures (test_train's reference run, test_data_parallel's 1/2/4-process runs).
TEST_JOBS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile $(ARGS)

# Regenerate recipes/expected/tiny.log from a fresh CPU run (and record the environment it was made on).
golden: setup
	$(BIN)/python -m rwkv7.golden tiny

gpu-test: setup
	bash bench/gpu_suite.sh

clean:
	rm -rf out .pytest_cache

# --- Container appliance (docs/CONTAINER.md) ---------------------------------------------------------------------
# make image [IMAGE=rwkv7:latest] [IMAGE_ARCH_LIST="9.0"] [IMAGE_BUILD_ARGS="--build-arg SKIP_KERNEL=1"]
# make up [RECIPE=1.5b] [ARGS="--fresh"] [DEVICES=8]      (DEVICES adds compose.multigpu.yaml)
# make image-test                                         (CI: offline base, build, train tiny in the container; root)
DOCKER ?= docker
COMPOSE ?= docker compose
IMAGE ?= rwkv7:latest
IMAGE_ARCH_LIST ?= 8.0;8.6;8.9;9.0;10.0;12.0
IMAGE_BUILD_ARGS ?=
DEVICES ?=
.PHONY: image-test

image:
	$(DOCKER) build -t $(IMAGE) --build-arg TORCH_CUDA_ARCH_LIST="$(IMAGE_ARCH_LIST)" $(IMAGE_BUILD_ARGS) .

up:
	$(if $(filter command line environment,$(origin RECIPE)),RECIPE="$(RECIPE)") ARGS="$(ARGS)" \
	$(if $(DEVICES),DEVICES="$(DEVICES)") RWKV7_IMAGE="$(IMAGE)" \
	$(COMPOSE) -f compose.yaml $(if $(DEVICES),-f compose.multigpu.yaml) up

image-test:
	bash tests/container/ci_image.sh
