# Two commands: `make demo` and `make test`. Both create .venv/ on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): setup.py constraints.txt tools/torchvision_shim.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 torchvision==0.28.0
	$(PY) tools/torchvision_shim.py
	$(PIP) -e ".[dev,knn]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m diffusers_pafm.demo --output_dir demo_output

test: $(STAMP)
	$(VENV)/bin/ruff check diffusers_pafm training examples benchmarks tests tools
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check diffusers_pafm training examples benchmarks tests tools
	$(VENV)/bin/ruff format --check diffusers_pafm training examples benchmarks tests tools

clean:
	rm -rf $(VENV) demo_output
