# `make demo` and `make test` work on a fresh machine: each sets up .venv first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
# A CPU build of torch from local disk; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv install test demo clean ext browser

$(VPY):
	$(PY) -m venv $(VENV)

venv: $(VPY)

# Stamp file: reinstall when the packaging files change.
$(VENV)/.installed: $(VPY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc csrc/sim/*.cpp csrc/sim/*.h csrc/cuda/*.cu)
	@$(VPY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "setuptools>=77" wheel "pybind11>=2.11"
	$(PIP) install -q --no-build-isolation -e ".[test,plot,ray]"
	@touch $@

install: $(VENV)/.installed

ext: install
	$(VPY) setup.py -q build_ext --inplace

# Headless Chromium for the report test (moecache analyze). Best effort: where apt cannot install it,
# that test is skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) \
	  && echo "installed chromium" || echo "chromium not installed: the browser test will be skipped"; }

test: install browser
	$(VPY) -m moecache doctor
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# The embedded default model (a small Qwen3-MoE trained on the Python standard library, shipped in the
# package) writes code offloaded, on CUDA if present, else the CPU; --check compares the tokens with the
# unpatched model's. Then it records its routing and prints a short analysis (moecache/demo.py).
DEMO_ARGS ?=
demo: install
	$(VPY) -m moecache.demo $(DEMO_ARGS)

clean:
	rm -rf build *.egg-info moecache/_C*.so $(VENV)/.installed
