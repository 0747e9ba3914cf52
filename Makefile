# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Offline by design: no Hub downloads in the demo or the tests, no chromadb telemetry.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ANONYMIZED_TELEMETRY=False

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(OFFLINE) $(BIN)/imagerag generate "a red heart on the left and a blue square on the right" --profile tiny --out runs

test: install
	$(OFFLINE) $(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
