# `make demo` and `make test` work on a fresh machine: each sets up .venv first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# A CPU build of torch from local disk; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv install test demo clean ext

$(VPY):
	$(PY) -m venv $(VENV)

venv: $(VPY)

# Stamp file: reinstall when the packaging files change.
$(VENV)/.installed: $(VPY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/cuda/*.cu)
	@$(VPY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "setuptools>=68" wheel "pybind11>=2.11"
	$(PIP) install -q --no-build-isolation -e ".[test,plot]"
	@touch $@

install: $(VENV)/.installed

ext: install
	$(VPY) setup.py -q build_ext --inplace

test: install
	$(VPY) -m moecache doctor
	$(VPY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info moecache/_C*.so $(VENV)/.installed
