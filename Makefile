# Fresh machine: `make demo` (install + main job) and `make test` (install + test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check
# torch is pinned in the same pip command as the project so pip takes the local CPU wheel (see README)
INSTALL := torch==2.13.0 -e ".[dev,bench,zoo]"
# the per-sample-gradient peers of `gradgraph bench capture` declare torchvision (which pulls a CUDA torch):
# install them without dependencies, then the dependencies they use (torch pinned again, so nothing moves)
NODEPS := backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1
PEERDEPS := torch==2.13.0 unfoldNd==0.2.3 einops==0.8.2 einconv==0.1.0 linear_operator==0.6.1 opt-einsum==3.4.0

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) $(INSTALL)
	$(PIP) --no-deps $(NODEPS)
	$(PIP) $(PEERDEPS)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/gradgraph bench curvature --preset demo --out-dir runs/demo --results runs/demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check gradgraph tests benchmarks
	$(PY) -m pytest -q

.PHONY: install demo test
