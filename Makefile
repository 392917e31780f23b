# mlkd developer tasks. Everything installs into .venv; nothing touches the system Python.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MLKD   := $(VENV)/bin/mlkd
# The torch build this workplace resolves from local disk; users elsewhere may bring any torch>=2.1.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
# `make bench TIMM_REPO=DIR`: a clone or mirror of pytorch-image-models, whose train.py the peers
# row runs beside mlkd (without it, that row times mlkd's two settings alone).
TIMM_REPO ?=
comma := ,

.PHONY: install test test-fast demo bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# pip byte-compiles at install time on purpose: where PYTHONDONTWRITEBYTECODE is set (it is
	# on these machines) nothing would cache a compiled module, and every process of the suite
	# would compile torch again (tried with --no-compile: the suite took 10:44 against 8:28).
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# pytest-xdist: the suite in TEST_WORKERS processes (auto: one a core; 0: this one), each on one
# thread (tests/conftest.py). On 2 cores: 762 tests in 5 min 10 s, where 660 took 7 min 51 s
# one at a time.
TEST_WORKERS ?= auto

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

demo: install
	$(MLKD) pipeline --preset digits --run-dir runs/demo

bench: install
	$(PY) benchmarks/small_models.py
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/teacher_input.py
	$(PY) benchmarks/latency_staged.py --quick
	$(PY) benchmarks/peers.py --quick $(if $(TIMM_REPO),--timm-repo $(TIMM_REPO),--tools mlkd-timm$(comma)mlkd)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info runs .pytest_cache
