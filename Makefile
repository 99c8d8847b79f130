# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vidret-installed
# torch is pinned: an open range would pull several GB of CUDA wheels on a machine without torch.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-all lint typecheck bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev,hf,serve,plot,ann]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vidret demo

test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m ddp

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
