# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Offline by design: no Hub downloads in the demo or the tests, no chromadb telemetry.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ANONYMIZED_TELEMETRY=False

.PHONY: install test-deps demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The embedded default: the miniature world (evals/miniworld), whose small trained models ship in the repo.
# The first run renders its 6,000-image retrieval corpus and indexes it (once); then the agent loop runs.
DEMO_DATA := .imagerag
DEMO_PROMPT := a large red heart on the left

demo: install
	test -f $(DEMO_DATA)/miniworld-corpus/scene_005999.png || $(OFFLINE) $(BIN)/python -m evals.miniworld.world corpus $(DEMO_DATA)/miniworld-corpus --n 6000 --seed 1
	$(OFFLINE) $(BIN)/imagerag index $(DEMO_DATA)/miniworld-corpus --profile mini --data-dir $(DEMO_DATA)
	$(OFFLINE) $(BIN)/imagerag generate "$(DEMO_PROMPT)" --profile mini --data-dir $(DEMO_DATA) --out runs

# The system packages the tests need besides the Python ones: Debian's chromium (the report test's headless browser) and
# postgresql (the server binaries for the thread test's throwaway cluster). Installed with apt-get (sudo when not root)
# when missing, a no-op when present; stops with what to install when it cannot. See scripts/provision-test-deps.
test-deps:
	bash scripts/provision-test-deps

test: test-deps install
	$(OFFLINE) $(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
