# Quick start: `make demo` (install, synthesise data, train, evaluate, write results + pictures)
# and `make test`. Everything installs into .venv from constraints.txt (the tested pins).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: install test test-all lint demo bench bench-faults gpu-check clean

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PY) -m torchreid_vi.evaluation.compiled
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

demo: $(STAMP)
	$(PY) -m torchreid_vi.tools.demo --out $(DEMO_DIR)

bench: $(STAMP)
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_datamanager.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_ddp.py

# >= 20 SIGKILL/SIGTERM faults at random moments of a small run, resumed each time (~5-15 min)
bench-faults: $(STAMP)
	$(PY) benchmarks/fault_injection.py

# on a CUDA machine; `make gpu-check GPU_CHECK_ARGS=--dry` anywhere
gpu-check: $(STAMP)
	PYTHON=$(PY) bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) log
