# Fresh machine: `make demo` (install + main job) and `make test` (install + test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned in the same pip command as the project so pip takes the local CPU wheel (see README)
INSTALL := torch==2.13.0 -e ".[dev]"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check $(INSTALL)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/gradgraph inspect --model gpt

test: $(VENV)/.installed
	$(PY) -m pytest -q

.PHONY: install demo test
