# `make train` and `make test` build .venv from scratch when it is missing; then `make train`
# runs the main job (python -m fastcl.train, ARGS="--method moco" etc.) and `make test` the suite.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.fastcl-installed

.PHONY: train test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet -c constraints.txt torch
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,train]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m fastcl.train $(ARGS)

# The bounded, derandomized hypothesis profile unless one is chosen (HYPOTHESIS_PROFILE=dev:
# 60 random examples a test).
test: $(STAMP)
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest tests -q

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .benchmarks fastcl-train-out
