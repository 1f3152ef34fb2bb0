# Two commands on a fresh machine: `make demo` runs the default matrix, `make test` runs the tests.
# Both create the virtual environment and install everything they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: CUDA torch and onnxruntime-gpu"; \
		$(PY) -m pip install -q -e '.[gpu,ray,test]'; \
	else \
		echo "no GPU: CPU torch 2.13.0 and onnxruntime"; \
		$(PY) -m pip install -q torch==2.13.0 && $(PY) -m pip install -q -e '.[cpu,ray,test]'; \
	fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/infermatrix run

test: $(STAMP)
	$(VENV)/bin/ruff check optimize bench tests
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check optimize bench tests

clean:
	rm -rf $(VENV) .pytest_cache
