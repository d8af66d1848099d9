# Quick start: `make demo` (install, synthesise data, train, evaluate, write results + pictures)
# and `make test`. Everything installs into .venv from constraints.txt (the tested pins).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: install test test-all demo bench clean

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

demo: $(STAMP)
	$(PY) -m torchreid_vi.tools.demo --out $(DEMO_DIR)

bench: $(STAMP)
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_datamanager.py
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) log
