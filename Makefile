# Two commands on a fresh machine: `make demo` runs the default matrix, `make test` runs the tests.
# Both create the virtual environment and install everything they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# PyPI's Linux torch is the CUDA build (~3 GB of NVIDIA libraries): a machine without a GPU takes the CPU
# wheel, from an index or wheel folder pip is configured with where one has it, else from PyTorch's CPU index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Only Linux x86_64 has both builds under one version (the CPU one labelled +cpu); elsewhere torch==2.13.0 is the CPU build.
TORCH_CPU := $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),torch==2.13.0+cpu,torch==2.13.0)

.PHONY: demo test lint install clean browser mutation

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA GPU found: CUDA torch and onnxruntime-gpu"; \
		$(PY) -m pip install -q -e '.[gpu,ray,test]'; \
	else \
		echo "no GPU: CPU torch 2.13.0 and onnxruntime"; \
		{ $(PY) -m pip install -q '$(TORCH_CPU)' 2>/dev/null \
		  || $(PY) -m pip install -q torch==2.13.0 --index-url $(TORCH_CPU_INDEX); } \
		&& $(PY) -m pip install -q -e '.[cpu,ray,test]'; \
	fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/infermatrix run

# The HTML report's test opens it in Debian's chromium; install it where apt-get can run,
# otherwise that test skips and says why (CI sets INFERMATRIX_REQUIRE_BROWSER so it fails instead).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; \
		elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
			sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core; \
		else echo "chromium missing and apt-get unavailable without root: the browser test will skip"; fi; }

# The suite in parallel over the cores (at most 4 workers: each runs its own cells), then the
# truth tests, which time the harness against an independent measurement, apart from it: the
# two of them side by side, each with one measured process on one thread at a time.
test: $(STAMP) browser
	$(VENV)/bin/ruff check optimize bench tests
	$(VENV)/bin/pytest -q -n auto --maxprocesses 4 --dist worksteal -m "not truth"
	$(VENV)/bin/pytest -q -n 2 -m truth

# Mutation testing of the core (not part of `make test`): mutmut per module group, each judged by
# its own tests; prints the score per group and every surviving mutant. See ci/mutation/.
mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[mutation]'
	$(PY) ci/mutation/run.py $(GROUPS)

lint: $(STAMP)
	$(VENV)/bin/ruff check optimize bench tests

clean:
	rm -rf $(VENV) .pytest_cache .mutation
