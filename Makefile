# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Offline by design: no Hub downloads in the demo or the tests, no chromadb telemetry.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ANONYMIZED_TELEMETRY=False

.PHONY: install test-deps lint demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The embedded default: the miniature world (tools/miniworld), whose small trained models ship in the repo. Its first
# run renders and indexes the 20,000-image retrieval corpus into the default data folder (~/.imagerag, or
# IMAGERAG_DATA_DIR), so `imagerag generate "..." --profile mini` then works from any folder.
DEMO_PROMPT := a large red star in the top left, a blue ring at the bottom and a yellow square on the right

demo: install
	$(OFFLINE) $(BIN)/imagerag generate "$(DEMO_PROMPT)" --profile mini --out runs

# The system packages the tests need besides the Python ones: Debian's chromium (the report test's headless browser) and
# postgresql (the server binaries for the thread test's throwaway cluster). Installed with apt-get (sudo when not root)
# when missing, a no-op when present; stops with what to install when it cannot. See scripts/provision-test-deps.
test-deps:
	bash scripts/provision-test-deps

# mypy resolves `imagerag.*` through a farm of links (the installed package maps the repository's folders under that
# name through an import hook, which type checkers cannot follow).
TYPECHECK := $(VENV)/typecheck/imagerag
LAYERS := agent graphs tools prompts evals

lint: install
	mkdir -p $(TYPECHECK) && for p in $(LAYERS); do ln -sfn "$(CURDIR)/$$p" $(TYPECHECK)/$$p; done
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(foreach p,$(LAYERS),-p imagerag.$(p))

test: test-deps install lint
	$(OFFLINE) $(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
