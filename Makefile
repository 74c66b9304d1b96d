# The README's commands. Each target creates the virtual environment on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test test-fast test-floors bench install clean

$(BIN)/longlora: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first: a plain `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/longlora

quickstart: install
	$(BIN)/longlora quickstart $(ARGS)

test: install
	MALLOC_MMAP_THRESHOLD_=65536 $(BIN)/pytest -q tests $(ARGS)

test-fast: install
	$(BIN)/pytest -q tests -m "not slow" $(ARGS)

# The non-slow suite at the lowest versions pyproject.toml declares (.ci/floors.txt), in its own virtual environment.
FLOORS ?= .venv-floors
test-floors:
	$(PY) -m venv $(FLOORS)
	$(FLOORS)/bin/pip install -q --upgrade pip
	$(FLOORS)/bin/pip install -q torch==2.13.0
	$(FLOORS)/bin/pip install -q -c .ci/floors.txt -e '.[dev]'
	$(FLOORS)/bin/python -c "import transformers, peft, accelerate, datasets as d; print('floors: transformers', \
	transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'datasets', d.__version__)"
	MALLOC_MMAP_THRESHOLD_=65536 $(FLOORS)/bin/pytest -q tests -m "not slow" $(ARGS)

bench: install
	$(BIN)/python benchmarks/attention.py

clean:
	rm -rf $(VENV) $(FLOORS) build src/*.egg-info .pytest_cache
