# rwkv7-appliance: `make train` (CPU default recipe `tiny`) and `make test` work on a fresh clone.
# GPU:  make train RECIPE=0.1b        Container: make image && make up        Tests on a GPU: make gpu-test
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

train: setup
	$(BIN)/python entrypoint.py train --recipe $(RECIPE) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

# Regenerate recipes/expected/tiny.log from a fresh CPU run (and record the environment it was made on).
golden: setup
	$(BIN)/python -m rwkv7.golden tiny

gpu-test: setup
	bash bench/gpu_suite.sh

clean:
	rm -rf out .pytest_cache
