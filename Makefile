# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# make demo ENV=metadrive writes under out/metadrive, next to the toy demo's out/
OUT ?= $(if $(filter toy,$(ENV)),out,out/$(ENV))
DEVICE ?= cpu
ENV ?= toy

.PHONY: demo test test-slow lint format install clean bench

$(STAMP): pyproject.toml constraints-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints-ci.txt -e '.[test,metadrive,carla,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m training.demo --env $(ENV) --out-root $(OUT) --device $(DEVICE)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmarks.throughput --device $(DEVICE)

clean:
	rm -rf $(VENV) $(OUT)
