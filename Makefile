# Fresh machine: `make demo` (install + main job) and `make test` (install + test suite). Other targets:
# `make notebooks` (run the tutorial notebooks), `make lab` (open them in JupyterLab), `make docs` (API docs,
# warnings as errors), `make bench-peers` (the per-sample-gradient libraries `gradgraph bench capture` compares).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check
# torch is pinned in every pip command so pip takes the local CPU wheel and nothing moves (see README)
TORCH := torch==2.13.0
# the peers of `gradgraph bench capture` that declare torchvision (which would pull a CUDA torch): their own
# dependencies first, then the peers with --no-deps (pip runs no dependency check for a --no-deps install, so
# it prints no resolver ERROR about the torchvision they never import)
NODEPS := backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1
PEERDEPS := unfoldNd==0.2.3 einops==0.8.2 einconv==0.1.0 linear_operator==0.6.1 opt-einsum==3.4.0

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) $(TORCH) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PIP) $(TORCH) -e ".[dev,bench,zoo]"
	touch $@

$(VENV)/.peers: $(VENV)/.dev
	$(PIP) $(TORCH) $(PEERDEPS)
	$(PIP) --no-deps $(NODEPS)
	touch $@

$(VENV)/.docs: $(VENV)/.base pyproject.toml
	$(PIP) $(TORCH) -e ".[docs]"
	touch $@

$(VENV)/.notebooks: $(VENV)/.dev pyproject.toml
	$(PIP) $(TORCH) -e ".[dev,notebooks]"
	touch $@

install: $(VENV)/.peers

bench-peers: $(VENV)/.peers

demo: $(VENV)/.base
	$(VENV)/bin/gradgraph bench curvature --preset demo --out-dir runs/demo --results runs/demo

# the test suite needs the dev tools, opacus and transformers (extras) and backpack (tests/test_bench_capture.py)
test: $(VENV)/.peers
	$(VENV)/bin/ruff check gradgraph tests benchmarks
	$(PY) -m pytest -q

# executes every notebook top to bottom (datasets and runs in a temporary folder; the test checks that the work
# tree is left as it was)
notebooks: $(VENV)/.dev
	$(PY) -m pytest -q tests/test_notebooks.py

lab: $(VENV)/.notebooks
	GRADGRAPH_DATASETS=$(CURDIR)/runs/notebooks/datasets GRADGRAPH_RUNS=$(CURDIR)/runs/notebooks/runs \
		$(VENV)/bin/jupyter lab notebooks/

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

.PHONY: install bench-peers demo test notebooks lab docs
