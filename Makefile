# `make demo` and `make test` work from a fresh clone: each builds .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kzoo-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kzoo demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup

bench: $(STAMP)
	$(VENV)/bin/kzoo bench rational
	$(VENV)/bin/kzoo bench attention
	$(VENV)/bin/kzoo bench models
	$(VENV)/bin/kzoo bench hmar
	$(VENV)/bin/kzoo bench normal

clean:
	rm -rf $(VENV) build *.egg-info
